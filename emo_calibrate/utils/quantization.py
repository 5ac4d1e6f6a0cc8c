"""A guard for bitsandbytes 4-bit models on CPU, shared by training, evaluation and merging.

bitsandbytes (0.50) has a CPU fast path that silently breaks QLoRA on CPUs with AVX512-BF16: the first forward of a
`bnb.nn.Linear4bit` in eval mode with an input that does not require grad *permanently* repacks the weight into a
CPU-specific layout (`quant_state.packing_format_for_cpu = True`). After that, gradients through the frozen weight are
dropped (the packed kernel has no autograd) and `dequantize()` / merging read the packed bytes as if they were the
original layout, giving garbage weights. Triggers: `model.eval()` + a no-grad forward, `Trainer.evaluate()`, and
`PeftModel.from_pretrained` (which returns the model in eval mode). GPUs are unaffected.
"""

__all__ = ["disable_cpu_4bit_repacking"]


def disable_cpu_4bit_repacking(model) -> int:
    """Stop bitsandbytes from repacking the 4-bit weights of `model` (any module tree) on eval/no-grad forwards.

    Call it after every load of a 4-bit model that may run on CPU, and again after `PeftModel.from_pretrained`; it is
    harmless elsewhere. Returns the number of `bnb.nn.Linear4bit` modules visited (0 without bitsandbytes).
    """
    try:
        import bitsandbytes as bnb
    except ImportError:  # no bitsandbytes, hence no 4-bit layers to protect
        return 0
    layers = [module for module in model.modules() if isinstance(module, bnb.nn.Linear4bit)]
    for module in layers:
        module.support_avx512bf16_for_cpu = False  # read in Linear4bit.forward: it repacks only while True
    return len(layers)
