"""compare_logits against a slow per-position reference."""

import math

import pytest
import torch

from emo_calibrate.export.parity import compare_logits


def _reference(reference, candidate):
    """Per position, in plain Python: KL(p_ref || p_cand) = sum_v p_ref(v) (log p_ref(v) - log p_cand(v))."""
    max_abs, kls = 0.0, []
    for ref, cand in zip(reference, candidate):
        for t in range(ref.shape[0]):
            r, c = ref[t].tolist(), cand[t].tolist()
            max_abs = max(max_abs, max(abs(a - b) for a, b in zip(r, c)))
            log_zr = math.log(sum(math.exp(x) for x in r))
            log_zc = math.log(sum(math.exp(x) for x in c))
            kls.append(sum(math.exp(a - log_zr) * ((a - log_zr) - (b - log_zc)) for a, b in zip(r, c)))
    return max_abs, sum(kls) / len(kls), max(kls), len(kls)


def test_matches_the_reference_on_ragged_prompts():
    torch.manual_seed(0)
    reference = [torch.randn(5, 37) * 3, torch.randn(2, 37) * 3, torch.randn(9, 37)]
    candidate = [r + 0.3 * torch.randn_like(r) for r in reference]
    result = compare_logits(reference, candidate)
    max_abs, mean_kl, max_kl, n = _reference(reference, candidate)
    assert result.num_positions == n == 16
    assert result.max_abs_logit_diff == pytest.approx(max_abs, rel=1e-6)
    assert result.mean_kl == pytest.approx(mean_kl, rel=1e-6)
    assert result.max_kl == pytest.approx(max_kl, rel=1e-6)


def test_identical_and_shifted_logits_have_zero_kl():
    logits = [torch.randn(4, 11)]
    assert compare_logits(logits, logits).mean_kl == 0.0
    shifted = compare_logits(logits, [logits[0] + 5.0])  # softmax is shift-invariant, logits are not
    assert shifted.mean_kl < 1e-12 and shifted.max_abs_logit_diff == pytest.approx(5.0)


def test_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="prompts"):
        compare_logits([torch.zeros(2, 3)], [])
    with pytest.raises(ValueError, match="shapes"):
        compare_logits([torch.zeros(2, 3)], [torch.zeros(2, 4)])
