"""Pieces of EMOTrainer's fused loss path that do not need the trainer: the decoder backbone of a causal LM, the
MoE load-balancing loss computed from it, the head weight as the loss can read it, and the memory of the fallback.

The fused path runs the decoder backbone (not the causal-LM forward) so that the model returns its LAST hidden state
only, in the training dtype, as TRL's DistillationTrainer does; the EMO head then projects it chunk by chunk.
"""

import contextlib
import sys

import torch


__all__ = ["decoder_backbone", "first_row", "head_weight", "reference_memory_note", "router_aux_loss"]

# The reference loss keeps about nine fp32 (N, V) tensors alive through its autograd graph (performance.md 3.5).
REFERENCE_FP32_BUFFERS = 9


def decoder_backbone(model) -> tuple[torch.nn.Module, torch.nn.Module | None]:
    """`(causal_lm, backbone)`: the transformers causal LM inside `model` (PEFT unwrapped, LoRA layers still in
    place) and its decoder backbone (`causal_lm.base_model`, e.g. `LlamaModel`; the multimodal wrapper of a
    vision-language model), or `None` when the model has no separate backbone."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = getattr(causal_lm, "base_model", None)
    if backbone is None or backbone is causal_lm:
        return causal_lm, None
    return causal_lm, backbone


def first_row(inputs: dict) -> dict:
    """The first example of a batch of model inputs (every tensor whose leading dimension is the batch)."""
    batch = inputs["input_ids"].shape[0] if "input_ids" in inputs else None
    return {
        key: value[:1] if torch.is_tensor(value) and value.dim() and value.shape[0] == batch else value
        for key, value in inputs.items()
    }


@contextlib.contextmanager
def head_weight(causal_lm, zero3: bool):
    """The (V, d) output-embedding weight, whole: gathered from its DeepSpeed ZeRO-3 partitions for the duration of
    the block (TRL's `maybe_gather_lm_head_ctx`; run it inside the model's forward so ZeRO-3's hooks stay armed),
    or an FSDP2 DTensor's full tensor."""
    weight = causal_lm.get_output_embeddings().weight
    if zero3:
        from trl.trainer.utils import maybe_gather_lm_head_ctx

        gather = maybe_gather_lm_head_ctx(weight)
    else:
        gather = contextlib.nullcontext()
    with gather:
        yield weight.full_tensor() if hasattr(weight, "full_tensor") else weight


def router_aux_loss(causal_lm, backbone_outputs, attention_mask) -> torch.Tensor | None:
    """The MoE load-balancing loss, as the causal LM's own forward computes it from its backbone's router logits
    (the model module's `load_balancing_loss_func`, else Mixtral's, which the other families copy)."""
    router_logits = getattr(backbone_outputs, "router_logits", None)
    if router_logits is None:
        return None
    loss_fn = getattr(sys.modules.get(type(causal_lm).__module__), "load_balancing_loss_func", None)
    if loss_fn is None:
        from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func as loss_fn
    config = causal_lm.config.get_text_config()
    num_experts = getattr(causal_lm, "num_experts", None) or getattr(config, "num_experts", None)
    top_k = getattr(causal_lm, "num_experts_per_tok", None) or getattr(config, "num_experts_per_tok", None)
    return loss_fn(router_logits, num_experts, top_k, attention_mask)


def reference_memory_note(labels: torch.Tensor, vocab_size: int) -> str:
    """What the reference (full-logits) loss costs at this batch, for the one-time fallback warning."""
    positions = labels.shape[0] * max(labels.shape[-1] - 1, 1) if labels.dim() > 1 else labels.numel()
    gib = REFERENCE_FP32_BUFFERS * positions * vocab_size * 4 / 2**30
    return (
        f"~{REFERENCE_FP32_BUFFERS} fp32 N x V buffers: {gib:.2f} GiB at this batch (N = {positions} positions, "
        f"V = {vocab_size}), where the fused head needs two (chunk x V) buffers"
    )
