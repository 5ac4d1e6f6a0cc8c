"""The fused linear+EMO head equals the reference `emo_loss` on the full logits `H W^T`, values and gradients."""

import pytest
import torch

from emo_calibrate.losses import fused_chunks
from emo_calibrate.losses.fused import auto_chunk_size, fused_linear_emo_loss
from emo_calibrate.losses.output_head import fused_head_unsupported_reason, output_logit_transform
from emo_calibrate.losses.reference import emo_loss


FIELDS = ("loss", "mle", "emo", "emd", "ratio", "entropy", "accuracy")
VARIANTS = [  # (weighting, ratio_clamp): the clamp of 2.0 is active on these shapes (mle/emo is about 3-5)
    ("emo_anchored", None),
    ("mle_anchored", None),
    ("mle_anchored", 2.0),
    ("mle", None),
]


def make_inputs(n=37, vocab=101, dim=16, cost_dim=24, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, dim, generator=gen)
    weight = torch.randn(vocab, dim, generator=gen) * 0.6
    weight[7] = 0.0  # an all-zero (padded) row must neither produce NaN nor differ from the reference
    cost = torch.randn(vocab, cost_dim, generator=gen)
    # Targets include the zero row and repeats, so gathers and scatters meet duplicate indices.
    targets = torch.randint(0, vocab, (n,), generator=gen)
    targets[:3] = torch.tensor([7, 7, 3])[: min(3, n)] if n else targets[:0]
    return hidden.to(dtype), weight.to(dtype), targets, cost


def reference(
    hidden, weight, targets, cost, grad_scale=1.0, logit_scale=1.0, logit_softcap=None, dtype=None, **options
):
    """emo_loss on fp32 (or `dtype`) logits built from the same (possibly low-precision) values, with the model's
    logit transform applied by autograd; gradients w.r.t. H and W."""
    dtype = dtype or torch.float32
    h = hidden.detach().to(dtype).requires_grad_()
    w = weight.detach().to(dtype).requires_grad_()
    logits = (h @ w.t()) * logit_scale
    if logit_softcap is not None:
        logits = logit_softcap * torch.tanh(logits / logit_softcap)
    # emo_loss shifts: logits at t predict labels at t+1, so pad one dummy row and one ignored leading label.
    logits = torch.cat([logits, logits.new_zeros(1, logits.shape[1])])[None]
    labels = torch.cat([torch.tensor([-100]), targets])[None]
    out = emo_loss(logits, labels, w.detach() if cost is None else cost.to(dtype), **options)
    (out.loss * grad_scale).backward()
    return out, h.grad, w.grad


def run_fused(hidden, weight, targets, cost, grad_scale=1.0, train_head=True, **options):
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_(train_head)
    out = fused_linear_emo_loss(h, w, targets, cost_embedding=cost, **options)
    (out.loss * grad_scale).backward()
    return out, h.grad, w.grad


def assert_matches(out, ref, tol, grad_tol, grads=(), ref_grads=()):
    for field in FIELDS:
        got, want = getattr(out, field).float(), getattr(ref, field).float()
        torch.testing.assert_close(got, want, rtol=tol, atol=tol, msg=lambda m, f=field: f"{f}: {m}")
    assert int(out.num_tokens) == int(ref.num_tokens)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.float(), want, rtol=grad_tol, atol=grad_tol * want.abs().max().item())


@pytest.mark.parametrize("weighting,ratio_clamp", VARIANTS)
@pytest.mark.parametrize("subtract_target_mass", [True, False])
@pytest.mark.parametrize("external_cost", [False, True])
def test_fp32_matches_reference(weighting, ratio_clamp, subtract_target_mass, external_cost):
    hidden, weight, targets, cost = make_inputs()
    cost = cost if external_cost else None
    options = dict(weighting=weighting, ratio_clamp=ratio_clamp, subtract_target_mass=subtract_target_mass)
    ref, ref_dh, ref_dw = reference(hidden, weight, targets, cost, **options)
    out, dh, dw = run_fused(hidden, weight, targets, cost, chunk_size=8, **options)  # 8 does not divide 37
    assert_matches(out, ref, 1e-5, 1e-5, (dh, dw), (ref_dh, ref_dw))


TRANSFORMS = [(1.0, 30.0), (0.0625, None), (1 / 8, None), (3.0, 5.0)]  # Gemma 2, Cohere, Granite, both


