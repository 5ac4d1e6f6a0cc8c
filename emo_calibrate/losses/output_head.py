"""What a causal LM's output layer does, so that the fused EMO head can stand in for it.

The fused head computes the logits as `transform(hidden @ lm_head.weight.T)` itself, token chunk by token chunk.
`output_logit_transform` reads the transform from the model's config (a final soft cap, a logit scale);
`fused_head_unsupported_reason` says when the output layer is more than a plain weight (a bias, an adapter, a
quantised or missing head). Anything the config does not reveal is caught by the trainer's one-time check that the
fused logits reproduce the model's own (`EMOTrainer._verify_fused_head`).
"""

import math

import torch


__all__ = ["fused_head_unsupported_reason", "output_logit_transform"]


def _text_config(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    if config is None:
        return None
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _is_dtensor(tensor) -> bool:  # FSDP2 shards parameters as DTensors; the head is gathered whole for the loss
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return isinstance(tensor, DTensor)


def _number(value) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def output_logit_transform(model) -> tuple[float, float | None]:
    """`(scale, softcap)` such that the model's logits are `softcap * tanh(scale * x / softcap)`, with
    `x = hidden @ lm_head.weight.T`, or `scale * x` when `softcap` is None.

    Read as each architecture's forward applies it (transformers 5.24): Gemma 2/3, VaultGemma, nanochat soft-cap with
    `final_logit_softcapping`; Cohere multiplies by `logit_scale`, Muse by `output_multiplier`, Falcon-H1 by
    `lm_head_multiplier`; Granite and MiniCPM3 divide by `logits_scaling`, which HyperCLOVA X multiplies by.

    Args:
        model: a transformers causal LM, possibly wrapped by PEFT.
    """
    text_config = _text_config(model)
    if text_config is None:
        return 1.0, None
    softcap = _number(getattr(text_config, "final_logit_softcapping", None))
    scale = None
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        scale = _number(getattr(text_config, name, None))
        if scale is not None:
            break
    if scale is None:
        scaling = _number(getattr(text_config, "logits_scaling", None))
        if scaling is not None:
            scale = scaling if getattr(text_config, "model_type", None) == "hyperclovax" else 1.0 / scaling
    return (1.0 if scale is None else scale), softcap


def fused_head_unsupported_reason(model) -> str | None:
    """Why the fused head cannot stand in for `model`'s own output layer, or `None` when it can.

    The fused head reads the output embedding's weight and applies the transform of [`output_logit_transform`]; it
    does not apply to an output layer that does more: a bias, an adapter on `lm_head`, or an output layer that is not
    a plain floating (V, d) weight (a quantised head).

    Args:
        model: a transformers causal LM, possibly wrapped by PEFT.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base, "config", None) is None or not hasattr(base, "get_output_embeddings"):
        return f"{type(base).__name__} is not a transformers model with a config and get_output_embeddings()"
    scale, softcap = output_logit_transform(base)
    if not math.isfinite(scale) or scale == 0 or (softcap is not None and not softcap > 0):
        return f"the model's logit transform (scale={scale}, soft cap={softcap}) is not a finite, non-zero one"
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
    shape = getattr(weight, "ds_shape", getattr(weight, "shape", ()))  # DeepSpeed ZeRO-3 keeps the full shape here
    if not isinstance(weight, torch.Tensor) or len(shape) != 2 or not weight.is_floating_point():
        return f"the output embedding {type(head).__name__} has no floating (V, d) weight (e.g. a quantised head)"
    if type(weight) not in (torch.nn.Parameter, torch.Tensor) and not _is_dtensor(weight):
        return f"the output embedding's weight is a {type(weight).__name__}, not a plain tensor"
    if getattr(head, "bias", None) is not None:
        return "lm_head has a bias"
    return None
