"""emo_calibrate: calibrate pretrained causal LMs with EMO (Earth Mover Distance Optimization) on TRL + PEFT.

Public names are imported lazily, so `import emo_calibrate` is cheap and never touches a network or a GPU.
"""

import importlib


__version__ = "0.1.0"

_LAZY = {
    "emo_loss": "emo_calibrate.loss",
    "EMOLoss": "emo_calibrate.loss",
    "EMOLossOutput": "emo_calibrate.loss",
    "fused_linear_emo_loss": "emo_calibrate.fused",
    "EMOConfig": "emo_calibrate.config",
    "EMOTrainer": "emo_calibrate.trainer",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'emo_calibrate' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
