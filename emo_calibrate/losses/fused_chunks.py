"""The per-chunk kernel of the fused EMO head: logits, softmax, EMO and the closed-form logit gradient of one chunk.

`emo_calibrate.losses.fused` loops over token chunks with `run_chunks`; everything here works on one chunk's
(n, V) fp32 buffers, in place where it can, so that only two such buffers exist at any time. See the docstring of
`emo_calibrate.losses.fused` for the maths.
"""

import weakref

import torch
import torch.nn.functional as F

from .reference import weight_per_token


__all__ = ["inverse_row_norms", "normalized_cost", "run_chunks", "scale_in_fp32_"]

_CPU_BLOCK_BYTES = 512 * 2**10

# `torch.mm(..., out_dtype=torch.float32)` from bf16/fp16 inputs exists on CUDA only.
_CUDA_OUT_DTYPE = hasattr(torch.ops.aten.mm, "dtype_out")


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


def inverse_row_norms(weight: torch.Tensor) -> torch.Tensor:
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


def normalized_cost(cost_embedding: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
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


def _softmax_(z: torch.Tensor, targets: torch.Tensor):
    """Turn (n, V) fp32 logits into q = softmax(z) IN PLACE, by row blocks; returns (mle, entropy, argmax, lse), (n,).

    In place, so that the logits and the cosines can come from one stacked GEMM while only two (n, V) buffers exist.
    Everything is taken relative to the row maximum m, with t = sum over the non-maximal entries of exp(z - m), so
    lse - m = log1p(t), mle = (m - z_y) + log1p(t) and entropy = sum q (m - z) + log1p(t). Nothing subtracts two
    numbers of the size of the logits or rounds 1 + t: for a confident target (t = 6e-7 at a logit of 40, where the
    fp32 spacing is 3.8e-6) `lse - z_y` would give 0 and the detached emo/mle weight would blow up.
    """
    n, vocab = z.shape
    rows = _row_blocks(n, vocab, z.device)
    mle = torch.empty(n, dtype=z.dtype, device=z.device)
    entropy, lse = torch.empty_like(mle), torch.empty_like(mle)
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
        lse[start : start + rows] = z_max + log_s.squeeze(1)
        mle[start : start + rows] = (log_s - block.gather(1, y)).squeeze(1)
        q.mul_(torch.exp(-log_s)).scatter_(1, top, torch.exp(-log_s))
        block.clamp_(min=lowest)  # -inf logits have q = 0: keep 0 * (-inf) out of the entropy
        entropy[start : start + rows] = log_s.squeeze(1) - _rowdot(q, block)
        block.copy_(q)
    return mle, entropy, argmax, lse


def _gradient_coefficients(weighting: str, ratio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b) per token such that d(objective)/dZ = a (q - onehot) + b dEMO/dZ."""
    if weighting == "emo_anchored":
        return ratio, torch.ones_like(ratio)
    if weighting == "mle_anchored":
        return torch.full_like(ratio, 0.5), 0.5 * ratio
    return torch.ones_like(ratio), torch.zeros_like(ratio)


def _transform_logits_(x: torch.Tensor, scale: float, softcap: float | None) -> None:
    """The model's own output transform, in place: z = softcap * tanh(scale * x / softcap), or z = scale * x."""
    if softcap is not None:
        x.mul_(scale / softcap).tanh_().mul_(softcap)
    elif scale != 1.0:
        x.mul_(scale)


def _chain_rule_(dz: torch.Tensor, q: torch.Tensor, lse: torch.Tensor, scale: float, softcap: float | None) -> None:
    """dZ (gradient w.r.t. the transformed logits z) -> gradient w.r.t. x = H W^T, in place; `q` is overwritten.

    With a soft cap, dz/dx = scale (1 - tanh^2) = scale (1 - (z / softcap)^2). The logits were overwritten by q, so
    z = log q + lse is recovered from q (exact to fp32 rounding; a capped logit is in [-cap, cap], so q never
    underflows for the caps models use, and a q of exactly 0, whose dZ is 0 anyway, gives a derivative of 0).
    """
    if softcap is not None:
        t = q.log_().add_(lse.unsqueeze(1)).div_(softcap).clamp_(-1.0, 1.0)
        dz.mul_(t.mul_(t).sub_(1.0).mul_(-scale))
    elif scale != 1.0:
        dz.mul_(scale)


# ------------------------------------------------------------------------------------------------------ chunk kernel
def _emo_chunk(h, y, weight, cost, inv_norm, opts, need_grad, workspace):
    """Per-token values of one chunk and, if `need_grad`, its fp32 (n, V) logit gradient dX for an objective summed
    (not averaged) over the chunk's tokens, with a bound on each row's L1 norm.

    Args:
        h (`torch.Tensor` of shape `(n, d)`): hidden states in the GEMM dtype.
        y (`torch.Tensor` of shape `(n,)`): targets.
        weight (`torch.Tensor` of shape `(V, d)`): output embedding in the GEMM dtype.
        cost (`torch.Tensor` of shape `(V, d')` or `None`): normalised cost embedding in the GEMM dtype; `None` means
            the normalised `weight` (rows scaled by `inv_norm`).
        inv_norm (`torch.Tensor` of shape `(V,)` or `None`): fp32 inverse row norms of `weight` when `cost` is None.
        workspace (`torch.Tensor` of shape `(2 * chunk_size, V)`): fp32 buffer reused by every chunk (allocating
            and faulting in fresh pages for each chunk costs a few percent on CPU).

    Returns:
        `(stats, dx, bound)`: stats = per-token (objective, mle, emo, emd, ratio, entropy, correct), each `(n,)`;
        dx `(n, V)` (a workspace view) or `None`; bound `(n,)`, >= the L1 norm of each row of dx, or `None`.
    """
    n = h.shape[0]
    y_col = y.unsqueeze(1)
    scale, softcap = opts["logit_scale"], opts["logit_softcap"]
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
    _transform_logits_(z, scale, softcap)  # soft cap / logit scale of the model's head (cost rows untouched)
    # A cost is in [0, 2]; rounding can put a parallel pair at -1e-7, and a negative emo flips the sign of the
    # detached mle/emo weight. And <ê_y, ê_y> is exactly 1 (0 for an all-zero, padded row), not its rounded value.
    c.clamp_(0.0, 2.0).scatter_(1, y_col, (1.0 - self_cos).unsqueeze(1))
    mle, entropy, argmax, lse = _softmax_(z, y)
    q = z
    emd = _rowdot(q, c)  # sum_v q_v (1 - c_v) = 1 - <q, c>: the transport cost itself
    emo = emd
    if opts["subtract_target_mass"]:
        emo = emd + q.gather(1, y_col).squeeze(1) * self_cos  # + q_y c_y, the detached target mass
    per_token, ratio = weight_per_token(mle, emo, opts["weighting"], opts["ratio_clamp"])
    stats = (per_token, mle, emo, emd, ratio, entropy, argmax == y)
    if not need_grad:
        return stats, None, None

    a, b = _gradient_coefficients(opts["weighting"], ratio)
    # dZ = a (q - onehot) - b q ⊙ (C - r) with r = 1 - emd and C = 1 - D: off the target, q ⊙ ((a - b emd) + b D),
    # in place over D (a workspace view). dZ sums to zero over the vocabulary, so the target entry is minus the sum of
    # the others: exact also where q_y - 1 would round (q_y within 6e-8 of 1).
    torch.addcmul((a - b * emd).unsqueeze(1), c, b.unsqueeze(1), out=c)
    c.mul_(q)
    c.scatter_(1, y_col, 0.0)
    c.scatter_(1, y_col, -c.sum(dim=-1, keepdim=True))
    # |a (q - onehot)|_1 = 2 |a| (1 - q_y) and |q ⊙ (D - emd)|_1 <= 2 emd; the chain rule multiplies by <= |scale|.
    bound = 2 * abs(scale) * (a.abs() * -torch.expm1(-mle) + b.abs() * emd)
    _chain_rule_(c, q, lse, scale, softcap)
    return stats, c, bound


def _power_of_two_row_scales(bound: torch.Tensor) -> torch.Tensor:
    """(n, 1) fp32 powers of two s with bound * s in [0.5, 1): rows of dZ * s have an L1 norm below 1."""
    _, exponent = torch.frexp(bound)
    return torch.ldexp(torch.ones_like(bound), -exponent.clamp_(-120, 120)).unsqueeze(1)


def run_chunks(hidden, weight, targets, cost, inv_norm, opts, need_dh, need_dw):
    """Loop over token chunks; returns per-token stats (N,) each, dH (N, d) or None, fp32 dW (V, d) or None.

    dH and dW are the gradients of the objective SUMMED over the tokens (the caller applies the normalizer and the
    incoming gradient, in fp32): dividing by the normalizer here would push an fp16 dZ / N below fp16's smallest
    number before the loss scaler could lift it.
    """
    num_tokens = hidden.shape[0]
    device = hidden.device
    per = [torch.empty(num_tokens, dtype=torch.float32, device=device) for _ in range(6)]
    correct = torch.empty(num_tokens, dtype=torch.bool, device=device)
    d_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=device) if need_dh else None
    d_weight = torch.zeros(weight.shape, dtype=torch.float32, device=device) if need_dw else None
    compute_dtype = opts["compute_dtype"]
    # fp16 has 5 exponent bits: each row of dZ is scaled by a power of two to an L1 norm near 1 before the cast, so
    # no entry that fp32 holds flushes to zero, and the scale is undone exactly in fp32 after the GEMM. bf16 has
    # fp32's exponent range and needs no scaling.
    scale_rows = compute_dtype == torch.float16
    w = weight.detach().to(compute_dtype)  # no copy when the head is already in the GEMM dtype
    chunk = opts["chunk_size"]
    workspace = torch.empty(2 * min(chunk, num_tokens), weight.shape[0], dtype=torch.float32, device=device)
    for start in range(0, num_tokens, chunk):
        stop = min(start + chunk, num_tokens)
        h = hidden[start:stop].detach().to(compute_dtype)
        stats, dz, bound = _emo_chunk(h, targets[start:stop], w, cost, inv_norm, opts, need_dh or need_dw, workspace)
        for out, value in zip(per + [correct], stats):
            out[start:stop] = value
        if dz is None:
            continue
        row_scale = _power_of_two_row_scales(bound) if scale_rows else None
        if compute_dtype == torch.float32:
            dz_low = dz
        elif row_scale is not None:
            dz_low = torch.mul(dz, row_scale, out=torch.empty(dz.shape, dtype=compute_dtype, device=device))
        else:
            dz_low = dz.to(compute_dtype)
        if need_dh:
            _dh_into(dz_low, w, row_scale, d_hidden[start:stop])
        if need_dw:
            dz_w = dz.to(compute_dtype) if row_scale is not None else dz_low  # dW sums tokens: unscaled rows
            _addmm_fp32_(d_weight, dz_w.t(), dz.t(), h)
        del dz, dz_low
    return (*per, correct), d_hidden, d_weight


