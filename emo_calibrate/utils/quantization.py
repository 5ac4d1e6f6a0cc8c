"""Small helpers for bitsandbytes 4-bit models, shared by training, evaluation and merging.

bitsandbytes (0.50) has a CPU fast path that silently breaks QLoRA on CPUs with AVX512-BF16: the first forward of a
`bnb.nn.Linear4bit` in eval mode with an input that does not require grad *permanently* repacks the weight into a
CPU-specific layout (`quant_state.packing_format_for_cpu = True`). After that, gradients through the frozen weight are
dropped (the packed kernel has no autograd) and `dequantize()` / merging read the packed bytes as if they were the
original layout, giving garbage weights. Triggers: `model.eval()` + a no-grad forward, `Trainer.evaluate()`, and
`PeftModel.from_pretrained` (which returns the model in eval mode). GPUs are unaffected.
"""

import logging


__all__ = ["disable_cpu_4bit_repacking", "is_quantized"]

logger = logging.getLogger(__name__)


def disable_cpu_4bit_repacking(model) -> int:
    """Stop bitsandbytes from repacking 4-bit weights into its CPU-only layout on eval/no-grad forwards.

    Call it after every load of a 4-bit model that may run on CPU, and again after `PeftModel.from_pretrained`.
    It is harmless on GPU and on CPUs without AVX512-BF16 (the flag is already False there).

    Args:
        model (`torch.nn.Module`): any module tree (a `PreTrainedModel`, a `PeftModel`, ...).

    Returns:
        `int`: the number of `bnb.nn.Linear4bit` modules visited (0 when bitsandbytes is not installed).
    """
    try:
        import bitsandbytes as bnb
    except ImportError:  # no bitsandbytes, hence no 4-bit layers to protect
        return 0
    count = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            # Read in Linear4bit.forward: the repack only happens while this flag is True.
            module.support_avx512bf16_for_cpu = False
            count += 1
    if count:
        logger.debug("Disabled the bitsandbytes CPU repacking on %d 4-bit layers.", count)
    return count


def is_quantized(model) -> bool:
    """Whether `model` still holds quantised weights or a quantiser (bitsandbytes, GPTQ, AWQ, GGUF, ...).

    `model.is_loaded_in_4bit` is not used: transformers leaves it True after `model.dequantize()`.
    """
    if getattr(model, "hf_quantizer", None) is not None:
        return True
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "quantization_config", None) is not None:
        return True
    for param in model.parameters():
        # Params4bit / Int8Params (bitsandbytes) and integer-packed weights of other quantisers.
        if type(param).__name__ in ("Params4bit", "Int8Params") or not param.dtype.is_floating_point:
            return True
    return False
