"""Property tests of the EMO loss (reference `emo_loss` and fused `fused_linear_emo_loss`) with hypothesis.

Over shapes, dtypes (fp32, bf16, fp16), label patterns (all ignored, one target, random, all targets) and extreme logits
(tiny, large up to fp16's range, very negative, exact ties, -inf), the loss, every logged metric and every gradient
are finite, and the per-token EMO term stays inside its exact range.

EMO bounds. With ê the L2-normalised cost rows, q = softmax(z) and a target y whose row is non-zero,
emo = 1 - sum_i q_i cos(i, y). Since cos(y, y) = 1 and the other cosines lie in [-1, 1]:
    without subtraction:  emo = 1 - q_y - sum_{i!=y} q_i cos(i, y)  in [0, 2 (1 - q_y)]
    with subtraction:     emo + q_y (the official value)           in [q_y, 2 - q_y]
so both lie in [0, 2] (to fp32 rounding: normalised rows have norm 1 +- 1e-7, so emo can read -1e-7 when q_y = 1).
A target whose cost row is all zero (an unused vocabulary slot) has emo = 1 exactly.

What -inf means: a token the model rules out (a masked vocabulary slot). Such tokens get q = 0 and contribute nothing;
the loss stays finite as long as the target itself is not -inf. A -inf target logit means the model calls the target
impossible: the cross-entropy is +inf, and the trainer's non-finite guard skips that step (tests/training/test_nonfinite.py).
"""

