"""row_argmax kernel vs torch.argmax (Triton CPU interpreter without a GPU)."""
import pytest
import torch

from ascend_kernels import arrival_counters
from ascend_kernels.row_argmax import BLOCK_V, RowArgmax, row_argmax

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the interpreter runs the CPU case


@pytest.mark.parametrize("rows,vocab,dtype", [
    (1, 100, torch.float32),  # one chunk, shorter than a block
    (3, 2 * BLOCK_V + 17, torch.bfloat16),  # a ragged last chunk
    (5, 3 * BLOCK_V, torch.float16),
])
def test_row_argmax_matches_torch(rows, vocab, dtype):
    gen = torch.Generator().manual_seed(vocab)
    logits = torch.randn(rows, vocab, generator=gen).to(dtype).to(DEVICE)
    assert torch.equal(row_argmax(logits), logits.argmax(dim=-1))


def test_ties_nan_and_infinities_follow_torch():
    vocab = 2 * BLOCK_V + 5
    logits = torch.randn(6, vocab, generator=torch.Generator().manual_seed(1))
    logits[0, [7, BLOCK_V + 3]] = 50.0  # a tie across chunks: the first index
    logits[1, [BLOCK_V + 9, BLOCK_V + 2]] = 50.0  # a tie inside a chunk
    logits[2] = float("-inf")  # nothing but -inf: index 0
    logits[3, [BLOCK_V + 1, 2 * BLOCK_V + 2]] = float("nan")  # NaN is the maximum, its first index
    logits[3, 0] = float("inf")
    logits[4, vocab - 1] = float("inf")  # the maximum in the ragged tail
    logits[5, 0] = 1e30
    logits = logits.to(DEVICE)
    for _ in range(2):  # the counters are reset by each launch's merging programs
        assert torch.equal(row_argmax(logits), logits.argmax(dim=-1))


def test_workspace_is_reused_and_rows_may_be_fewer():
    gen = torch.Generator().manual_seed(2)
    argmax = RowArgmax(8, 3 * BLOCK_V - 1, torch.device(DEVICE))
    out = torch.full((8,), -1, dtype=torch.int64, device=DEVICE)
    for rows in (8, 3, 8):
        logits = torch.randn(rows, 3 * BLOCK_V - 1, generator=gen).to(DEVICE)
        assert torch.equal(argmax(logits, out[:rows]), logits.argmax(dim=-1))
        assert torch.equal(out[:rows], logits.argmax(dim=-1))
    assert arrival_counters.all_zero()


def test_bad_input_is_refused():
    argmax = RowArgmax(2, 64, torch.device(DEVICE))
    with pytest.raises(ValueError, match="logits"):
        argmax(torch.zeros(3, 64, device=DEVICE))  # more rows than the workspace
    with pytest.raises(ValueError, match="logits"):
        argmax(torch.zeros(2, 65, device=DEVICE))
    with pytest.raises(ValueError, match="unit last stride"):
        argmax(torch.zeros(64, 2, device=DEVICE).t())
    with pytest.raises(ValueError, match="max_rows"):
        RowArgmax(0, 64, torch.device("cpu"))
