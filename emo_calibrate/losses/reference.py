"""The EMO loss (Earth Mover Distance Optimization; Ren, Wu, Zhu, ICLR 2024) as a pure function of tensors.

For one target token y and the model's next-token distribution q = softmax(z) over V tokens, EMO is the expected
transport cost of moving q onto y, with the cost between two tokens `1 - cos(e_i, e_j)` measured in a frozen
pretrained embedding E (V x d'):

    emo = sum_i q_i (1 - <ê_i, ê_y>) = 1 - <q^T Ê, ê_y>          (ê = e / ||e||, rows of E normalised)

For a one-hot target this upper bound of the earth mover distance is exact. It is mixed with the usual cross-entropy
`mle = -log q_y` through a per-token weight that is a *detached* ratio of the two losses, so that EMO's gradient is
rescaled to the size of the cross-entropy (or the reverse):

    emo_anchored ("EMO-2", official default):  loss = sg(emo / mle) * mle + emo
    mle_anchored ("EMO-1"):                    loss = 0.5 * (mle + sg(min(mle / emo, clamp)) * emo)

The official code subtracts the target's own probability (detached) from q before the EMO term. This leaves the
gradient unchanged and adds q_y to the value, which keeps the ratios away from 0/0 when q_y -> 1.

Everything here is the readable reference. `emo_calibrate.fused` computes the same numbers from hidden states without
materialising the (N, V) logits; the tests hold the two together.
"""

import contextlib
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F


__all__ = [
    "WEIGHTINGS",
    "EMOLoss",
    "EMOLossOutput",
    "emo_loss",
    "normalize_cost_embedding",
    "reduce_per_token",
    "weight_per_token",
]

Weighting = Literal["emo_anchored", "mle_anchored", "mle"]
# Official epsilon of the detached ratios. Harmless in fp32, where all of this is computed.
RATIO_EPS = 1e-10


@dataclass
class EMOLossOutput:
    """What `emo_loss` returns. Every field is a scalar tensor; only `loss` carries a gradient.

    Args:
        loss: the objective, `sum over valid targets / normalizer` (the normalizer is `num_items_in_batch` if given,
            else the number of valid targets, at least 1).
        mle: mean cross-entropy over the valid targets of this call.
        emo: mean EMO term over the valid targets (its value includes q_y when `subtract_target_mass=True`).
        emd: mean transport cost `sum_i q_i (1 - cos(e_i, e_y))` over the valid targets: the earth mover distance to
            the target, without the q_y that `subtract_target_mass` adds (equal to `emo` when it is off). It falls as
            the model becomes confidently right, when `emo` rises towards 1.
        ratio: mean detached weight (emo/mle for `emo_anchored`, the possibly clamped mle/emo for `mle_anchored`).
        entropy: mean entropy of the predicted next-token distribution.
        accuracy: share of valid targets that are the arg-max prediction.
        num_tokens: number of valid (non-ignored) targets.
    """

    loss: torch.Tensor
    mle: torch.Tensor
    emo: torch.Tensor
    emd: torch.Tensor
    ratio: torch.Tensor
    entropy: torch.Tensor
    accuracy: torch.Tensor
    num_tokens: torch.Tensor


