"""Speculative verification: greedy acceptance and distribution-preserving rejection sampling."""
from __future__ import annotations

import pytest
import torch

from xy_inductor.config import SamplingParams
from xy_inductor.engine.drafters import NgramDrafter
from xy_inductor.engine.verifier import target_probs, verify_greedy, verify_sampled


def test_greedy_accepts_longest_matching_prefix_plus_one():
    logits = torch.full((4, 10), -5.0)
    for row, best in enumerate([3, 7, 1, 9]):
        logits[row, best] = 5.0
    assert verify_greedy(logits, [3, 7, 2]).token_ids == [3, 7, 1]
    assert verify_greedy(logits, [3, 7, 1]).token_ids == [3, 7, 1, 9]  # all accepted + bonus
    v = verify_greedy(logits, [4, 7, 1])
    assert v.token_ids == [3] and v.num_accepted == 0


def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    keep = expected > 0
    return float((((counts - expected) ** 2)[keep] / expected[keep]).sum())


def test_greedy_takes_a_known_argmax():
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(3))
    drafts = logits.argmax(-1).tolist()[:2] + [29 - logits[2].argmax().item()]
    best = logits.argmax(-1).tolist()
    assert verify_greedy(logits, drafts, best) == verify_greedy(logits, drafts)
    assert verify_greedy(logits, drafts, best).num_accepted == 2
    with pytest.raises(ValueError, match="argmax rows"):
        verify_greedy(logits, drafts, best[:3])


def test_rejection_sampling_preserves_the_target_distribution():
    """First emitted token ~ target p, whatever the draft: chi-square over a 6-token vocabulary."""
    g = torch.Generator().manual_seed(0)
    vocab, trials = 6, 6000
    logits = torch.randn(3, vocab, generator=g) * 1.5
    draft_probs = torch.softmax(torch.randn(2, vocab, generator=g), dim=-1)
    params = SamplingParams(temperature=0.8, max_tokens=4)
    p0 = target_probs(logits[0], params, None)
    counts_model, counts_ngram = torch.zeros(vocab), torch.zeros(vocab)
    for _ in range(trials):
        drafted = torch.multinomial(draft_probs, 1, generator=g).flatten().tolist()
        counts_model[verify_sampled(logits, drafted, draft_probs, params, None, g).token_ids[0]] += 1
        counts_ngram[verify_sampled(logits, [2, 4], None, params, None, g).token_ids[0]] += 1
    # 5 degrees of freedom: P(chi2 > 20.5) ~ 0.001
    assert _chi_square(counts_model, p0) < 20.5
    assert _chi_square(counts_ngram, p0) < 20.5


def test_rejection_sampling_accepts_everything_when_draft_equals_target():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 8, generator=g)
    params = SamplingParams(temperature=1.0)
    q = torch.stack([target_probs(logits[i], params, None) for i in range(3)])
    drafted = [int(torch.multinomial(q[i], 1, generator=g)) for i in range(3)]
    v = verify_sampled(logits, drafted, q, params, None, g)
    assert v.num_accepted == 3 and v.token_ids[:3] == drafted and len(v.token_ids) == 4


def test_ngram_drafter_proposes_what_followed_the_last_match():
    d = NgramDrafter(num_speculative_tokens=3, n_min=1, n_max=2)
    assert d.propose("r", [1, 2, 3, 4, 9, 1, 2]) == [3, 4, 9]
    assert d.propose("r", [5, 6, 7]) == []
    assert d.propose("r", [1, 2, 3, 4, 9, 1, 2], max_tokens=1) == [3]
    assert d.propose("r", [7, 8, 7]) == [8, 7]
