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
    "build_calibration_set": "emo_calibrate.data",
    "load_calibration_set": "emo_calibrate.data",
    "CalibrationGuard": "emo_calibrate.guard",
    "EvalArguments": "emo_calibrate.evaluation.arguments",
    "run_evaluation": "emo_calibrate.evaluation.runner",
    "evaluate_perplexity": "emo_calibrate.evaluation.perplexity",
    "evaluate_calibration": "emo_calibrate.evaluation.calibration",
    "evaluate_generation": "emo_calibrate.evaluation.generation",
    "run_lm_eval": "emo_calibrate.evaluation.lm_eval_adapter",
    "TrainingInterrupted": "emo_calibrate.callbacks",
    "NonFiniteTrainingError": "emo_calibrate.callbacks",
    "merge_adapter": "emo_calibrate.merge",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'emo_calibrate' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