import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from emo_calibrate.losses.fused import fused_linear_emo_loss
from emo_calibrate.losses.reference import _emo_on_flat_logits, emo_loss, normalize_cost_embedding


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Deterministic in CI; `EMO_FUZZ_EXAMPLES=5000 pytest tests/losses/test_fuzz_loss.py` explores new random cases.
EXPLORE = int(os.environ.get("EMO_FUZZ_EXAMPLES", 0))
SETTINGS = settings(
    max_examples=EXPLORE or 120,
    derandomize=not EXPLORE,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
OPTIONS = st.sampled_from(
    [
        ("emo_anchored", None),
        ("mle_anchored", None),
        ("mle_anchored", 3.0),
        ("mle", None),
    ]
)
# Drawn by both property tests: vocabulary, cost-embedding width, dtype, weighting (+ clamp), target-mass subtraction.
COMMON = dict(
    vocab=st.integers(2, 33),
    width=st.integers(1, 8),
    dtype=st.sampled_from(sorted(DTYPES)),
    options=OPTIONS,
    subtract=st.booleans(),
    zero_rows=st.booleans(),
    extra_items=st.sampled_from([None, 0, 7]),
    seed=st.integers(0, 2**16),
)
# Tolerance of the bounds. The reference computes in fp32 from inputs rounded to the dtype; the fused head may keep
# bf16/fp16 operands for its matmuls (fp32 accumulation), which moves emo by up to ~2 ulps of the dtype at 1.
TOL = 1e-4
LOW_PRECISION_TOL = {"fp32": TOL, "bf16": 2 * 2**-8, "fp16": 2 * 2**-11}


def make_logits(generator, shape, pattern, scale):
    """Logits in fp32 before the cast, with values a finite dtype can hold (|z| <= 6e4, fp16's range)."""
    z = torch.randn(shape, generator=generator) * scale
    if pattern == "ties":  # every token equally likely, or two-way ties at the top
        z = torch.zeros(shape) if scale < 1 else z.round().clamp(-1, 1) * min(scale, 6e4)
    elif pattern == "peaked":  # one token far above the rest: q is one-hot in fp32
        z = torch.zeros(shape)
        z.view(-1, shape[-1])[:, 0] = 6e4
    elif pattern == "very_negative":
        z = -torch.rand(shape, generator=generator) * 6e4
    return z.clamp(-6e4, 6e4)


def make_labels(generator, batch, length, vocab, pattern):
    labels = torch.randint(0, vocab, (batch, length), generator=generator)
    if pattern == "all_ignored":
        labels[:] = -100
    elif pattern == "single":  # exactly one target (at position >= 1) in the whole batch
        keep = labels[0, -1].item()
        labels[:] = -100
        labels[0, -1] = keep if length > 1 else -100
    elif pattern == "random":
        labels[torch.rand((batch, length), generator=generator) < 0.5] = -100
    return labels


def make_cost(generator, vocab, width, zero_rows):
    cost = torch.randn(vocab, width, generator=generator)
    if zero_rows:
        cost[torch.rand(vocab, generator=generator) < 0.3] = 0.0
    return cost


def gradient_must_fit(dtype, weighting, ratio_clamp):
    """Whether the gradient is guaranteed to fit the dtype. Not for fp16 with unclamped `mle_anchored`: its weight
    mle / emo is unbounded (emo -> 0 when q sits on tokens whose cost embedding matches the target's while mle stays
    large), and the gradient can pass fp16's 65504. That is what emo_ratio_clamp (3.0 officially) is for, and what the
    trainer's non-finite guard catches; test_unclamped_ratio_can_overflow_fp16_and_the_clamp_fixes_it pins it."""
    return not (dtype == "fp16" and weighting == "mle_anchored" and ratio_clamp is None)


def assert_finite(**tensors):
    for name, tensor in tensors.items():
        assert tensor is not None and torch.isfinite(tensor).all(), f"{name} is not finite: {tensor}"


def assert_emo_bounds(z, targets, cost, emo, subtract):
    """Check the per-token EMO values against the exact ranges of the module docstring."""
    q = torch.softmax(z.float(), dim=-1)
    q_y = q.gather(-1, targets[:, None]).squeeze(-1)
    nonzero = cost[targets].abs().sum(-1) > 0
    low = torch.where(nonzero, q_y if subtract else torch.zeros_like(q_y), torch.ones_like(q_y))
    high = torch.where(nonzero, 2 - q_y if subtract else 2 * (1 - q_y), torch.ones_like(q_y))
    assert (emo >= low - TOL).all() and (emo <= high + TOL).all(), (emo, low, high)
    assert (emo >= -TOL).all() and (emo <= 2 + TOL).all()


@SETTINGS
@given(
    batch=st.integers(1, 3),
    length=st.integers(1, 6),
    **COMMON,
    label_pattern=st.sampled_from(["all_ignored", "single", "random", "all_valid"]),
    logit_pattern=st.sampled_from(["normal", "ties", "peaked", "very_negative"]),
    scale=st.sampled_from([1e-3, 1.0, 30.0, 1e3, 6e4]),
    neg_inf=st.booleans(),
)
def test_reference_loss_is_finite_and_bounded(
    batch, length, vocab, width, dtype, options, subtract, label_pattern, logit_pattern, scale, neg_inf, zero_rows,
    extra_items, seed,
):  # fmt: skip
    generator = torch.Generator().manual_seed(seed)
    weighting, ratio_clamp = options
    z = make_logits(generator, (batch, length, vocab), logit_pattern, scale)
    labels = make_labels(generator, batch, length, vocab, label_pattern)
    if neg_inf:  # rule some tokens out, never a target and never a whole row
        ruled_out = torch.rand(z.shape, generator=generator) < 0.4
        ruled_out[..., 0] = False
        next_targets = torch.cat([labels[:, 1:], torch.full((batch, 1), -100)], dim=1)
        valid = next_targets != -100
        ruled_out[valid] &= torch.arange(vocab) != next_targets[valid][:, None]
        z = z.masked_fill(ruled_out, float("-inf"))
    cost = make_cost(generator, vocab, width, zero_rows)
    logits = z.to(DTYPES[dtype]).requires_grad_()
    num_valid = int((labels[:, 1:] != -100).sum())
    num_items = None if extra_items is None else num_valid + extra_items

    out = emo_loss(
        logits, labels, cost, weighting=weighting, ratio_clamp=ratio_clamp, subtract_target_mass=subtract,
        num_items_in_batch=num_items,
    )  # fmt: skip
    out.loss.backward()
    assert_finite(loss=out.loss, mle=out.mle, emo=out.emo, ratio=out.ratio, entropy=out.entropy)
    if gradient_must_fit(dtype, weighting, ratio_clamp):
        assert_finite(grad=logits.grad)
    assert out.loss >= -TOL and out.mle >= 0 and -TOL <= out.emo <= 2 + TOL
    assert 0 <= out.entropy <= math.log(vocab) + TOL
    assert int(out.num_tokens) == num_valid
    if num_valid == 0:
        assert out.loss == 0 and (logits.grad == 0).all()
        return

    flat = logits.detach()[:, :-1].reshape(-1, vocab)
    targets = labels[:, 1:].reshape(-1)
    keep = targets != -100
    flat, targets = flat[keep], targets[keep]
    cost_hat = normalize_cost_embedding(cost)
    _, _, emo, *_ = _emo_on_flat_logits(
        flat, targets, torch.ones_like(targets, dtype=torch.bool), cost_hat, weighting, ratio_clamp, subtract
    )
    assert_emo_bounds(flat, targets, cost, emo, subtract)


def test_a_target_ruled_out_by_minus_inf_gives_an_infinite_loss():
    """-inf on the target is the model calling it impossible: the loss says so (and the trainer skips the step)."""
    logits = torch.zeros(1, 2, 4)
    logits[0, 0, 1] = float("-inf")
    out = emo_loss(logits, torch.tensor([[-100, 1]]), torch.randn(4, 3))
    assert not torch.isfinite(out.loss)


@SETTINGS
@given(
    tokens=st.integers(1, 12),
    hidden_size=st.integers(1, 8),
    **COMMON,
    scale=st.sampled_from([0.0, 1e-3, 1.0, 30.0, 300.0]),
    own_cost=st.booleans(),
    chunk_size=st.sampled_from([None, 1, 5]),
)
def test_fused_loss_is_finite_bounded_and_matches_the_reference(
    tokens, hidden_size, vocab, width, dtype, options, subtract, scale, own_cost, zero_rows, chunk_size, extra_items,
    seed,
):  # fmt: skip
    """Hidden states up to 300 with weights ~N(0, 1) give logits up to ~1e4, inside fp16's range; scale 0 = ties."""
    generator = torch.Generator().manual_seed(seed)
    weighting, ratio_clamp = options
    hidden = (torch.randn(tokens, hidden_size, generator=generator) * scale).to(DTYPES[dtype]).requires_grad_()
    weight = torch.randn(vocab, hidden_size, generator=generator).to(DTYPES[dtype]).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), generator=generator)
    cost = None if own_cost else make_cost(generator, vocab, width, zero_rows)
    num_items = None if extra_items is None else tokens + extra_items
    kwargs = dict(weighting=weighting, ratio_clamp=ratio_clamp, subtract_target_mass=subtract)

    out = fused_linear_emo_loss(
        hidden, weight, targets, cost_embedding=cost, num_items_in_batch=num_items, chunk_size=chunk_size, **kwargs
    )
    out.loss.backward()
    assert_finite(loss=out.loss, mle=out.mle, emo=out.emo, emd=out.emd, ratio=out.ratio, entropy=out.entropy)
    if gradient_must_fit(dtype, weighting, ratio_clamp):
        assert_finite(grad_hidden=hidden.grad, grad_weight=weight.grad)
    tol = LOW_PRECISION_TOL[dtype]
    assert out.loss >= -tol and out.mle >= 0 and -tol <= out.emo <= 2 + tol
    assert int(out.num_tokens) == tokens

    if dtype == "fp32":
        # Against the exact values (fp64 reference): the fused head is accurate where the fp32 reference is not
        # (test_a_confident_token_gets_the_reference_gradient).
        reference, ref_grads = reference_on_logits(hidden, weight, targets, cost, num_items, kwargs, torch.float64)
        # Not the mean ratio: where q_y -> 1 it is fp32 rounding noise over a vanishing mle (emo/mle = ~1e-7/~0), and
        # it only acts through ratio * mle, which `loss` and the gradients compare.
        fields = ("loss", "mle", "emo", "emd", "entropy")
        if emo_decides_the_weight(hidden, weight, targets, cost, kwargs):
            fields = ("mle", "emo", "emd", "entropy")
        for field in fields:
            expected, got = getattr(reference, field), getattr(out, field)
            torch.testing.assert_close(
                got, expected, rtol=1e-4, atol=1e-4 * (1 + float(expected.detach().abs())), msg=field
            )
        for name, got, expected in zip(("hidden", "weight"), (hidden.grad, weight.grad), ref_grads):
            if "loss" not in fields:
                break
            scale = 1e-4 * (1 + float(expected.abs().max()))
            torch.testing.assert_close(got, expected, rtol=1e-3, atol=scale, msg=f"gradient of {name}")


