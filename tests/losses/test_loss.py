"""The pure EMO loss against a slow explicit-cost-matrix reference, exact optimal transport (POT), and the closed-form
gradient of performance.md §3.2."""

import itertools

import numpy as np
import ot
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference_emo import cost_matrix, reference_emo_loss, reference_emo_per_token

from emo_calibrate import EMOLoss, emo_loss


VARIANTS = [
    dict(weighting="emo_anchored"),
    dict(weighting="mle_anchored"),
    dict(weighting="mle_anchored", ratio_clamp=3.0),
    dict(weighting="mle_anchored", ratio_clamp=0.5),
    dict(weighting="mle"),
]


def make_inputs(batch=3, length=7, vocab=37, dim=5, ignore_index=-100, seed=0, dtype=torch.float32, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = (scale * torch.randn(batch, length, vocab, generator=g)).to(dtype)
    labels = torch.randint(0, vocab, (batch, length), generator=g)
    labels[0, :3] = ignore_index  # a masked prompt
    labels[-1, -2:] = ignore_index  # padding
    embedding = torch.randn(vocab, dim, generator=g)
    return logits, labels, embedding


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(str(x) for x in v.values()))
@pytest.mark.parametrize("subtract", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_loss_and_gradient_match_explicit_cost_matrix(variant, subtract, dtype):
    logits, labels, embedding = make_inputs(dtype=dtype)
    logits.requires_grad_(True)
    ref_logits = logits.detach().double().requires_grad_(True)

    out = emo_loss(logits, labels, embedding, subtract_target_mass=subtract, **variant)
    ref = reference_emo_loss(ref_logits, labels, embedding, subtract_target_mass=subtract, **variant)
    out.loss.backward()
    ref.backward()

    # fp64 inputs are computed in fp64; everything else in fp32.
    tight = dtype == torch.float64
    torch.testing.assert_close(
        out.loss.double(), ref.detach(), rtol=1e-9 if tight else 1e-5, atol=1e-10 if tight else 1e-6
    )
    torch.testing.assert_close(
        logits.grad.double(), ref_logits.grad, rtol=1e-8 if tight else 1e-4, atol=1e-11 if tight else 1e-7
    )
    mle, emo, valid = reference_emo_per_token(logits.detach(), labels, embedding, subtract)
    torch.testing.assert_close(out.mle.double(), mle.sum() / valid.sum(), rtol=1e-5, atol=1e-10 if tight else 1e-6)
    torch.testing.assert_close(out.emo.double(), emo.sum() / valid.sum(), rtol=1e-5, atol=1e-10 if tight else 1e-6)
    assert out.num_tokens == valid.sum()


@pytest.mark.parametrize("variant", VARIANTS[:3], ids=["emo_anchored", "mle_anchored", "mle_anchored-clamp"])
def test_bf16_and_fp16_inputs_match_reference_loosely(variant):
    for dtype in (torch.bfloat16, torch.float16):
        logits, labels, embedding = make_inputs(dtype=dtype, seed=1)
        logits.requires_grad_(True)
        ref_logits = logits.detach().double().requires_grad_(True)
        out = emo_loss(logits, labels, embedding.to(dtype), **variant)
        ref = reference_emo_loss(ref_logits, labels, embedding.to(dtype), **variant)
        out.loss.backward()
        ref.backward()
        assert logits.grad.dtype == dtype and torch.isfinite(logits.grad).all()
        torch.testing.assert_close(out.loss.double(), ref.detach(), rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(logits.grad.double(), ref_logits.grad, rtol=2e-2, atol=2e-3)


def test_emo_equals_exact_optimal_transport_for_one_hot_targets():
    """For a one-hot target there is a single transport plan: EMO (without target-mass subtraction) is the exact EMD."""
    logits, labels, embedding = make_inputs(batch=2, length=6, vocab=23, seed=2)
    labels[:] = torch.randint(0, 23, labels.shape)  # every position valid
    _, emo, _ = reference_emo_per_token(logits, labels, embedding, subtract_target_mass=False)
    cost = cost_matrix(embedding).numpy()
    q = torch.softmax(logits[:, :-1].double(), -1).reshape(-1, 23).numpy()
    targets = labels[:, 1:].reshape(-1).numpy()
    exact = []
    for q_row, y in zip(q, targets):
        p = np.zeros(23)
        p[y] = 1.0
        exact.append(ot.emd2(q_row / q_row.sum(), p, cost))
    exact = torch.tensor(exact, dtype=torch.float64)
    torch.testing.assert_close(emo, exact, rtol=1e-9, atol=1e-9)
    out = emo_loss(logits, labels, embedding, subtract_target_mass=False, weighting="mle")
    torch.testing.assert_close(out.emo.double(), exact.mean(), rtol=1e-5, atol=1e-6)


def test_gradient_matches_closed_form():
    """d loss / d z = ratio * (q - onehot) - q * (c - <q, c>) per token for emo_anchored (performance.md §3.2)."""
    logits, labels, embedding = make_inputs(batch=2, length=9, vocab=31, seed=3, dtype=torch.float64)
    logits.requires_grad_(True)
    out = emo_loss(logits, labels, embedding, weighting="emo_anchored")
    out.loss.backward()

    vocab = logits.shape[-1]
    z = logits.detach()[:, :-1].reshape(-1, vocab).double()
    y = labels[:, 1:].reshape(-1)
    valid = y != -100
    z, y = z[valid], y[valid]
    q = torch.softmax(z, -1)
    e_hat = torch.nn.functional.normalize(embedding.double(), dim=-1)
    c = e_hat[y] @ e_hat.T  # cos(e_v, e_y), c_y = 1
    qc = (q * c).sum(-1, keepdim=True)
    mle = -torch.log(q.gather(-1, y[:, None]))
    emo = 1 - qc + q.gather(-1, y[:, None])  # with the detached target mass
    ratio = emo / (mle + 1e-10)
    onehot = torch.nn.functional.one_hot(y, vocab).double()
    closed_form = (ratio * (q - onehot) - q * (c - qc)) / valid.sum()
    grad = logits.grad[:, :-1].reshape(-1, vocab)[valid]
    torch.testing.assert_close(grad.double(), closed_form, rtol=1e-4, atol=1e-7)
    # the last position has no target: no gradient there
    assert torch.all(logits.grad[:, -1] == 0)


@pytest.mark.parametrize("shape", [(1, 2, 3), (2, 5, 1271), (4, 1, 11), (3, 47, 13)])
def test_odd_shapes(shape):
    batch, length, vocab = shape
    logits, labels, embedding = make_inputs(batch, length, vocab, dim=4, seed=4)
    out = emo_loss(logits, labels, embedding)
    ref = reference_emo_loss(logits, labels, embedding) if vocab < 200 else None
    assert torch.isfinite(out.loss)
    if ref is not None:
        torch.testing.assert_close(out.loss.double(), ref, rtol=1e-5, atol=1e-6)


def test_other_ignore_index():
    logits, labels, embedding = make_inputs(ignore_index=7, seed=5)
    labels[labels == 7] = 8  # the id 7 now only marks ignored positions
    labels[0, :3] = 7
    out = emo_loss(logits, labels, embedding, ignore_index=7)
    ref = reference_emo_loss(logits, labels, embedding, ignore_index=7)
    torch.testing.assert_close(out.loss.double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_all_ignored_batch_is_finite_zero_with_zero_gradient(dtype):
    logits, labels, embedding = make_inputs(dtype=dtype)
    logits.requires_grad_(True)
    out = emo_loss(logits, torch.full_like(labels, -100), embedding)
    out.loss.backward()
    assert out.loss.item() == 0.0 and out.num_tokens.item() == 0
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() == 0


def test_num_items_in_batch_normalises_the_sum():
    logits, labels, embedding = make_inputs(seed=6)
    out = emo_loss(logits, labels, embedding)
    n = int(out.num_tokens)
    twice = emo_loss(logits, labels, embedding, num_items_in_batch=2 * n)
    torch.testing.assert_close(twice.loss, out.loss / 2)
    # logged means do not depend on the normaliser
    torch.testing.assert_close(twice.mle, out.mle)
    as_tensor = emo_loss(logits, labels, embedding, num_items_in_batch=torch.tensor(2 * n))
    torch.testing.assert_close(as_tensor.loss, twice.loss)


def test_loss_values_follow_the_documented_identities():
    """emo_anchored's value is 2*emo; unclamped mle_anchored's value is plain cross-entropy."""
    logits, labels, embedding = make_inputs(seed=7)
    anchored = emo_loss(logits, labels, embedding, weighting="emo_anchored")
    torch.testing.assert_close(anchored.loss, 2 * anchored.emo, rtol=1e-5, atol=1e-6)
    mle_anchored = emo_loss(logits, labels, embedding, weighting="mle_anchored")
    torch.testing.assert_close(mle_anchored.loss, mle_anchored.mle, rtol=1e-5, atol=1e-6)
    plain = emo_loss(logits, labels, embedding, weighting="mle")
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 37), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(plain.loss, ce)


def test_subtracting_target_mass_adds_q_y_and_keeps_the_gradient():
    logits, labels, embedding = make_inputs(seed=8, dtype=torch.float64)
    grads = {}
    for subtract in (True, False):
        x = logits.clone().requires_grad_(True)
        out = emo_loss(x, labels, embedding, weighting="mle", subtract_target_mass=subtract)
        # the EMO term alone: build it from the per-token reference for the value, autograd for the gradient
        mle, emo, valid = reference_emo_per_token(x, labels, embedding, subtract)
        (emo.sum() / valid.sum()).backward()
        grads[subtract] = x.grad
        assert out.emo.item() == pytest.approx((emo.sum() / valid.sum()).item(), rel=1e-6)
    torch.testing.assert_close(grads[True], grads[False])
    q_y = torch.softmax(logits[:, :-1].double(), -1).gather(-1, labels[:, 1:].clamp(min=0)[..., None]).squeeze(-1)
    q_y_mean = (q_y.reshape(-1) * (labels[:, 1:].reshape(-1) != -100)).sum() / (labels[:, 1:] != -100).sum()
    with_, without = (emo_loss(logits, labels, embedding, subtract_target_mass=s).emo for s in (True, False))
    torch.testing.assert_close(with_.double() - without.double(), q_y_mean, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("subtract", [True, False])
def test_emd_is_the_transport_cost_without_the_target_mass(subtract):
    """`emd` = sum_i q_i (1 - cos(e_i, e_y)), the explicit-cost-matrix transport cost, whatever `emo` adds to it."""
    logits, labels, embedding = make_inputs(seed=11, dtype=torch.float64)
    out = emo_loss(logits, labels, embedding, subtract_target_mass=subtract)
    _, transport, valid = reference_emo_per_token(logits, labels, embedding, subtract_target_mass=False)
    torch.testing.assert_close(out.emd, transport.sum() / valid.sum(), rtol=1e-9, atol=1e-12)
    if not subtract:
        torch.testing.assert_close(out.emd, out.emo)
    else:
        assert out.emo > out.emd  # emo adds the mean q_y


def test_reference_loss_runs_in_fp32_under_autocast():
    """Called inside the Trainer's bf16 autocast, emo_loss still computes in fp32 (its `q @ Ê` would go to bf16)."""
    logits, labels, embedding = make_inputs(batch=4, length=9, vocab=64, dim=16, seed=12)
    results = []
    for autocast in (False, True):
        x = logits.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = emo_loss(x, labels, embedding)
        out.loss.backward()
        results.append((out.loss, out.emo, x.grad))
    for exact, under_autocast in zip(*results):
        assert under_autocast.dtype == torch.float32
        torch.testing.assert_close(under_autocast, exact, rtol=0, atol=0)


def test_cost_embedding_width_may_differ_and_zero_rows_stay_finite():
    logits, labels, embedding = make_inputs(dim=3, seed=9)
    wide = torch.randn(37, 64)
    wide[5] = 0.0  # a padded vocabulary slot
    for e in (embedding, wide):
        x = logits.clone().requires_grad_(True)
        out = emo_loss(x, labels, e)
        out.loss.backward()
        assert torch.isfinite(out.loss) and torch.isfinite(x.grad).all()


def test_module_wrapper_matches_function():
    logits, labels, embedding = make_inputs(seed=10)
    module = EMOLoss(embedding, weighting="mle_anchored", ratio_clamp=3.0)
    a = module(logits, labels).loss
    b = emo_loss(logits, labels, embedding, weighting="mle_anchored", ratio_clamp=3.0).loss
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(logits=torch.zeros(2, 3, 5, dtype=torch.long)), "floating"),
        (dict(logits=torch.zeros(6, 5)), "batch, seq_len, vocab"),
        (dict(labels=torch.zeros(2, 4, dtype=torch.long)), "must match"),
        (dict(labels=torch.zeros(2, 3)), "integer"),
        (dict(cost_embedding=torch.zeros(6, 4)), "one row per token"),
        (dict(labels=torch.full((2, 3), 5)), r"\[0, 5\)"),
        (dict(labels=torch.full((2, 3), -3)), r"\[0, 5\)"),
    ],
)
def test_clear_errors(bad, message):
    inputs = dict(
        logits=torch.zeros(2, 3, 5), labels=torch.zeros(2, 3, dtype=torch.long), cost_embedding=torch.ones(5, 4)
    )
    inputs.update(bad)
    with pytest.raises(ValueError, match=message):
        emo_loss(**inputs)