@pytest.mark.parametrize("logit_scale,logit_softcap", TRANSFORMS)
@pytest.mark.parametrize("weighting,ratio_clamp", VARIANTS[:3])
@pytest.mark.parametrize("external_cost", [False, True])
def test_logit_transform_matches_reference(logit_scale, logit_softcap, weighting, ratio_clamp, external_cost):
    """Soft-capped or scaled logits: values, dH and dW equal autograd through the transform (the chain rule)."""
    hidden, weight, targets, cost = make_inputs()
    hidden = hidden * 3  # large logits, so that a cap of 5 saturates some of them
    cost = cost if external_cost else None
    options = dict(weighting=weighting, ratio_clamp=ratio_clamp, logit_scale=logit_scale, logit_softcap=logit_softcap)
    ref, ref_dh, ref_dw = reference(hidden, weight, targets, cost, **options)
    out, dh, dw = run_fused(hidden, weight, targets, cost, chunk_size=8, **options)
    assert_matches(out, ref, 1e-5, 1e-5, (dh, dw), (ref_dh, ref_dw))


@pytest.mark.parametrize("logit_scale,logit_softcap", TRANSFORMS[:2])
def test_logit_transform_in_bf16(logit_scale, logit_softcap):
    hidden, weight, targets, cost = make_inputs(n=64, vocab=211, dim=32, dtype=torch.bfloat16)
    options = dict(logit_scale=logit_scale, logit_softcap=logit_softcap)
    ref, ref_dh, ref_dw = reference(hidden, weight, targets, None, **options)
    out, dh, dw = run_fused(hidden, weight, targets, None, chunk_size=24, **options)
    assert abs(out.accuracy - ref.accuracy) <= 1 / 64 + 1e-6
    out.accuracy = ref.accuracy
    assert_matches(out, ref, 5e-3, 3e-2, (dh, dw), (ref_dh, ref_dw))


@pytest.mark.parametrize("weighting", ["emo_anchored", "mle_anchored"])
@pytest.mark.parametrize("loss_scale", [2.0**15, 2.0**16])  # 2^16 is GradScaler's initial scale (inf in fp16)
def test_fp16_gradients_survive_a_large_normalizer_and_loss_scaling(weighting, loss_scale):
    """Under fp16 the loss scaler multiplies the loss by S in backward; dZ / N must not flush to zero before that.

    N = 2^20 valid tokens in the accumulation window: dZ / N is ~1e-7..1e-12, below fp16's smallest number (6e-8),
    while S dZ / N is well inside fp16's range. Compared with the fp64 reference gradient."""
    hidden, weight, targets, _ = make_inputs(n=64, vocab=211, dim=32)
    hidden[:16] *= 4  # some confident tokens: 1 - q_y, and with it most of their dZ, is tiny
    hidden, weight = hidden.half(), weight.half()
    options = dict(weighting=weighting, num_items_in_batch=2**20)
    _, ref_dh, _ = reference(hidden, weight, targets, None, grad_scale=loss_scale, dtype=torch.float64, **options)
    _, dh, _ = run_fused(
        hidden, weight, targets, None, grad_scale=loss_scale, train_head=False, chunk_size=24, **options
    )
    assert dh.dtype == torch.float16 and torch.isfinite(dh).all()
    representable = ref_dh.abs() > 2.0**-24  # fp16's smallest subnormal
    flushed = (dh == 0) & representable
    assert not flushed.any(), f"{int(flushed.sum())} of {int(representable.sum())} dH entries flushed to zero"
    error = (dh.double() - ref_dh).norm() / ref_dh.norm()
    assert error < 5e-3, error


def test_ratio_clamp_is_active_in_the_variants():
    hidden, weight, targets, _ = make_inputs()
    clamped, _, _ = reference(hidden, weight, targets, None, weighting="mle_anchored", ratio_clamp=2.0)
    free, _, _ = reference(hidden, weight, targets, None, weighting="mle_anchored")
    assert clamped.ratio < free.ratio - 0.1


