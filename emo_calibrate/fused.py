"""PLACEHOLDER (replaced by the chunked fused head of issue 3): same API, computed through full logits."""

import torch

from .loss import _emo_on_flat_logits, normalize_cost_embedding, reduce_per_token


def fused_linear_emo_loss(
    hidden_states,
    weight,
    targets,
    *,
    cost_embedding=None,
    weighting="emo_anchored",
    ratio_clamp=None,
    subtract_target_mass=True,
    num_items_in_batch=None,
    chunk_size=None,
):
    logits = hidden_states @ weight.t()
    cost_hat = normalize_cost_embedding(weight if cost_embedding is None else cost_embedding)
    valid = torch.ones_like(targets, dtype=torch.bool)
    out = _emo_on_flat_logits(logits, targets, valid, cost_hat, weighting, ratio_clamp, subtract_target_mass)
    return reduce_per_token(*out, valid.sum(), num_items_in_batch)


def fused_head_unsupported_reason(model):
    cfg = model.config.get_text_config()
    if getattr(cfg, "final_logit_softcapping", None) is not None:
        return "the model soft-caps its logits"
    head = model.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        return "the output layer has a bias"
    return None
