"""The whole-decode-step kernel (ascend_kernels/decode_step_kernel.py): an sm_90 compile in a fresh
process (CPU; catches Gluon API drift), and on a Hopper GPU one step's logits and token against the
model's float32 copy fed the same prompt cache, then several steps against the same reference."""
import copy

import pytest
import torch

from ascend_kernels import decode_step
from benchmarks import bench_decode_step as bench
from benchmarks.common import rel_err
from tests.kernels.compile_megakernel_sm90 import assert_compiles
from tests.sm90 import requires_sm90


def test_compiles_for_sm90():
    assert_compiles("step", decode_step.SMEM_BYTES)


@pytest.mark.parametrize("source", ["revision", "folder"])
def test_ab_loads_a_revision_beside_the_working_tree(source, tmp_path):
    """benchmarks/ab_decode_step.py's copy of a revision's (or a folder's) kernel imports its own modules,
    not the tree's."""
    import importlib
    import shutil
    from pathlib import Path

    from benchmarks.ab_decode_step import MODULES, load_revision

    rev = "HEAD"
    if source == "folder":
        rev = str(tmp_path / "variant")
        Path(rev).mkdir()
        for name in MODULES:
            if (Path(decode_step.__file__).parent / f"{name}.py").exists():
                shutil.copy(Path(decode_step.__file__).parent / f"{name}.py", rev)
    launcher = load_revision(rev)
    pkg = launcher.__name__.rsplit(".", 1)[0]
    kernel = importlib.import_module(f"{pkg}.decode_step_kernel")  # the launcher imports it at launch
    assert launcher.DecodeStepKernel is not decode_step.DecodeStepKernel
    for path in Path(launcher.__file__).parent.glob("*.py"):
        assert "ascend_kernels.decode_step" not in path.read_text(), path
    assert kernel.attention_split.__module__ == f"{pkg}.decode_step_attention"


def test_timeline_copy_compiles_for_sm90():
    """benchmarks/decode_step_timeline.py's stamps still find their anchors in the kernel and compile."""
    from benchmarks.decode_step_timeline import stamped_source

    assert stamped_source().count("_stamp(ts_ptr") == 10  # its definition, 4 in _stage_start, 5 at stages' ends
    assert stamped_source(tiles=True).count("_stamp(ts_ptr") == 15  # and after 3 q/k/v tiles and 2 o tiles
    assert_compiles("step_timeline", decode_step.SMEM_BYTES)
    assert_compiles("step_timeline_tiles", decode_step.SMEM_BYTES)


@pytest.mark.gpu
@requires_sm90
def test_long_context_splits_match_float32_reference():
    """From position 256 NSPLIT on, grids with 2 NSPLIT programs a q head split attention in 2 NSPLIT
    (smaller grids keep NSPLIT): every grid gives the float32 model's logits and token."""
    from transformers import LlamaForCausalLM

    from benchmarks.common import llama_config

    torch.manual_seed(1)
    model = LlamaForCausalLM(llama_config("llama-3.2-1b")).to(device="cuda", dtype=torch.bfloat16).eval()
    ref = copy.deepcopy(model).float()
    n = 256 * decode_step.NSPLIT + 77  # past the threshold, a partly filled page and a partial KV tile
    ids = torch.randint(0, model.config.vocab_size, (1, n), device="cuda")
    t0, cache, _, logits_ref = bench._one_step(model, ref, ids)
    step = bench.DecodeStep(model, n + 8)
    candidates = decode_step.grid_candidates(step.kernel.w, step.kernel.num_sms)
    assert max(candidates) >= 2 * decode_step.NSPLIT * model.config.num_attention_heads  # the 2 NSPLIT path runs
    for grid in candidates:
        step.kernel.grid = grid
        step.load_prompt(cache, t0.item(), n)
        step._launch()
        torch.cuda.synchronize()
        assert rel_err(step.logits, logits_ref) < 1e-4, grid
        assert step.token.item() == logits_ref.argmax().item(), grid


@pytest.mark.gpu
@requires_sm90
def test_steps_match_float32_reference():
    from transformers import LlamaForCausalLM

    from benchmarks.common import llama_config

    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config("llama-3.2-1b")).to(device="cuda", dtype=torch.bfloat16).eval()
    ref = copy.deepcopy(model).float()
    ids = torch.randint(0, model.config.vocab_size, (1, 40), device="cuda")  # 40: a partly filled page
    t0, cache, _, logits_ref = bench._one_step(model, ref, ids)
    step = bench.DecodeStep(model, 64)
    step.load_prompt(cache, t0.item(), ids.shape[1])
    step._launch()
    torch.cuda.synchronize()
    assert rel_err(step.logits, logits_ref) < 1e-4
    assert step.token.item() == logits_ref.argmax().item()
    assert step.pos.item() == ids.shape[1] + 1
    # the grid was timed at start-up; every candidate computes the same step
    tuned, candidates = step.kernel.grid, decode_step.grid_candidates(step.kernel.w, step.kernel.num_sms)
    assert tuned in candidates and sorted(step.kernel.grid_us) == candidates
    assert step.kernel.grid_long in candidates and sorted(step.kernel.grid_us_long) == candidates
    assert step.kernel.grid_for(decode_step.LONG_POS - 1) == tuned
    assert step.kernel.grid_for(decode_step.LONG_POS) == step.kernel.grid_long
    for grid in candidates:
        step.kernel.grid = grid
        step.load_prompt(cache, t0.item(), ids.shape[1])
        step._launch()
        torch.cuda.synchronize()
        assert rel_err(step.logits, logits_ref) < 1e-4, grid
        assert step.token.item() == logits_ref.argmax().item(), grid
    step.kernel.grid = tuned
    # the next steps read the K/V this one stored: compare with the float32 model fed our tokens
    cache32 = bench._float_cache(cache, model.config.num_hidden_layers)
    with torch.no_grad():
        ref(t0, past_key_values=cache32)
        for _ in range(3):
            token = step.token.clone()
            step._launch()
            torch.cuda.synchronize()
            expected = ref(token.view(1, 1), past_key_values=cache32).logits[0, -1]
            assert rel_err(step.logits, expected) < 1e-2  # the cache holds bf16 K/V, the reference fp32
