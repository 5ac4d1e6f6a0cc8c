"""A fused, token-chunked linear + EMO head: the EMO loss from hidden states, never building the (N, V) logits.

`emo_calibrate.loss.emo_loss` needs the full logits, and its autograd keeps about nine (N, V) fp32 tensors alive.
Here the tokens are processed in chunks of `n_c` rows. For each chunk, in the forward pass:

    Z  = H_c W^T                      (GEMM 1, model dtype, fp32 output)
    C  = Ê[y_c] Ê^T                   (GEMM 2, the one extra GEMM of EMO; cosines to each target. When Ê is the
                                       normalised head, GEMMs 1 and 2 are one stacked GEMM [H_c; Ŵ[y_c]] W^T)
    q  = softmax(Z) in place, lse, mle = lse - Z_y, entropy, accuracy
    r  = <q, C>;  emo = 1 - r (+ q_y)
    dZ = a (q - onehot_y) - b q ⊙ (C - r)          (closed form, see below)
    dH_c = dZ W                       (GEMM 3)       and, for a trainable head only, dW += dZ^T H_c

so only two (n_c, V) fp32 buffers (one workspace reused by every chunk) exist at any time and the gradient is ready when the forward returns; backward
only scales it by the incoming gradient. EMO's gradient with respect to the logits is -q ⊙ (c - <q, c>) whether or
not the target's own mass is subtracted (that subtraction is detached), and the detached per-token weight of the
weighting turns the two gradients into

    emo_anchored: a = ratio, b = 1        mle_anchored: a = 1/2, b = ratio / 2        mle: a = 1, b = 0

(see ../shared/docs/performance.md, sections 3.2 and 3.3). The cost embedding never gets a gradient, also when it is
the output embedding itself ("adaptive" is detached in the reference too).
"""

import weakref

import torch
import torch.nn.functional as F

from .fused_support import fused_head_unsupported_reason
from .loss import EMOLossOutput, Weighting, reduce_per_token, weight_per_token


__all__ = ["auto_chunk_size", "fused_head_unsupported_reason", "fused_linear_emo_loss"]

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
_CPU_BLOCK_BYTES = 512 * 2**10

# `torch.mm(..., out_dtype=torch.float32)` from bf16/fp16 inputs exists on CUDA only.
_CUDA_OUT_DTYPE = hasattr(torch.ops.aten.mm, "dtype_out")


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


# ----------------------------------------------------------------------------------------------------------- caches
# One entry per kind, keyed by the source tensor's identity, its in-place version counter (bumped by in-place
# writes such as load_state_dict's copy_), its storage address (`param.data = new` swaps the storage without a
# bump, as checkpoint loading can), dtype and device. Trainable heads are not cached: they change every step.
_CACHE: dict[str, tuple] = {}


def _cached(kind: str, source: torch.Tensor, dtype: torch.dtype, device: torch.device, build):
    entry = _CACHE.get(kind)
    key = (source._version, source.data_ptr(), dtype, source.device, device)
    if entry is not None and entry[0]() is source and entry[1] == key:
        return entry[2]
    value = build()

    def forget(ref):  # drop the cached copy with its source, unless a newer entry replaced it
        if _CACHE.get(kind, (None,))[0] is ref:
            del _CACHE[kind]

    _CACHE[kind] = (weakref.ref(source, forget), key, value)
    return value


def _inverse_row_norms(weight: torch.Tensor) -> torch.Tensor:
    """(V,) fp32 `1 / max(||w_v||, 1e-12)`, the factor `F.normalize` applies, computed in row blocks (no fp32 copy)."""

    def build():
        with torch.no_grad():
            weight_ = weight.detach()
            inv = torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device)
            for start in range(0, weight.shape[0], 16384):
                rows = weight_[start : start + 16384]
                inv[start : start + 16384] = torch.linalg.vector_norm(rows, dim=-1, dtype=torch.float32)
            return inv.clamp_(min=1e-12).reciprocal_()

    if weight.requires_grad:
        return build()
    return _cached("inverse_row_norms", weight, torch.float32, weight.device, build)


