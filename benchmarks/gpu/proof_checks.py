"""Quick bitsandbytes checks of the GPU proof: do the 4-bit kernels work here, and do CPU and CUDA produce the same
NF4 codes (docs/merge.md, "Open question: CPU vs CUDA 4-bit codes")."""

__all__ = ["bitsandbytes_problem", "nf4_cpu_vs_cuda"]


def bitsandbytes_problem(device: str) -> str | None:
    """None if bitsandbytes' 4-bit kernels work on `device` (a small NF4 round trip), else what went wrong."""
    import torch

    try:
        import bitsandbytes.functional as bnbf

        x = torch.randn(256, 256, device=device, dtype=torch.bfloat16)
        packed, state = bnbf.quantize_4bit(x, quant_type="nf4")
        error = ((bnbf.dequantize_4bit(packed, state).float() - x.float()).norm() / x.float().norm()).item()
        return None if error < 0.2 else f"NF4 round trip error {error:.3f}"
    except Exception as error:  # noqa: BLE001 - any failure means no 4-bit here
        return f"{type(error).__name__}: {error}"


def nf4_cpu_vs_cuda(rows: int = 1024, cols: int = 4096, seed: int = 0) -> dict:
    """Quantise one random bf16 weight (std 0.02) to NF4 with double quantisation on the CPU and on CUDA.

    Returns:
        `dict`: the share of packed bytes that differ, whether the (double-quantised) block scales are equal, and the
        largest difference of the dequantised weights (each dequantised where it was quantised, and the CUDA codes
        dequantised on the CPU), relative to the largest weight.
    """
    import bitsandbytes.functional as bnbf
    import torch

    try:
        weight = (torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.02).bfloat16()
        options = dict(quant_type="nf4", compress_statistics=True, blocksize=64)
        packed_cpu, state_cpu = bnbf.quantize_4bit(weight, **options)
        packed_gpu, state_gpu = bnbf.quantize_4bit(weight.cuda(), **options)
        deq_cpu = bnbf.dequantize_4bit(packed_cpu, state_cpu).float()
        deq_gpu = bnbf.dequantize_4bit(packed_gpu, state_gpu).float().cpu()
        state_gpu.to("cpu")
        deq_gpu_codes_on_cpu = bnbf.dequantize_4bit(packed_gpu.cpu(), state_gpu).float()
        scale = weight.float().abs().max().item()
        return {
            "shape": [rows, cols],
            "packed_bytes_differing": (packed_cpu.flatten() != packed_gpu.cpu().flatten()).float().mean().item(),
            "block_scales_equal": bool(torch.equal(state_cpu.absmax.cpu(), state_gpu.absmax.cpu())),
            "max_dequantized_diff_rel": (deq_cpu - deq_gpu).abs().max().item() / scale,
            "max_cuda_codes_dequantized_on_cpu_vs_cuda_rel": (deq_gpu_codes_on_cpu - deq_gpu).abs().max().item()
            / scale,
        }
    except Exception as error:  # noqa: BLE001 - a side question: report, never stop the proof
        return {"error": f"{type(error).__name__}: {error}"}
