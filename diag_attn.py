"""GPU diag (uncommitted): decode attention configs of the memory variant, Llama-3.2-1B engine, bs1/bs16."""
import dataclasses, gc, json, os, time, torch
from transformers import LlamaForCausalLM
from benchmarks.common import llama_config, allow_many_graphs
from benchmarks.bench_graphs import replay_ms, replay_kernels
from ascend_kernels import profiles
from xy_inductor import LLM, SamplingParams

allow_many_graphs()
sync = torch.cuda.synchronize
params = SamplingParams(temperature=0, max_tokens=128, ignore_eos=True)
BASE = profiles.H200
MEM = dict(BASE.memory_overrides)
VARIANTS = {
    "base": {},
    "kv256": {"mem": {"small_kv_tile": 256}},
    "kv64": {"mem": {"small_kv_tile": 64}},
    "ppc1": {"mem": {"programs_per_core": 1}},
    "ppc4": {"mem": {"programs_per_core": 4}},
    "warps2": {"mem": {"num_warps": 2}},
    "stages2": {"mem": {"num_stages": 2}},
    "split128": {"top": {"min_split_kv": 128}},
}
g = torch.Generator().manual_seed(1)
loads = {bs: torch.randint(0, 128256, (bs, 128), generator=g).tolist() for bs in (1, 16)}
res = {}
for name, v in VARIANTS.items():
    mem = {**MEM, **v.get("mem", {})}
    prof = dataclasses.replace(BASE, memory_overrides=tuple(mem.items()), **v.get("top", {}))
    profiles.H200 = prof
    profiles._cuda_profile.cache_clear()
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config("llama-3.2-1b")).to("cuda", torch.bfloat16).eval()
    llm = LLM(model, max_model_len=320, enable_prefix_caching=False)
    r = {}
    for bs, prompts in loads.items():
        llm.generate(prompts, params, use_tqdm=False)
        ts = []
        for _ in range(3):
            sync(); s = time.perf_counter(); llm.generate(prompts, params, use_tqdm=False); sync()
            ts.append(time.perf_counter() - s)
        k = replay_kernels(llm, bs)
        attn = [x[1] for x in k["top_us_calls"] if "meta_attention" in x[0]]
        r[bs] = {"tok_s": round(bs * 128 / sorted(ts)[1]), "replay_ms": round(replay_ms(llm, bs), 4),
                 "attn_us": attn[0] if attn else None}
    res[name] = r
    print(name, r, flush=True)
    del llm, model
    gc.collect(); torch.cuda.empty_cache()
json.dump(res, open(os.environ.get("OUT", ".") + "/attn.json", "w"), indent=1)