def _normalized_cost(cost_embedding: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Rows of an external (V, d') cost embedding L2-normalised in fp32, then cast to the GEMM dtype and device."""

    def build():
        with torch.no_grad():
            return F.normalize(cost_embedding.detach().to(device).float(), dim=-1, eps=1e-12).to(dtype)

    return _cached("cost_embedding", cost_embedding, dtype, device, build)


# ------------------------------------------------------------------------------------------------------ GEMM helpers
def _mm_into(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out (fp32) = a @ b, with a and b in the model dtype: fp32 output straight from the GEMM where supported."""
    if a.dtype == torch.float32:
        return torch.mm(a, b, out=out)
    if _CUDA_OUT_DTYPE and out.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32, out=out)
    # CPU: low-precision GEMM (fp32 accumulation inside, output rounded once), in 4 row blocks to bound the temporary.
    rows = max(1, -(-a.shape[0] // 4))
    for start in range(0, a.shape[0], rows):
        out[start : start + rows].copy_(torch.mm(a[start : start + rows], b))
    return out


def _addmm_fp32_(acc: torch.Tensor, a_low: torch.Tensor, a_fp32: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += a @ b without rounding the product to the model dtype first (dW accumulation)."""
    if a_low.dtype != torch.float32 and _CUDA_OUT_DTYPE and acc.is_cuda:
        torch.addmm(acc, a_low, b, out_dtype=torch.float32, out=acc)
    else:
        acc.addmm_(a_fp32, b.float())


def _row_blocks(n: int, vocab: int, device: torch.device) -> int:
    """Rows per block for row-local passes: on CPU a block of fp32 rows fits in the L2 cache (a pass per block is
    several times faster than one pass over the whole chunk); elsewhere four blocks, so few kernels are launched."""
    if device.type == "cpu":
        return max(1, _CPU_BLOCK_BYTES // (4 * vocab))
    return max(1, -(-n // 4))


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise dot product of two (n, V) fp32 tensors, (n,), without an (n, V) temporary."""
    n, vocab = a.shape
    if a.device.type != "cpu":
        return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(n)  # one batched GEMV
    rows = _row_blocks(n, vocab, a.device)
    out = torch.empty(n, dtype=a.dtype, device=a.device)
    for start in range(0, n, rows):
        torch.sum(a[start : start + rows] * b[start : start + rows], dim=-1, out=out[start : start + rows])
    return out


def _softmax_(z: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Turn (n, V) fp32 logits into q = softmax(z) IN PLACE, by row blocks; returns (mle, entropy, argmax), each (n,).

    In place, so that the logits and the cosines can come from one stacked GEMM while only two (n, V) buffers exist.
    Everything is taken relative to the row maximum m, with t = sum over the non-maximal entries of exp(z - m), so
    lse - m = log1p(t), mle = (m - z_y) + log1p(t) and entropy = sum q (m - z) + log1p(t). Nothing subtracts two
    numbers of the size of the logits or rounds 1 + t: for a confident target (t = 6e-7 at a logit of 40, where the
    fp32 spacing is 3.8e-6) `lse - z_y` would give 0 and the detached emo/mle weight would blow up.
    """
    n, vocab = z.shape
    rows = _row_blocks(n, vocab, z.device)
    mle = torch.empty(n, dtype=z.dtype, device=z.device)
    entropy = torch.empty_like(mle)
    argmax = torch.empty(n, dtype=torch.long, device=z.device)
    lowest = torch.finfo(z.dtype).min
    for start in range(0, n, rows):
        block, y = z[start : start + rows], targets[start : start + rows].unsqueeze(1)
        z_max, top = block.max(dim=-1)
        top = top.unsqueeze(1)
        argmax[start : start + rows] = top.squeeze(1)
        block.sub_(z_max.unsqueeze(1))  # z - m <= 0, exactly 0 at the arg-max
        q = torch.exp(block).scatter_(1, top, 0.0)
        log_s = torch.log1p(q.sum(dim=-1, keepdim=True))  # lse - m
        mle[start : start + rows] = (log_s - block.gather(1, y)).squeeze(1)
        q.mul_(torch.exp(-log_s)).scatter_(1, top, torch.exp(-log_s))
        block.clamp_(min=lowest)  # -inf logits have q = 0: keep 0 * (-inf) out of the entropy
        entropy[start : start + rows] = log_s.squeeze(1) - _rowdot(q, block)
        block.copy_(q)
    return mle, entropy, argmax


def _gradient_coefficients(weighting: str, ratio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b) per token such that d(objective)/dZ = a (q - onehot) + b dEMO/dZ."""
    if weighting == "emo_anchored":
        return ratio, torch.ones_like(ratio)
    if weighting == "mle_anchored":
        return torch.full_like(ratio, 0.5), 0.5 * ratio
    return torch.ones_like(ratio), torch.zeros_like(ratio)


# ------------------------------------------------------------------------------------------------------ chunk kernel
def _emo_chunk(h, y, weight, cost, inv_norm, opts, inv_normalizer, need_grad, workspace):
    """Per-token values of one chunk and, if `need_grad`, its fp32 (n, V) logit gradient dZ.

    Args:
        h (`torch.Tensor` of shape `(n, d)`): hidden states in the GEMM dtype.
        y (`torch.Tensor` of shape `(n,)`): targets.
        weight (`torch.Tensor` of shape `(V, d)`): output embedding in the GEMM dtype.
        cost (`torch.Tensor` of shape `(V, d')` or `None`): normalised cost embedding in the GEMM dtype; `None` means
            the normalised `weight` (rows scaled by `inv_norm`).
        inv_norm (`torch.Tensor` of shape `(V,)` or `None`): fp32 inverse row norms of `weight` when `cost` is None.
        workspace (`torch.Tensor` of shape `(2 * chunk_size, V)`): fp32 buffer reused by every chunk (allocating
            and faulting in fresh pages for each chunk costs a few percent on CPU).
    """
    n = h.shape[0]
    y_col = y.unsqueeze(1)
    # One (2n, V) fp32 buffer: rows [:n] the logits Z (then q), rows [n:] the cosines C[t, v] = <ê_{y_t}, ê_v> (then
    # dZ). When the cost embedding is the head itself, one stacked GEMM [H; Ŵ[y]] W^T reads W once for both.
    buf = workspace[: 2 * n]
    z, c = buf[:n], buf[n:]
    one = torch.ones((), dtype=torch.float32, device=h.device)
    # The cost block holds D = 1 - C, the transport costs, so that emo = <q, D> is a sum of non-negative terms: no
    # 1 - <q, C> cancellation, which leaves a confident token's emo (~1e-7) at the mercy of fp32 rounding near 1.
    if cost is None:
        target_rows = (weight[y].float() * inv_norm[y].unsqueeze(1)).to(weight.dtype)
        _mm_into(torch.cat([h, target_rows]), weight.t(), out=buf)
        torch.addcmul(one, c, inv_norm, value=-1.0, out=c)
        self_cos = weight[y].ne(0).any(dim=-1).float()
    else:
        _mm_into(h, weight.t(), out=z)
        _mm_into(cost[y], cost.t(), out=c)
        torch.addcmul(one, c, one, value=-1.0, out=c)
        self_cos = cost[y].ne(0).any(dim=-1).float()
    # A cost is in [0, 2]; rounding can put a parallel pair at -1e-7, and a negative emo flips the sign of the
    # detached mle/emo weight. And <ê_y, ê_y> is exactly 1 (0 for an all-zero, padded row), not its rounded value.
    c.clamp_(0.0, 2.0).scatter_(1, y_col, (1.0 - self_cos).unsqueeze(1))
    mle, entropy, argmax = _softmax_(z, y)
    q = z
    emo_plain = _rowdot(q, c)  # sum_v q_v (1 - c_v) = 1 - <q, c>
    emo = emo_plain
    if opts["subtract_target_mass"]:
        emo = emo + q.gather(1, y_col).squeeze(1) * self_cos  # + q_y c_y, the detached target mass
    per_token, ratio = weight_per_token(mle, emo, opts["weighting"], opts["ratio_clamp"])
    stats = (per_token, mle, emo, ratio, entropy, argmax == y)
    if not need_grad:
        return stats, None

    a, b = _gradient_coefficients(opts["weighting"], ratio)
    a, b = a * inv_normalizer, b * inv_normalizer
    # dZ = a (q - onehot) - b q ⊙ (C - r) with r = 1 - emo_plain and C = 1 - D: off the target, q ⊙ ((a - b emo_plain)
    # + b D), in place over D (a workspace view). dZ sums to zero over the vocabulary, so the target entry is minus
    # the sum of the others: exact also where q_y - 1 would round (q_y within 6e-8 of 1).
    torch.addcmul((a - b * emo_plain).unsqueeze(1), c, b.unsqueeze(1), out=c)
    c.mul_(q)
    c.scatter_(1, y_col, 0.0)
    c.scatter_(1, y_col, -c.sum(dim=-1, keepdim=True))
    return stats, c


def _run_chunks(hidden, weight, targets, cost, inv_norm, opts, inv_normalizer, need_dh, need_dw):
    """Loop over token chunks; returns per-token stats (N,) each, dH (N, d) or None, fp32 dW (V, d) or None."""
    num_tokens = hidden.shape[0]
    device = hidden.device
    per = [torch.empty(num_tokens, dtype=torch.float32, device=device) for _ in range(5)]
    correct = torch.empty(num_tokens, dtype=torch.bool, device=device)
    d_hidden = torch.empty_like(hidden) if need_dh else None
    d_weight = torch.zeros(weight.shape, dtype=torch.float32, device=device) if need_dw else None
    compute_dtype = opts["compute_dtype"]
    w = weight.detach().to(compute_dtype)
    chunk = opts["chunk_size"]
    workspace = torch.empty(2 * min(chunk, num_tokens), weight.shape[0], dtype=torch.float32, device=device)
    for start in range(0, num_tokens, chunk):
        stop = min(start + chunk, num_tokens)
        h = hidden[start:stop].detach().to(compute_dtype)
        stats, dz = _emo_chunk(
            h, targets[start:stop], w, cost, inv_norm, opts, inv_normalizer, need_dh or need_dw, workspace
        )
        for out, value in zip(per + [correct], stats):
            out[start:stop] = value
        if dz is None:
            continue
        dz_low = dz if compute_dtype == torch.float32 else dz.to(compute_dtype)
        if need_dh:
            if d_hidden.dtype == compute_dtype:
                torch.mm(dz_low, w, out=d_hidden[start:stop])
            else:
                d_hidden[start:stop] = torch.mm(dz_low, w)
        if need_dw:
            _addmm_fp32_(d_weight, dz_low.t(), dz.t(), h)
        del dz, dz_low
    return (*per, correct), d_hidden, d_weight


class _FusedLinearEMO(torch.autograd.Function):
    """loss = sum_t objective_t / normalizer, with dH (and dW) computed in forward; backward scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, cost, inv_norm, opts, normalizer):
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        stats, d_hidden, d_weight = _run_chunks(
            hidden, weight, targets, cost, inv_norm, opts, normalizer.reciprocal(), need_dh, need_dw
        )
        ctx.d_hidden = d_hidden
        ctx.d_weight = None if d_weight is None else d_weight.to(weight.dtype)
        ctx.mark_non_differentiable(*stats)
        loss = stats[0].sum() / normalizer
        return (loss, *stats)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, *_unused):
        if ctx.d_hidden is None and ctx.d_weight is None and any(ctx.needs_input_grad[:2]):
            raise RuntimeError("fused_linear_emo_loss: backward can run only once per forward (no retain_graph).")
        # The gradients were computed for grad_loss == 1; scale them in place (they are ours, and freed after this).
        grads = []
        for stored in (ctx.d_hidden, ctx.d_weight):
            grads.append(None if stored is None else stored.mul_(grad_loss.to(stored.dtype)))
        ctx.d_hidden = ctx.d_weight = None
        return grads[0], grads[1], None, None, None, None, None


# ------------------------------------------------------------------------------------------------------------ public
def _check_inputs(hidden_states, weight, targets, cost_embedding, weighting, chunk_size):
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
) -> EMOLossOutput:
    """EMO loss of `hidden_states @ weight.T` against `targets`, computed in token chunks without the (N, V) logits.

    Equal to [`~emo_calibrate.loss.emo_loss`] on the logits `hidden_states @ weight.T` (same fields and meaning), with
    the gradient computed in the forward pass: peak extra memory is two fp32 (chunk_size, V) buffers, dH (N, d) and,
    for a trainable head only, an fp32 (V, d) accumulator.

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

    Returns:
        [`~emo_calibrate.loss.EMOLossOutput`]: `loss` carries the gradient to `hidden_states` (and `weight`).
    """
    _check_inputs(hidden_states, weight, targets, cost_embedding, weighting, chunk_size)
    num_tokens = hidden_states.shape[0]
    device_type = hidden_states.device.type
    # GEMMs run in the model dtype, or in the autocast dtype when the caller runs under autocast.
    if torch.is_autocast_enabled(device_type):
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
    )
    if cost_embedding is None:
        cost, inv_norm = None, _inverse_row_norms(weight)
    else:
        cost, inv_norm = _normalized_cost(cost_embedding, compute_dtype, hidden_states.device), None
    targets = targets.to(hidden_states.device)
    num_valid = torch.tensor(num_tokens, device=hidden_states.device)
    normalizer = num_valid if num_items_in_batch is None else num_items_in_batch
    normalizer = torch.as_tensor(normalizer, device=hidden_states.device, dtype=torch.float32).clamp(min=1)

    grad_wanted = torch.is_grad_enabled() and (hidden_states.requires_grad or weight.requires_grad)
    with torch.autocast(device_type, enabled=False):
        if grad_wanted:
            loss, *stats = _FusedLinearEMO.apply(hidden_states, weight, targets, cost, inv_norm, opts, normalizer)
        else:
            with torch.no_grad():
                stats, _, _ = _run_chunks(hidden_states, weight, targets, cost, inv_norm, opts, None, False, False)
            loss = None
    out = reduce_per_token(*stats, num_valid, num_items_in_batch)
    if loss is not None:
        out.loss = loss
    return out