@pytest.mark.parametrize("dtype,tol,grad_tol", [(torch.bfloat16, 5e-3, 3e-2), (torch.float16, 1e-3, 5e-3)])
@pytest.mark.parametrize("weighting,ratio_clamp", VARIANTS)
@pytest.mark.parametrize("external_cost", [False, True])
def test_low_precision_matches_fp32_reference(dtype, tol, grad_tol, weighting, ratio_clamp, external_cost):
    hidden, weight, targets, cost = make_inputs(n=64, vocab=211, dim=32, dtype=dtype)
    cost = cost if external_cost else None
    options = dict(weighting=weighting, ratio_clamp=ratio_clamp)
    ref, ref_dh, ref_dw = reference(hidden, weight, targets, cost, **options)
    out, dh, dw = run_fused(hidden, weight, targets, cost, chunk_size=24, **options)
    assert dh.dtype == dtype and dw.dtype == dtype and out.loss.dtype == torch.float32
    # The arg-max can flip on a near-tie after low-precision rounding of the logits: allow one token in 64.
    assert abs(out.accuracy - ref.accuracy) <= 1 / 64 + 1e-6
    out.accuracy = ref.accuracy
    assert_matches(out, ref, tol, grad_tol, (dh, dw), (ref_dh, ref_dw))


@pytest.mark.parametrize("n,chunk_size", [(37, 1), (37, 5), (40, 8), (37, 36), (37, 37), (5, 64), (37, None)])
def test_chunk_boundaries(n, chunk_size):
    hidden, weight, targets, cost = make_inputs(n=n)
    ref, ref_dh, ref_dw = reference(hidden, weight, targets, cost)
    out, dh, dw = run_fused(hidden, weight, targets, cost, chunk_size=chunk_size)
    assert_matches(out, ref, 1e-5, 1e-5, (dh, dw), (ref_dh, ref_dw))


def test_num_items_in_batch_and_non_unit_grad_output():
    hidden, weight, targets, _ = make_inputs()
    options = dict(weighting="mle_anchored", num_items_in_batch=100)
    ref, ref_dh, ref_dw = reference(hidden, weight, targets, None, grad_scale=-2.5, **options)
    out, dh, dw = run_fused(hidden, weight, targets, None, grad_scale=-2.5, chunk_size=6, **options)
    assert_matches(out, ref, 1e-5, 1e-5, (dh, dw), (ref_dh, ref_dw))
    # sum / 100 rather than the mean over the 37 tokens
    mean = fused_linear_emo_loss(hidden, weight, targets, weighting="mle_anchored").loss
    torch.testing.assert_close(out.loss * 100, mean * 37)


def test_num_items_in_batch_as_tensor():
    hidden, weight, targets, _ = make_inputs()
    a = fused_linear_emo_loss(hidden, weight, targets, num_items_in_batch=torch.tensor(50)).loss
    b = fused_linear_emo_loss(hidden, weight, targets, num_items_in_batch=50).loss
    torch.testing.assert_close(a, b)


def test_empty_input_gives_zero_loss_and_backward_works():
    hidden, weight, targets, _ = make_inputs(n=0)
    h, w = hidden.requires_grad_(), weight.requires_grad_()
    out = fused_linear_emo_loss(h, w, targets)
    assert out.loss.item() == 0.0 and int(out.num_tokens) == 0
    assert out.mle.item() == 0.0 and out.accuracy.item() == 0.0
    out.loss.backward()
    assert h.grad.shape == (0, 16)
    assert w.grad is not None and not w.grad.any()


def test_frozen_head_gets_no_weight_gradient_and_skips_the_work(monkeypatch):
    calls = []
    monkeypatch.setattr(fused_chunks, "_addmm_fp32_", lambda *args: calls.append(1))
    hidden, weight, targets, _ = make_inputs()
    ref, ref_dh, _ = reference(hidden, weight, targets, None)
    out, dh, dw = run_fused(hidden, weight, targets, None, train_head=False, chunk_size=8)
    assert dw is None and not calls
    assert_matches(out, ref, 1e-5, 1e-5, (dh,), (ref_dh,))


def test_head_gradient_only():
    hidden, weight, targets, _ = make_inputs()
    _, _, ref_dw = reference(hidden, weight, targets, None)
    w = weight.clone().requires_grad_()
    fused_linear_emo_loss(hidden, w, targets, chunk_size=8).loss.backward()
    torch.testing.assert_close(w.grad, ref_dw, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["no_grad", "inputs_without_grad"])
def test_no_gradient_work_when_no_gradient_is_needed(monkeypatch, mode):
    seen = []
    original = fused_chunks._emo_chunk

    def spy(h, y, weight, cost, inv_norm, opts, need_grad, workspace):
        seen.append(need_grad)
        return original(h, y, weight, cost, inv_norm, opts, need_grad, workspace)

    monkeypatch.setattr(fused_chunks, "_emo_chunk", spy)
    hidden, weight, targets, _ = make_inputs()
    if mode == "no_grad":
        hidden.requires_grad_()
        with torch.no_grad():
            out = fused_linear_emo_loss(hidden, weight.requires_grad_(), targets, chunk_size=8)
    else:
        out = fused_linear_emo_loss(hidden, weight, targets, chunk_size=8)
    assert seen == [False] * 5
    assert out.loss.grad_fn is None and not out.loss.requires_grad
    ref, _, _ = reference(hidden, weight, targets, None)
    assert_matches(out, ref, 1e-5, 1e-5)


