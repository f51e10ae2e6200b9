"""GPU diag (uncommitted): share_tables A/B on decode bs1/bs16 (separate models, same weights)."""
import json, os, time, torch
from transformers import LlamaForCausalLM
from benchmarks.common import llama_config, allow_many_graphs
from benchmarks.bench_graphs import replay_ms, replay_kernels
from xy_inductor import LLM, SamplingParams

allow_many_graphs()
sync = torch.cuda.synchronize
params = SamplingParams(temperature=0, max_tokens=128, ignore_eos=True)
res = {}
tokens = {}
for share in (True, False):
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config("llama-3.2-1b")).to("cuda", torch.bfloat16).eval()
    t = time.perf_counter()
    llm = LLM(model, max_model_len=320, enable_prefix_caching=False,
              compile_options={"lower_gemm": False, "fuse_sibling_linears": True, "share_tables": share})
    r = {"startup_s": time.perf_counter() - t}
    g = torch.Generator().manual_seed(1)
    for bs in (1, 16):
        prompts = torch.randint(0, model.config.vocab_size, (bs, 128), generator=g).tolist()
        outs = llm.generate(prompts, params, use_tqdm=False)
        tokens[(share, bs)] = [o.token_ids for o in outs]
        ts = []
        for _ in range(3):
            sync(); s = time.perf_counter(); llm.generate(prompts, params, use_tqdm=False); sync()
            ts.append(time.perf_counter() - s)
        r[f"bs{bs}_tok_s"] = bs * 128 / sorted(ts)[1]
        r[f"bs{bs}_replay_ms"] = replay_ms(llm, bs)
        k = replay_kernels(llm, bs)
        r[f"bs{bs}_kernels"] = {"total_us": k["total_us"], "calls": k["calls"], "top": k["top_us_calls"]}
    res[f"share_{share}"] = r
    print(share, {k: v for k, v in r.items() if "kernels" not in k}, flush=True)
    for bs in (1, 16):
        print("  bs", bs, r[f"bs{bs}_kernels"]["total_us"], r[f"bs{bs}_kernels"]["calls"],
              [x for x in r[f"bs{bs}_kernels"]["top"] if "sin" in x[0] or "clone" in x[0] or "copy" in x[0] or "materialize" in x[0]])
    del llm, model
    torch.cuda.empty_cache()
json.dump(res, open(os.environ.get("OUT", ".") + "/tables.json", "w"), indent=1, default=str)
# how long each variant follows HF eager (bf16, SDPA) greedy, token by token
torch.manual_seed(0)
model = LlamaForCausalLM(llama_config("llama-3.2-1b")).to("cuda", torch.bfloat16).eval()
model.generation_config.eos_token_id = None
g = torch.Generator().manual_seed(1)
for bs in (1, 16):
    prompts = torch.randint(0, model.config.vocab_size, (bs, 128), generator=g)
    with torch.inference_mode():
        hf = model.generate(prompts.cuda(), attention_mask=torch.ones_like(prompts).cuda(), max_new_tokens=128,
                            min_new_tokens=128, do_sample=False, pad_token_id=0)[:, 128:].tolist()
    for share in (True, False):
        pre = []
        for a, b in zip(tokens[(share, bs)], hf):
            n = 0
            while n < len(a) and a[n] == b[n]:
                n += 1
            pre.append(n)
        print(f"bs{bs} share={share}: tokens equal to HF eager before the first difference: mean {sum(pre)/len(pre):.1f}, min {min(pre)}, all 128: {sum(p == 128 for p in pre)}/{bs}")
for bs in (1, 16):
    same = sum(a == b for a, b in zip(tokens[(True, bs)], tokens[(False, bs)]))
    print(f"bs{bs}: greedy tokens equal with / without shared tables: {same}/{bs}")
