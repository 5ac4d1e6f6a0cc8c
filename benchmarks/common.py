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
