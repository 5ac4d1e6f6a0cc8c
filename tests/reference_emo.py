"""A slow, obviously-correct EMO: the official formulas with an explicit V x V cost matrix and one-hot targets.

Used by the tests (and the benchmarks) as the ground truth for `emo_calibrate.emo_loss` and the fused head.
"""

import torch
import torch.nn.functional as F


def cost_matrix(embedding: torch.Tensor) -> torch.Tensor:
    """C[i, j] = 1 - cos(e_i, e_j), built entry by entry from cosine similarities, (V, V) in fp64."""
    e = embedding.double()
    return 1.0 - F.cosine_similarity(e[:, None, :], e[None, :, :], dim=-1)


def reference_emo_per_token(logits, labels, embedding, subtract_target_mass=True, ignore_index=-100):
    """Per-token (mle, emo, valid) in fp64 for UNSHIFTED (B, L, V) logits and (B, L) labels."""
    vocab = logits.shape[-1]
    z = logits[:, :-1].reshape(-1, vocab).double()
    y = labels[:, 1:].reshape(-1)
    valid = y != ignore_index
    y0 = torch.where(valid, y, torch.zeros_like(y))
    q = torch.softmax(z, dim=-1)
    p = F.one_hot(y0, vocab).double()  # the target distribution, one-hot
    mle = -(p * torch.log(q)).sum(-1)
    q_final = q - (q * p).detach() if subtract_target_mass else q
    similarity = 1.0 - cost_matrix(embedding)  # ÊÊᵀ
    # official: demd = 1 - <p Ê, q_final Ê> = 1 - q_finalᵀ (ÊÊᵀ) p ; without subtraction this is Σ_ij q_i p_j C_ij
    emo = 1.0 - torch.einsum("ni,ij,nj->n", q_final, similarity, p)
    return mle * valid, emo * valid, valid


def reference_emo_loss(
    logits,
    labels,
    embedding,
    weighting="emo_anchored",
    ratio_clamp=None,
    subtract_target_mass=True,
    ignore_index=-100,
    num_items_in_batch=None,
):
    """The official weighting and reduction (eps 1e-10) on top of `reference_emo_per_token`. Returns a fp64 scalar."""
    mle, emo, valid = reference_emo_per_token(logits, labels, embedding, subtract_target_mass, ignore_index)
    if weighting == "emo_anchored":
        per_token = (emo / (mle + 1e-10)).detach() * mle + emo
    elif weighting == "mle_anchored":
        ratio = (mle / (emo + 1e-10)).detach()
        if ratio_clamp is not None:
            ratio = torch.clamp(ratio, max=ratio_clamp)
        per_token = 0.5 * (mle + ratio * emo)
    elif weighting == "mle":
        per_token = mle
    else:
        raise ValueError(weighting)
    denominator = valid.sum() if num_items_in_batch is None else num_items_in_batch
    return (per_token * valid).sum() / max(float(denominator), 1.0)