def test_unknown_weighting_is_refused():
    logits, labels, embedding = make_inputs()
    with pytest.raises(ValueError, match="weighting"):
        emo_loss(logits, labels, embedding, weighting="emo3")


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 3),
    length=st.integers(2, 6),
    vocab=st.integers(2, 17),
    scale=st.sampled_from([0.0, 1.0, 30.0, 1e4]),
    shift=st.floats(-1e3, 1e3),
    subtract=st.booleans(),
    weighting=st.sampled_from(["emo_anchored", "mle_anchored", "mle"]),
    seed=st.integers(0, 2**16),
)
def test_properties(batch, length, vocab, scale, shift, subtract, weighting, seed):
    """Finite loss and gradient; emo in [0, 2] (+ q_y <= 1 when the target mass is subtracted); logits shift-invariant."""
    g = torch.Generator().manual_seed(seed)
    logits = (scale * torch.randn(batch, length, vocab, generator=g)).requires_grad_(True)
    labels = torch.randint(0, vocab, (batch, length), generator=g)
    labels[torch.rand(batch, length, generator=g) < 0.3] = -100
    embedding = torch.randn(vocab, 4, generator=g)
    out = emo_loss(logits, labels, embedding, weighting=weighting, subtract_target_mass=subtract)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(logits.grad).all()
    upper = 3.0 if subtract else 2.0
    assert -1e-5 <= out.emo.item() <= upper + 1e-5
    shifted = emo_loss(logits.detach() + shift, labels, embedding, weighting=weighting, subtract_target_mass=subtract)
    torch.testing.assert_close(shifted.emo, out.emo, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(shifted.mle, out.mle, rtol=1e-3, atol=1e-3)


def test_per_token_emo_stays_in_bounds_at_extremes():
    """Ties, huge and tiny logits: every token's emo stays within [0, 2] (or [0, 3] with the target mass)."""
    vocab = 9
    embedding = torch.randn(vocab, 3, generator=torch.Generator().manual_seed(11))
    rows = [torch.zeros(vocab), torch.full((vocab,), -1e30), torch.tensor([1e30] + [0.0] * (vocab - 1))]
    rows.append(torch.tensor([1e4, 1e4] + [-1e4] * (vocab - 2)))
    for row, target, subtract in itertools.product(rows, [0, 3], [True, False]):
        logits = torch.stack([row, row])[None]
        labels = torch.tensor([[target, target]])
        out = emo_loss(logits, labels, embedding, subtract_target_mass=subtract)
        assert torch.isfinite(out.loss) and 0.0 <= out.emo.item() <= (3.0 if subtract else 2.0) + 1e-6