def normalize_cost_embedding(cost_embedding: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """L2-normalise the rows of a (V, d') cost embedding, in `dtype` (fp32 unless fp64 is asked for).

    An all-zero row (a padded vocabulary slot) stays zero instead of becoming NaN: such a token then costs 1 to reach
    from any other, and its cost to itself is 1 as well, which only matters if it is ever a target.
    """
    if cost_embedding.dim() != 2 or not cost_embedding.is_floating_point():
        raise ValueError(
            f"cost_embedding must be a floating (V, d') matrix, got {tuple(cost_embedding.shape)} {cost_embedding.dtype}"
        )
    return F.normalize(cost_embedding.detach().to(dtype), dim=-1, eps=1e-12)


def _emo_anchored(mle, emo, ratio_clamp):
    ratio = (emo / (mle + RATIO_EPS)).detach()
    return ratio * mle + emo, ratio


def _mle_anchored(mle, emo, ratio_clamp):
    ratio = (mle / (emo + RATIO_EPS)).detach()
    if ratio_clamp is not None:
        ratio = ratio.clamp(max=ratio_clamp)
    return 0.5 * (mle + ratio * emo), ratio


def _mle_only(mle, emo, ratio_clamp):
    # EMO is still computed and logged, so an MLE run is directly comparable with an EMO run.
    return mle, torch.zeros_like(mle)


WEIGHTINGS = {"emo_anchored": _emo_anchored, "mle_anchored": _mle_anchored, "mle": _mle_only}


def weight_per_token(
    mle: torch.Tensor, emo: torch.Tensor, weighting: Weighting, ratio_clamp: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine per-token cross-entropy and EMO (both shaped (N,)) into the per-token objective and its detached weight."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {sorted(WEIGHTINGS)}, got {weighting!r}")
    return WEIGHTINGS[weighting](mle, emo, ratio_clamp)


def _check_inputs(logits, labels, cost_embedding, ignore_index):
    if not torch.is_tensor(logits) or not logits.is_floating_point():
        raise ValueError(f"logits must be a floating-point tensor, got {getattr(logits, 'dtype', type(logits))}")
    if logits.dim() != 3:
        raise ValueError(f"logits must be shaped (batch, seq_len, vocab), got {tuple(logits.shape)}")
    if labels.shape != logits.shape[:2]:
        raise ValueError(f"labels {tuple(labels.shape)} must match logits' (batch, seq_len) {tuple(logits.shape[:2])}")
    if labels.is_floating_point():
        raise ValueError(f"labels must be integer token ids, got {labels.dtype}")
    vocab = logits.shape[-1]
    if cost_embedding.dim() != 2 or cost_embedding.shape[0] != vocab:
        raise ValueError(
            f"cost_embedding has shape {tuple(cost_embedding.shape)} but the logits have a vocabulary of {vocab}: "
            "it needs one row per token of the model's vocabulary (V, d'). Use an embedding of the same vocabulary."
        )
    valid = labels != ignore_index
    if valid.any():
        targets = labels[valid]
        if targets.min() < 0 or targets.max() >= vocab:
            raise ValueError(
                f"labels must be in [0, {vocab}) or equal ignore_index={ignore_index}; "
                f"found {targets.min().item()}..{targets.max().item()}"
            )


def _emo_on_flat_logits(z, targets, valid, cost_hat, weighting, ratio_clamp, subtract_target_mass):
    """Per-token mle, emo, objective and weight for flat (N, V) logits. Ignored positions give exactly 0."""
    z = z.to(cost_hat.dtype)
    safe_targets = torch.where(valid, targets, torch.zeros_like(targets))
    log_q = torch.log_softmax(z, dim=-1)
    q = log_q.exp()
    mle = -log_q.gather(-1, safe_targets[:, None]).squeeze(-1)

    e_target = cost_hat[safe_targets]  # (N, d') gather: never a one-hot matmul, never a V x V cost matrix
    q_embedded = q @ cost_hat  # (N, d') the expected embedding under q: the one extra (N x V x d') product
    emd = (1.0 - (q_embedded * e_target).sum(-1)).detach()
    if subtract_target_mass:
        # q - sg(q_y onehot_y), written without the one-hot: the gradient is unchanged, the value gains q_y.
        q_target = q.gather(-1, safe_targets[:, None]).detach()
        q_embedded = q_embedded - q_target * e_target
    emo = 1.0 - (q_embedded * e_target).sum(-1)

    zero = torch.zeros_like(mle)
    mle, emo, emd = (torch.where(valid, value, zero) for value in (mle, emo, emd))
    per_token, ratio = weight_per_token(mle, emo, weighting, ratio_clamp)
    per_token = torch.where(valid, per_token, zero)

    with torch.no_grad():
        # 0 * log 0 = 0: a token ruled out by a -inf logit has q = 0 and log q = -inf, whose product would be NaN.
        entropy = torch.where(valid, -(q * log_q.clamp(min=torch.finfo(log_q.dtype).min)).sum(-1), zero)
        correct = (z.argmax(-1) == targets) & valid
    return per_token, mle.detach(), emo.detach(), emd, torch.where(valid, ratio, zero), entropy, correct


def emo_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    cost_embedding: torch.Tensor,
    *,
    weighting: Weighting = "emo_anchored",
    ratio_clamp: float | None = None,
    subtract_target_mass: bool = True,
    ignore_index: int = -100,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> EMOLossOutput:
    """EMO loss of a causal LM from its logits and UNSHIFTED labels, like a model's own `labels` argument.

    Args:
        logits (`torch.Tensor` of shape `(batch, seq_len, vocab)`):
            Next-token logits, any floating dtype. The maths runs in fp32 (fp64 for fp64 inputs).
        labels (`torch.Tensor` of shape `(batch, seq_len)`):
            Token ids aligned with the inputs; position t+1 is the target of logits at t. `ignore_index` marks
            positions without a target (padding, prompts).
        cost_embedding (`torch.Tensor` of shape `(vocab, d')`):
            Raw token embedding defining the transport cost `1 - cos`. Rows are L2-normalised here; d' may differ from
            the model's hidden size. Treated as a constant (no gradient flows into it).
        weighting (`str`, *optional*, defaults to `"emo_anchored"`):
            `"emo_anchored"` = sg(emo/mle)*mle + emo (official "EMO-2"); `"mle_anchored"` = 0.5*(mle + sg(mle/emo)*emo)
            (official "EMO-1"); `"mle"` = plain cross-entropy, EMO only measured.
        ratio_clamp (`float`, *optional*):
            Upper bound on the detached mle/emo ratio of `"mle_anchored"` (3.0 in some official variants).
        subtract_target_mass (`bool`, *optional*, defaults to `True`):
            Subtract the target's own (detached) probability from q before the EMO term, as the official code does.
        ignore_index (`int`, *optional*, defaults to `-100`):
            Label value that marks positions without a target.
        num_items_in_batch (`int` or `torch.Tensor`, *optional*):
            Number of valid targets across the whole gradient-accumulation window. If given, the loss is
            sum / num_items_in_batch (gradient-accumulation correct); otherwise the mean over this call's valid targets.

    Returns:
        [`EMOLossOutput`]: `loss` (with gradient) and detached logging scalars.
    """
    _check_inputs(logits, labels, cost_embedding, ignore_index)
    vocab = logits.shape[-1]
    z = logits[:, :-1, :].reshape(-1, vocab)
    targets = labels[:, 1:].reshape(-1).to(z.device)
    valid = targets != ignore_index
    # fp32 maths for fp32/bf16/fp16 logits (fp16 would underflow the official epsilons); fp64 stays fp64. Autocast
    # (a caller inside the Trainer's mixed precision) would run `q @ Ê` in bf16/fp16: it is switched off here.
    compute_dtype = torch.promote_types(logits.dtype, torch.float32)
    with _autocast_off(z.device.type):
        cost_hat = normalize_cost_embedding(cost_embedding, compute_dtype).to(z.device)
        per_token, mle, emo, emd, ratio, entropy, correct = _emo_on_flat_logits(
            z, targets, valid, cost_hat, weighting, ratio_clamp, subtract_target_mass
        )
        return reduce_per_token(per_token, mle, emo, emd, ratio, entropy, correct, valid.sum(), num_items_in_batch)


def _autocast_off(device_type: str):
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def reduce_per_token(
    per_token, mle, emo, emd, ratio, entropy, correct, num_valid, num_items_in_batch
) -> EMOLossOutput:
    """Reduce per-token (N,) values into an [`EMOLossOutput`]; shared by the reference and the fused paths."""
    normalizer = num_valid if num_items_in_batch is None else num_items_in_batch
    normalizer = torch.as_tensor(normalizer, device=per_token.device, dtype=torch.float32).clamp(min=1)
    count = num_valid.clamp(min=1).float()
    return EMOLossOutput(
        loss=per_token.sum() / normalizer,
        mle=mle.sum() / count,
        emo=emo.sum() / count,
        emd=emd.sum() / count,
        ratio=ratio.sum() / count,
        entropy=entropy.sum() / count,
        accuracy=correct.sum() / count,
        num_tokens=num_valid,
    )


class EMOLoss(torch.nn.Module):
    """`emo_loss` as a module holding its cost embedding (normalised once) as a non-trainable buffer.

    Args:
        cost_embedding (`torch.Tensor` of shape `(vocab, d')`): the embedding defining the transport cost.
        **options: keyword options of [`emo_loss`] (`weighting`, `ratio_clamp`, `subtract_target_mass`, `ignore_index`).
    """

    def __init__(self, cost_embedding: torch.Tensor, **options):
        super().__init__()
        self.register_buffer("cost_embedding", normalize_cost_embedding(cost_embedding), persistent=False)
        self.options = options

    def forward(self, logits, labels, num_items_in_batch=None) -> EMOLossOutput:
        return emo_loss(logits, labels, self.cost_embedding, num_items_in_batch=num_items_in_batch, **self.options)