def test_backward_twice_raises():
    hidden, weight, targets, _ = make_inputs()
    out = fused_linear_emo_loss(hidden.requires_grad_(), weight, targets)
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only once"):
        out.loss.backward()


def test_external_cost_cache_follows_in_place_changes():
    hidden, weight, targets, cost = make_inputs()
    first = fused_linear_emo_loss(hidden, weight, targets, cost_embedding=cost)
    torch.testing.assert_close(first.emo, reference(hidden, weight, targets, cost)[0].emo)
    with torch.no_grad():
        cost[:, :5] *= 4.0  # in place: bumps the version counter, so the cache must be rebuilt
    second = fused_linear_emo_loss(hidden, weight, targets, cost_embedding=cost)
    torch.testing.assert_close(second.emo, reference(hidden, weight, targets, cost)[0].emo)
    assert not torch.isclose(first.emo, second.emo)


def test_caches_follow_data_swaps():
    """`param.data = new` (as checkpoint loading can do) swaps the storage without bumping the version counter."""
    hidden, weight, targets, cost = make_inputs()
    head = torch.nn.Parameter(weight.clone(), requires_grad=False)
    external = cost.clone()
    fused_linear_emo_loss(hidden, head, targets)
    fused_linear_emo_loss(hidden, weight, targets, cost_embedding=external)
    head.data = weight * torch.linspace(0.5, 2.0, weight.shape[1])
    external.data = cost * torch.linspace(0.5, 2.0, cost.shape[1])
    for cost_embedding in (None, external):
        got = fused_linear_emo_loss(hidden, head, targets, cost_embedding=cost_embedding).emo
        torch.testing.assert_close(got, reference(hidden, head, targets, cost_embedding)[0].emo)
    assert not torch.isclose(got, fused_linear_emo_loss(hidden, head, targets, cost_embedding=cost).emo)


def test_trainable_head_cost_follows_optimizer_updates():
    """With cost_embedding=None the cost is the CURRENT normalised head, also after an in-place optimizer step."""
    hidden, weight, targets, _ = make_inputs()
    w = torch.nn.Parameter(weight.clone())
    optimizer = torch.optim.SGD([w], lr=5.0)
    for _ in range(2):
        out = fused_linear_emo_loss(hidden, w, targets)
        torch.testing.assert_close(out.emo, reference(hidden, w, targets, None)[0].emo)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def test_autocast_runs_the_gemms_in_the_autocast_dtype():
    hidden, weight, targets, _ = make_inputs()
    h = hidden.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fused_linear_emo_loss(h, weight, targets)
    out.loss.backward()
    exact = fused_linear_emo_loss(hidden, weight, targets)
    assert h.grad.dtype == torch.float32
    assert not torch.equal(out.mle, exact.mle)  # the logits were computed in bf16 ...
    torch.testing.assert_close(out.mle, exact.mle, rtol=3e-2, atol=3e-2)  # ... and agree loosely


def test_bad_inputs_raise_clear_errors():
    hidden, weight, targets, cost = make_inputs()
    with pytest.raises(ValueError, match="targets must be in"):
        fused_linear_emo_loss(hidden, weight, targets + 1000)
    with pytest.raises(ValueError, match="hidden size"):
        fused_linear_emo_loss(hidden, weight[:, :8], targets)
    with pytest.raises(ValueError, match=r"shaped \(N,\)"):
        fused_linear_emo_loss(hidden, weight, targets[:-1])
    with pytest.raises(ValueError, match="one per token"):
        fused_linear_emo_loss(hidden, weight, targets, cost_embedding=cost[:-1])
    with pytest.raises(ValueError, match="weighting"):
        fused_linear_emo_loss(hidden, weight, targets, weighting="emo")
    with pytest.raises(ValueError, match="chunk_size"):
        fused_linear_emo_loss(hidden, weight, targets, chunk_size=0)


