"""Whether the fused EMO head can stand in for a causal LM's own logits (see `emo_calibrate.fused`)."""

import math

import torch


__all__ = ["fused_head_unsupported_reason"]


def fused_head_unsupported_reason(model) -> str | None:
    """Why the fused head cannot stand in for `model`'s own logits, or `None` when it can.

    The fused head computes `logits = hidden @ lm_head.weight.T` and nothing else, so it does not apply to models
    whose output layer does more: a final logit soft-capping (Gemma 2), a logit scale (Cohere, Granite, Falcon-H1,
    MiniCPM...), a bias, an adapter on `lm_head`, or an output layer that is not a plain linear weight.

    Args:
        model: a transformers causal LM, possibly wrapped by PEFT.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    if config is None or not hasattr(base, "get_output_embeddings"):
        return f"{type(base).__name__} is not a transformers model with a config and get_output_embeddings()"
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(text_config, "final_logit_softcapping", None) is not None:
        return f"the model soft-caps its logits (final_logit_softcapping={text_config.final_logit_softcapping})"
    for name in ("logit_scale", "logits_scaling", "output_multiplier", "lm_head_multiplier"):
        value = getattr(text_config, name, None)
        if value is not None and not (isinstance(value, int | float) and math.isclose(value, 1.0)):
            return f"the model scales its logits ({name}={value})"
    head = base.get_output_embeddings()
    if head is None:
        return f"{type(base).__name__} has no output embedding (get_output_embeddings() is None)"
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper
    except ImportError:  # peft is a dependency, but the check must not need it
        BaseTunerLayer = AuxiliaryTrainingWrapper = ModulesToSaveWrapper = ()
    if isinstance(head, BaseTunerLayer):
        return (
            "lm_head carries a PEFT adapter, which the fused head would bypass: remove 'lm_head' from target_modules"
        )
    if isinstance(head, AuxiliaryTrainingWrapper) and not isinstance(head, ModulesToSaveWrapper):
        return f"lm_head is wrapped by PEFT's {type(head).__name__}, whose forward is more than its weight"
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        return f"the output embedding {type(head).__name__} has no floating (V, d) weight (e.g. a quantised head)"
    if type(weight) is not torch.nn.Parameter and type(weight) is not torch.Tensor:
        return f"the output embedding's weight is a {type(weight).__name__}, not a plain tensor"
    if getattr(head, "bias", None) is not None:
        return "lm_head has a bias"
    return None
