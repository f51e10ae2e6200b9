"""GPU diag (uncommitted): where the batch-16 prefill step (2,048 tokens, eager) goes; bigger buckets A/B."""
import glob, json, os, time, torch
from transformers import LlamaForCausalLM
from benchmarks.common import llama_config, allow_many_graphs
from xy_inductor import LLM, SamplingParams

allow_many_graphs()
torch.manual_seed(0)
model = LlamaForCausalLM(llama_config("llama-3.2-1b")).to("cuda", torch.bfloat16).eval()
prompts = torch.randint(0, model.config.vocab_size, (16, 128)).tolist()
params = SamplingParams(temperature=0, max_tokens=128, ignore_eos=True)
sync = torch.cuda.synchronize

def timed_run(llm, n=3):
    llm.generate(prompts, params, use_tqdm=False)
    ts = []
    for _ in range(n):
        sync(); t = time.perf_counter(); llm.generate(prompts, params, use_tqdm=False); sync()
        ts.append(time.perf_counter() - t)
    return sorted(ts)[n // 2]

def steps(llm, profile=False):
    e = llm.engine
    e.async_scheduling = False
    for p in prompts: e.add_request(p, params)
    sync(); t = time.perf_counter()
    if profile:
        from torch.profiler import profile as prof_, ProfilerActivity
        with prof_(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as pr:
            e.step(); sync()
    else:
        e.step(); sync()
    first = time.perf_counter() - t
    t = time.perf_counter(); e.step(); sync(); second = time.perf_counter() - t
    while e.has_unfinished(): e.step()
    e.async_scheduling = True
    out = {"prefill_step_ms": 1e3 * first, "next_step_ms": 1e3 * second}
    if profile:
        avg = pr.key_averages()
        print(avg.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=70))
        print(avg.table(sort_by="self_device_time_total", row_limit=14, max_name_column_width=70))
    return out

llm = LLM(model, max_model_len=320, enable_prefix_caching=False)
print("default buckets run s", timed_run(llm), flush=True)
print(steps(llm), flush=True)
print(steps(llm, profile=True), flush=True)
model.set_attn_implementation("sdpa")
big = LLM(model, max_model_len=320, enable_prefix_caching=False,
          cuda_graph_sizes=[2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048])
print("buckets to 2048 run s", timed_run(big), "stats", {k: v for k, v in big.stats.items() if "graph" in k}, flush=True)
print(steps(big), flush=True)
print("default again run s", timed_run(llm), flush=True)

for f in glob.glob("/tmp/torchinductor_*/**/*.py", recursive=True):
    src = open(f).read()
    key = "def triton_poi_fused__to_copy__unsafe_view_add_bmm_cat_cos_mul_neg_paged_attention"
    if key in src:
        i = src.index(key)
        j = src.rfind("@triton", 0, i)
        print("=== ", f); print(src[max(0, j - 1200):i + 2500]); break