def test_auto_chunk_size_rule():
    # Two fp32 (n, V) buffers ~ the hidden states' bytes, at least 32 MiB on CPU and 64 tokens, never above N.
    assert auto_chunk_size(4096, 32000, 4096 * 1024 * 4) == 128
    assert auto_chunk_size(16384, 128256, 16384 * 4096 * 2) == 128
    assert auto_chunk_size(2048, 151936, 2048 * 896 * 4) == 64  # 32 MiB would be 27 tokens: at least 64
    assert auto_chunk_size(2048, 49152, 2048 * 576 * 4) == 80
    assert auto_chunk_size(5, 32000, 5 * 64 * 4) == 5
    assert auto_chunk_size(0, 32000, 0) == 1
    # On a GPU the buffers get at least 1 GiB: small chunks leave the dH GEMM and the launches inefficient.
    assert auto_chunk_size(16384, 128256, 16384 * 4096 * 2, "cuda") == 1040
    assert auto_chunk_size(100_000, 32000, 2**40, "cuda") == 2 * 2**30 // (8 * 32000) // 8 * 8


# ------------------------------------------------------------------------------------- fused_head_unsupported_reason
def test_unsupported_reason_plain_and_lora_models():
    from peft import LoraConfig, get_peft_model
    from tiny_models import build_tiny_model

    model = build_tiny_model("llama")
    assert fused_head_unsupported_reason(model) is None
    lora = get_peft_model(build_tiny_model("llama"), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert fused_head_unsupported_reason(lora) is None
    saved = get_peft_model(
        build_tiny_model("llama"), LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"])
    )
    assert fused_head_unsupported_reason(saved) is None
    head_lora = get_peft_model(build_tiny_model("llama"), LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    assert "PEFT adapter" in fused_head_unsupported_reason(head_lora)


@pytest.mark.parametrize(
    "attribute,value,expected",
    [
        ("final_logit_softcapping", 30.0, (1.0, 30.0)),
        ("logit_scale", 0.0625, (0.0625, None)),
        ("logits_scaling", 8.0, (0.125, None)),
        ("output_multiplier", 0.5, (0.5, None)),
        ("lm_head_multiplier", 2.0, (2.0, None)),
        ("logits_scaling", 1.0, (1.0, None)),
        ("logit_scale", None, (1.0, None)),
    ],
)
def test_output_logit_transform_from_the_config(attribute, value, expected):
    """Soft caps and logit scales are applied by the fused head itself: no longer a reason to fall back."""
    from tiny_models import build_tiny_model

    model = build_tiny_model("llama")
    setattr(model.config, attribute, value)
    assert output_logit_transform(model) == expected
    assert fused_head_unsupported_reason(model) is None
    model.config.model_type = "hyperclovax"  # multiplies by logits_scaling where Granite divides
    if attribute == "logits_scaling":
        assert output_logit_transform(model) == (value, None)


def test_unsupported_reason_head_shapes():
    from tiny_models import build_tiny_model

    model = build_tiny_model("llama")
    model.lm_head.bias = torch.nn.Parameter(torch.zeros(model.lm_head.out_features))
    assert "bias" in fused_head_unsupported_reason(model)
    model = build_tiny_model("llama")
    model.lm_head = torch.nn.Sequential(model.lm_head)
    assert "weight" in fused_head_unsupported_reason(model)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("external_cost", [False, True])
def test_cuda_matches_reference(dtype, external_cost):
    hidden, weight, targets, cost = make_inputs(n=300, vocab=1031, dim=64, dtype=dtype)
    cost = cost if external_cost else None
    ref, ref_dh, ref_dw = reference(hidden, weight, targets, cost)
    to = lambda t: None if t is None else t.cuda()  # noqa: E731
    h = hidden.cuda().requires_grad_()
    w = weight.cuda().requires_grad_()
    out = fused_linear_emo_loss(h, w, targets.cuda(), cost_embedding=to(cost), chunk_size=64)
    out.loss.backward()
    tol, grad_tol = (1e-4, 1e-4) if dtype == torch.float32 else (3e-2, 6e-2)
    out.accuracy = ref.accuracy.cuda() if abs(out.accuracy.item() - ref.accuracy.item()) <= 2 / 300 else out.accuracy
    for field in FIELDS:
        torch.testing.assert_close(getattr(out, field).float().cpu(), getattr(ref, field), rtol=tol, atol=tol)
    for got, want in ((h.grad, ref_dh), (w.grad, ref_dw)):
        torch.testing.assert_close(got.float().cpu(), want, rtol=grad_tol, atol=grad_tol * want.abs().max().item())