def _dh_into(dz_low: torch.Tensor, w: torch.Tensor, row_scale: torch.Tensor | None, out: torch.Tensor) -> None:
    """out = (dZ_low W) / row_scale, the unscaling in fp32 (exact: powers of two)."""
    if row_scale is None:
        if out.dtype == dz_low.dtype:
            torch.mm(dz_low, w, out=out)
        else:
            out.copy_(torch.mm(dz_low, w))
        return
    if _CUDA_OUT_DTYPE and out.is_cuda:
        product = torch.mm(dz_low, w, out_dtype=torch.float32)
    else:  # CPU: rows of dZ_low have L1 norm < 1, so the low-precision product cannot overflow
        product = torch.mm(dz_low, w)
    torch.div(product, row_scale, out=out)


def scale_in_fp32_(tensor: torch.Tensor, factor: torch.Tensor, block_elements: int = 2**22) -> torch.Tensor:
    """tensor *= factor, computed in fp32 by row blocks and rounded once to tensor's dtype (a 0-dim `factor` would
    otherwise be rounded to fp16/bf16 first, and an fp16 factor such as 1/16384 * 3 loses digits or flushes)."""
    if tensor.dtype in (torch.float32, torch.float64):
        return tensor.mul_(factor.to(tensor.dtype))
    flat = tensor.view(tensor.shape[0], -1) if tensor.dim() else tensor.view(1, 1)
    rows = max(1, block_elements // max(1, flat.shape[1]))
    for start in range(0, flat.shape[0], rows):
        block = flat[start : start + rows]
        block.copy_(block.float().mul_(factor))
    return tensor