def emo_decides_the_weight(hidden, weight, targets, cost, kwargs):
    """Whether unclamped mle_anchored meets a token whose exact emo is below 1e-6.

    Its weight mle / (emo + 1e-10) then hangs on cosines that fp32 knows to ~1e-7 (an exactly parallel pair of rows
    comes out as 1 +- 1e-7): loss = (mle + weight * emo) / 2 lands anywhere between mle / 2 and mle in any fp32
    implementation, the fp32 reference included, and so does the gradient. The clamp removes the problem.
    """
    if kwargs["weighting"] != "mle_anchored" or kwargs.get("ratio_clamp") is not None:
        return False
    z = hidden.detach().double() @ weight.detach().double().t()
    cost_hat = normalize_cost_embedding((weight if cost is None else cost).detach().double(), torch.float64)
    valid = torch.ones_like(targets, dtype=torch.bool)
    emo = _emo_on_flat_logits(z, targets, valid, cost_hat, "mle", None, kwargs["subtract_target_mass"])[2]
    return bool((emo < 1e-6).any())


def reference_on_logits(hidden, weight, targets, cost, num_items, kwargs, dtype=torch.float32):
    """`emo_loss` on the same logits, laid out as it expects them: (1, tokens + 1, V) with unshifted labels.

    `dtype=torch.float64` gives the exact values of the same inputs (emo_loss keeps fp64 in fp64), returned in fp32.
    """
    hidden = hidden.detach().to(dtype).requires_grad_()
    weight = weight.detach().to(dtype).requires_grad_()
    logits = torch.cat([hidden @ weight.t(), torch.zeros(1, weight.shape[0], dtype=dtype)])[None]
    labels = torch.cat([torch.tensor([-100]), targets])[None]
    cost = weight.detach() if cost is None else cost.to(dtype)
    out = emo_loss(logits, labels, cost, num_items_in_batch=num_items, **kwargs)
    grads = torch.autograd.grad(out.loss, (hidden, weight))
    if dtype == torch.float32:
        return out, grads
    fields = {k: v.detach().float() if v.is_floating_point() else v for k, v in vars(out).items()}
    return type(out)(**fields), tuple(g.float() for g in grads)


