"""bitsandbytes 4-bit helpers shared by training and merging."""

import logging


logger = logging.getLogger(__name__)

__all__ = ["disable_cpu_4bit_repacking", "is_quantized"]


def is_quantized(model) -> bool:
    """Whether `model` (or the model under a PEFT wrapper) was loaded in 4-bit or 8-bit by bitsandbytes."""
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def disable_cpu_4bit_repacking(model) -> int:
    """Keep bitsandbytes from repacking 4-bit weights into its CPU inference layout.

    On CPUs with AVX512-BF16, the first eval / no-grad forward of a `Linear4bit` permanently repacks its weight; from
    then on its matmul has no autograd (LoRA gradients through it are silently dropped) and dequantising it (merge)
    returns garbage. Turning the fast path off keeps training and merging exact. GPU paths are unaffected.

    Returns:
        `int`: the number of 4-bit layers changed (0 if bitsandbytes is missing or the model is not 4-bit).
    """
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    count = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            count += 1
    if count:
        logger.debug("Disabled the bitsandbytes CPU repacking of %d 4-bit layers.", count)
    return count
