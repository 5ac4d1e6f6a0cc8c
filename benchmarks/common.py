"""Helpers every benchmark shares: what machine it ran on, how much memory is free, a process's memory counters.

Benchmarks import this module by path (`sys.path` gets `benchmarks/`), so it imports torch only inside functions.
"""

import os
import platform
import subprocess


__all__ = ["available_gib", "machine_info", "status_kib"]


def status_kib(field: str) -> int:
    """A field of /proc/self/status in KiB, e.g. `VmRSS` (resident now) or `VmHWM` (resident high-water mark)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def machine_info(device: str = "cpu") -> str:
    """One line naming the device, its size and the software versions, printed at the top of every benchmark."""
    import torch

    if device == "cuda":
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    model = "unknown CPU"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{model}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, torch {torch.__version__}, Python {platform.python_version()}"


def available_gib(device: str = "cpu") -> float:
    """Free memory on `device` in GiB (MemAvailable on CPU), to skip cases that would not fit."""
    if device == "cuda":
        import torch

        return torch.cuda.mem_get_info()[0] / 2**30
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:")) / 2**20


def vocab_op_recorder(vocab: int, hidden: int, head=None):
    """A `TorchDispatchMode` that records, per step, what a training step does with vocabulary-sized tensors.

    Each `new_step()` opens a record with `vocab_gemms` (a Counter of the input dtypes of every mm / addmm / bmm /
    baddbmm that has a dimension equal to `vocab` or reads the head's storage, e.g. a vocabulary tile of it),
    `head_fp32_copies` (shapes of the (V, d) head, its transpose or its tiles copied to fp32 from a lower precision)
    and `hidden_fp32_copies` (3-D (..., d) tensors copied to fp32 likewise). Ops outside an open step are not
    recorded. Used by benchmarks/bench_train_step.py and tests/training/test_mixed_precision.py.

    Args:
        vocab (`int`): V, chosen so that no other dimension of the model or the batch equals it.
        hidden (`int`): d, likewise.
        head (`torch.Tensor`, *optional*): the (V, d) output-embedding weight, to recognise its views and tiles
            (TRL's fused head projects vocabulary tiles, none of which has V rows).
    """
    import collections

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    aten = torch.ops.aten
    gemms = {aten.mm, aten.addmm, aten.bmm, aten.baddbmm}
    head_storage = None if head is None else head.untyped_storage().data_ptr()

    def of_head(t):
        return head_storage is not None and t.untyped_storage().data_ptr() == head_storage

    class VocabOpRecorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.steps = []

        def new_step(self):
            self.steps.append({"vocab_gemms": collections.Counter(), "head_fp32_copies": [], "hidden_fp32_copies": []})

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if not self.steps:
                return out
            step = self.steps[-1]
            tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            packet = func.overloadpacket
            if packet in gemms and any(vocab in t.shape or of_head(t) for t in tensors):
                step["vocab_gemms"][tuple(str(t.dtype).removeprefix("torch.") for t in tensors)] += 1
            source = None
            if packet is aten._to_copy and out.dtype == torch.float32 and tensors[0].dtype != torch.float32:
                source = tensors[0]
            elif packet is aten.copy_ and tensors[0].dtype == torch.float32 and tensors[1].dtype != torch.float32:
                source = tensors[1]
            if source is not None:
                shape = tuple(source.shape)
                if shape in ((vocab, hidden), (hidden, vocab)) or of_head(source):
                    step["head_fp32_copies"].append(shape)
                elif len(shape) == 3 and shape[-1] == hidden:
                    step["hidden_fp32_copies"].append(shape)
            return out

    return VocabOpRecorder()