def test_a_confident_token_gets_the_reference_gradient():
    """Found by the fuzzer on a chunked fused head: a target with p = 1 - 6e-7 under a max logit of 40. Its mle (6e-7)
    is below the fp32 spacing at 40 (3.8e-6), so `logsumexp - z_y` rounds it to 0; the detached emo/mle weight then
    becomes emo / 1e-10 while (1 - q_y) stays 6e-7, and the gradient is 6000x too large.

    Compared with the exact (fp64) values: here mle and emo (without the target mass) are ~6e-7, where fp32 steps
    are 6e-8 near 1, and the fp32 reference itself is 7 % (mle) and 11 % (emo) off. The fused head takes them
    relative to the row maximum, without cancellation (log1p, transport costs 1 - cos), and must be exact."""
    hidden = torch.tensor([[40.0]], requires_grad=True)
    weight = torch.tensor([[1.0], [0.64], [0.5]], requires_grad=True)
    cost = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    targets = torch.tensor([0])
    for weighting in ("emo_anchored", "mle_anchored"):
        for subtract in (True, False):
            kwargs = dict(weighting=weighting, subtract_target_mass=subtract)
            out = fused_linear_emo_loss(hidden, weight, targets, cost_embedding=cost, **kwargs)
            grads = torch.autograd.grad(out.loss, (hidden, weight))
            exact, exact_grads = reference_on_logits(hidden, weight, targets, cost, None, kwargs, torch.float64)
            for field in ("loss", "mle", "emo"):
                torch.testing.assert_close(getattr(out, field), getattr(exact, field), rtol=1e-4, atol=0, msg=field)
            for got, expected in zip(grads, exact_grads):
                torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6 * float(expected.abs().max()))


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_extreme_fp16_range_logits_keep_finite_gradients(dtype):
    """The largest finite fp16 logits, opposite signs, in every dtype: softmax saturates without overflow."""
    logits = torch.tensor([[[65504.0, -65504.0, 0.0], [-65504.0, 65504.0, 65504.0]]]).to(DTYPES[dtype])
    logits.requires_grad_()
    for weighting in ("emo_anchored", "mle_anchored"):
        out = emo_loss(logits, torch.tensor([[0, 1]]), torch.eye(3), weighting=weighting)
        (grad,) = torch.autograd.grad(out.loss, logits)
        assert_finite(loss=out.loss, grad=grad)


def test_unclamped_ratio_can_overflow_fp16_and_the_clamp_fixes_it():
    """Found by the fuzzer: a width-1 cost embedding makes every cosine +-1, q sits on tokens with the target's sign,
    so emo = 0 while mle = 87; mle_anchored's detached weight mle / emo is then ~1e12 and the fp16 gradient is inf."""
    grads = {}
    for clamp in (None, 3.0):
        generator = torch.Generator().manual_seed(320)
        hidden = (torch.randn(1, 4, generator=generator) * 30).half().requires_grad_()
        weight = torch.randn(25, 4, generator=generator).half().requires_grad_()
        target = torch.randint(0, 25, (1,), generator=generator)
        cost = make_cost(generator, 25, 1, zero_rows=False)
        logits = torch.cat([hidden @ weight.t(), torch.zeros(1, 25, dtype=torch.half)])[None]
        labels = torch.cat([torch.tensor([-100]), target])[None]
        out = emo_loss(logits, labels, cost, weighting="mle_anchored", ratio_clamp=clamp, subtract_target_mass=False)
        out.loss.backward()
        assert torch.isfinite(out.loss) and out.emo == 0 and out.mle > 50
        grads[clamp] = weight.grad
    assert not torch.isfinite(grads[None]).all()
    assert torch.isfinite(grads[3.0]).all()
