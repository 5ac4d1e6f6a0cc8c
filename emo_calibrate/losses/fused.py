"""A fused, token-chunked linear + EMO head: the EMO loss from hidden states, never building the (N, V) logits.

`emo_calibrate.losses.emo_loss` needs the full logits, and its autograd keeps about nine (N, V) fp32 tensors alive.
Here the tokens are processed in chunks of `n_c` rows. For each chunk, in the forward pass:

    X  = H_c W^T                      (GEMM 1, in the GEMM dtype, fp32 output)
    Z  = cap tanh(s X / cap) or s X   (the model's own logit soft cap / scale, if any)
    C  = Ê[y_c] Ê^T                   (GEMM 2, the one extra GEMM of EMO; cosines to each target. When Ê is the
                                       normalised head, GEMMs 1 and 2 are one stacked GEMM [H_c; Ŵ[y_c]] W^T)
    q  = softmax(Z) in place, lse, mle = lse - Z_y, entropy, accuracy
    emd = <q, 1 - C>;  emo = emd (+ q_y)
    dZ = a (q - onehot_y) - b q ⊙ (C - r)          (closed form, see below), then dX = dZ ⊙ dZ/dX (chain rule)
    dH_c = dX W                       (GEMM 3)       and, for a trainable head only, dW += dX^T H_c

so only two (n_c, V) fp32 buffers (one workspace reused by every chunk) exist at any time and the gradient is ready
when the forward returns; backward only scales it by the incoming gradient. EMO's gradient with respect to the logits
is -q ⊙ (c - <q, c>) whether or not the target's own mass is subtracted (that subtraction is detached), and the
detached per-token weight of the weighting turns the two gradients into

    emo_anchored: a = ratio, b = 1        mle_anchored: a = 1/2, b = ratio / 2        mle: a = 1, b = 0

(see ../shared/docs/performance.md, sections 3.2 and 3.3). The cost embedding never gets a gradient, also when it is
the output embedding itself ("adaptive" is detached in the reference too).

Precision. The GEMMs run in the GEMM dtype: the autocast dtype under autocast (the Trainer's bf16/fp16 mixed
precision), else the inputs' dtype. The head is used as it is when it already has that dtype (no copy), the GEMM
output is fp32 where the platform offers it (CUDA), and softmax, EMO and dZ are fp32 per chunk. dH is stored as the
gradient of the token SUM, O(1) per token, and divided by the normalizer only in backward, in fp32, together with the
incoming gradient: under fp16 the loss scaler's factor arrives before anything is rounded to fp16, so a dZ / N far
below fp16's smallest number survives. Under fp16 each row of dZ is also scaled by a power of two before its fp16
cast (undone exactly after the GEMM), so its small entries do not flush to zero either.
"""

import math

import torch

from .fused_chunks import inverse_row_norms, normalized_cost, run_chunks, scale_in_fp32_
from .reference import EMOLossOutput, Weighting, _autocast_off, reduce_per_token


__all__ = ["auto_chunk_size", "fused_linear_emo_loss"]

# Chunk rule: the chunk's fp32 working buffers (two (n_c, V) tensors: logits -> cosines -> dZ, and q) are sized to
# about the bytes of the hidden states, like Liger's fused linear cross-entropy keeps its logits chunk, within bounds.
# The lower bound differs by device. On CPU, 32 MiB already keeps the GEMMs efficient. On a GPU, small chunks are
# slow: the dH GEMM (n_c x V) @ (V x d) has a tiny output and a huge inner dimension, and each chunk launches ~40
# kernels. Measured on an H200 at N=16384, V=128256, d=4096, bf16: 128-token chunks (270 MiB) took 2.3x the time of
# a chunked cross-entropy, 1024-token chunks (1.2 GiB) 1.47x, 4096 tokens 1.41x. Hence at least 1 GiB off-CPU.
FP32_BUFFERS_PER_TOKEN = 2
MIN_CHUNK_BYTES = {"cpu": 32 * 2**20}
MIN_CHUNK_BYTES_ACCELERATOR = 1 * 2**30
MAX_CHUNK_BYTES = 2 * 2**30
MIN_CHUNK_TOKENS = 64  # fewer rows re-pack W too often (CPU, V=151936: 24-token chunks took 1.2x 48-token ones)


def auto_chunk_size(num_tokens: int, vocab_size: int, hidden_bytes: int, device_type: str = "cpu") -> int:
    """Tokens per chunk: two fp32 (n_c, V) buffers take about `hidden_bytes`, a multiple of 8, at least 64, at most N.

    The budget is bounded to [32 MiB, 2 GiB] on CPU and [1 GiB, 2 GiB] on accelerators (see the comment above).

    Args:
        num_tokens (`int`): N, the number of valid tokens.
        vocab_size (`int`): V.
        hidden_bytes (`int`): size in bytes of the (N, d) hidden states.
        device_type (`str`, *optional*, defaults to `"cpu"`): where the loss runs (`"cpu"`, `"cuda"`, ...).
    """
    lower = MIN_CHUNK_BYTES.get(device_type, MIN_CHUNK_BYTES_ACCELERATOR)
    budget = min(max(hidden_bytes, lower), MAX_CHUNK_BYTES)
    tokens = budget // (FP32_BUFFERS_PER_TOKEN * 4 * vocab_size)
    tokens = max(MIN_CHUNK_TOKENS, tokens // 8 * 8)
    return max(1, min(tokens, num_tokens))


class _FusedLinearEMO(torch.autograd.Function):
    """loss = sum_t objective_t / normalizer, with dH (and dW) computed in forward; backward scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, cost, inv_norm, opts, normalizer):
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        stats, d_hidden, d_weight = run_chunks(hidden, weight, targets, cost, inv_norm, opts, need_dh, need_dw)
        ctx.normalizer = normalizer
        ctx.d_hidden = d_hidden  # the gradient of the token sum (normalised in backward)
        # dW sums every token's contribution, which can exceed fp16's range: normalised now, in fp32, then stored in
        # W's dtype (a trainable fp16 head cannot be trained with a loss scaler anyway: its gradients are fp16).
        ctx.d_weight = None if d_weight is None else d_weight.div_(normalizer).to(weight.dtype)
        ctx.mark_non_differentiable(*stats)
        loss = stats[0].sum() / normalizer
        return (loss, *stats)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, *_unused):
        if ctx.d_hidden is None and ctx.d_weight is None and any(ctx.needs_input_grad[:2]):
            raise RuntimeError("fused_linear_emo_loss: backward can run only once per forward (no retain_graph).")
        # The stored gradients are ours (freed after this): scaled in place, in fp32, rounded once to their dtype.
        grad_loss = grad_loss.float()
        d_hidden = None if ctx.d_hidden is None else scale_in_fp32_(ctx.d_hidden, grad_loss / ctx.normalizer)
        d_weight = None if ctx.d_weight is None else scale_in_fp32_(ctx.d_weight, grad_loss)
        ctx.d_hidden = ctx.d_weight = None
        return d_hidden, d_weight, None, None, None, None, None


# ------------------------------------------------------------------------------------------------------------ public
def _check_inputs(hidden_states, weight, targets, cost_embedding, weighting, chunk_size, logit_scale, logit_softcap):
    if not torch.is_tensor(hidden_states) or hidden_states.dim() != 2 or not hidden_states.is_floating_point():
        raise ValueError(
            f"hidden_states must be a floating (N, d) tensor of the valid positions, got "
            f"{tuple(getattr(hidden_states, 'shape', ()))} {getattr(hidden_states, 'dtype', type(hidden_states))}"
        )
    if weight.dim() != 2 or weight.shape[1] != hidden_states.shape[1] or not weight.is_floating_point():
        raise ValueError(
            f"weight must be the floating (V, d) output embedding with d = {hidden_states.shape[1]} "
            f"(the hidden size), got {tuple(weight.shape)} {weight.dtype}"
        )
    if targets.shape != hidden_states.shape[:1] or targets.is_floating_point():
        raise ValueError(
            f"targets must be integer token ids shaped (N,) = ({hidden_states.shape[0]},), got "
            f"{tuple(targets.shape)} {targets.dtype}. Drop ignored positions before calling."
        )
    if weight.device != hidden_states.device:
        raise ValueError(f"weight is on {weight.device} but hidden_states on {hidden_states.device}: move one of them")
    if cost_embedding is not None and (
        cost_embedding.dim() != 2
        or cost_embedding.shape[0] != weight.shape[0]
        or not cost_embedding.is_floating_point()
    ):
        raise ValueError(
            f"cost_embedding must be a floating (V, d') matrix with V = {weight.shape[0]} rows (one per token of the "
            f"output embedding), got {tuple(cost_embedding.shape)} {cost_embedding.dtype}"
        )
    if weighting not in ("emo_anchored", "mle_anchored", "mle"):
        raise ValueError(f"weighting must be one of 'emo_anchored', 'mle_anchored', 'mle', got {weighting!r}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None (automatic), got {chunk_size!r}")
    if not (isinstance(logit_scale, int | float) and math.isfinite(logit_scale) and logit_scale != 0):
        raise ValueError(f"logit_scale must be a finite, non-zero number, got {logit_scale!r}")
    if logit_softcap is not None and not (isinstance(logit_softcap, int | float) and 0 < logit_softcap < math.inf):
        raise ValueError(f"logit_softcap must be a positive number or None, got {logit_softcap!r}")
    if targets.numel() and (targets.min() < 0 or targets.max() >= weight.shape[0]):
        raise ValueError(
            f"targets must be in [0, {weight.shape[0]}); found {targets.min().item()}..{targets.max().item()}"
        )


def fused_linear_emo_loss(
    hidden_states: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    cost_embedding: torch.Tensor | None = None,
    weighting: Weighting = "emo_anchored",
    ratio_clamp: float | None = None,
    subtract_target_mass: bool = True,
    num_items_in_batch: int | torch.Tensor | None = None,
    chunk_size: int | None = None,
    logit_scale: float = 1.0,
    logit_softcap: float | None = None,
) -> EMOLossOutput:
    """EMO loss of the logits `transform(hidden_states @ weight.T)` against `targets`, in token chunks without the
    (N, V) logits.

    Equal to [`~emo_calibrate.losses.emo_loss`] on those logits (same fields and meaning), with the gradient computed
    in the forward pass: peak extra memory is two fp32 (chunk_size, V) buffers, dH (N, d) and, for a trainable head
    only, an fp32 (V, d) accumulator. See the module docstring for the dtypes.

    Args:
        hidden_states (`torch.Tensor` of shape `(N, d)`):
            Last hidden states of the positions that have a target (ignored positions already dropped), model dtype.
        weight (`torch.Tensor` of shape `(V, d)`):
            Output-embedding (`lm_head`) weight. It gets a gradient only if it requires one.
        targets (`torch.Tensor` of shape `(N,)`):
            Integer target ids in `[0, V)`, all valid.
        cost_embedding (`torch.Tensor` of shape `(V, d')`, *optional*):
            Raw embedding defining the cost `1 - cos`, normalised here (cached while the tensor is unchanged). `None`
            means the output embedding itself, normalised on the fly from `weight` and V inverse row norms (no second
            V x d copy). Never gets a gradient.
        weighting (`str`, *optional*, defaults to `"emo_anchored"`), ratio_clamp (`float`, *optional*),
        subtract_target_mass (`bool`, *optional*, defaults to `True`):
            As in [`~emo_calibrate.loss.emo_loss`].
        num_items_in_batch (`int` or `torch.Tensor`, *optional*):
            Normalizer of the loss (valid targets across the gradient-accumulation window); `None` means N. At least 1.
        chunk_size (`int`, *optional*):
            Tokens per chunk. `None` picks it with [`auto_chunk_size`]: the two fp32 (chunk, V) buffers take about the
            bytes of `hidden_states`, bounded to [32 MiB, 2 GiB] on CPU and [1 GiB, 2 GiB] on a GPU.
        logit_scale (`float`, *optional*, defaults to `1.0`), logit_softcap (`float`, *optional*):
            The model's output transform: logits = `logit_softcap * tanh(logit_scale * x / logit_softcap)` with
            `x = hidden_states @ weight.T`, or `logit_scale * x` without a soft cap (Gemma 2's
            `final_logit_softcapping`, Cohere's `logit_scale`, 1 / Granite's `logits_scaling`; see
            [`~emo_calibrate.losses.output_logit_transform`]).

    Returns:
        [`~emo_calibrate.loss.EMOLossOutput`]: `loss` carries the gradient to `hidden_states` (and `weight`).
    """
    _check_inputs(hidden_states, weight, targets, cost_embedding, weighting, chunk_size, logit_scale, logit_softcap)
    num_tokens = hidden_states.shape[0]
    device_type = hidden_states.device.type
    # GEMMs run in the model dtype, or in the autocast dtype when the caller runs under autocast (the Trainer's mixed
    # precision): the dtype the model's own head would use.
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        compute_dtype = torch.get_autocast_dtype(device_type)
    else:
        compute_dtype = torch.promote_types(hidden_states.dtype, weight.dtype)
    if chunk_size is None:
        hidden_bytes = hidden_states.numel() * hidden_states.element_size()
        chunk_size = auto_chunk_size(num_tokens, weight.shape[0], hidden_bytes, device_type)
    opts = dict(
        weighting=weighting,
        ratio_clamp=ratio_clamp,
        subtract_target_mass=subtract_target_mass,
        compute_dtype=compute_dtype,
        chunk_size=max(1, chunk_size),
        logit_scale=float(logit_scale),
        logit_softcap=None if logit_softcap is None else float(logit_softcap),
    )
    if cost_embedding is None:
        cost, inv_norm = None, inverse_row_norms(weight)
    else:
        cost, inv_norm = normalized_cost(cost_embedding, compute_dtype, hidden_states.device), None
    targets = targets.to(hidden_states.device)
    num_valid = torch.tensor(num_tokens, device=hidden_states.device)
    normalizer = num_valid if num_items_in_batch is None else num_items_in_batch
    normalizer = torch.as_tensor(normalizer, device=hidden_states.device, dtype=torch.float32).clamp(min=1)

    grad_wanted = torch.is_grad_enabled() and (hidden_states.requires_grad or weight.requires_grad)
    with _autocast_off(device_type):
        if grad_wanted:
            loss, *stats = _FusedLinearEMO.apply(hidden_states, weight, targets, cost, inv_norm, opts, normalizer)
        else:
            with torch.no_grad():
                stats, _, _ = run_chunks(hidden_states, weight, targets, cost, inv_norm, opts, False, False)
            loss = None
    out = reduce_per_token(*stats, num_valid, num_items_in_batch)
    if loss is not None:
        out.loss = loss
    return out
