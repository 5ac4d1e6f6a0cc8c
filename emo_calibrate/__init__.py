"""emo_calibrate: calibrate pretrained causal LMs with EMO (Earth Mover Distance Optimization) on TRL + PEFT.

Public names are imported lazily, so `import emo_calibrate` is cheap and never touches a network or a GPU.
"""

import importlib


__version__ = "0.1.0"

_LAZY = {
    "emo_loss": "emo_calibrate.losses.reference",
    "EMOLoss": "emo_calibrate.losses.reference",
    "EMOLossOutput": "emo_calibrate.losses.reference",
    "fused_linear_emo_loss": "emo_calibrate.losses.fused",
    "EMOConfig": "emo_calibrate.training.config",
    "EMOTrainer": "emo_calibrate.training.trainer",
    "build_calibration_set": "emo_calibrate.data",
    "load_calibration_set": "emo_calibrate.data",
    "PerplexityBudget": "emo_calibrate.training.perplexity_budget",
    "EvalArguments": "emo_calibrate.evaluation.arguments",
    "run_evaluation": "emo_calibrate.evaluation.runner",
    "evaluate_perplexity": "emo_calibrate.evaluation.perplexity",
    "evaluate_calibration": "emo_calibrate.evaluation.calibration",
    "evaluate_generation": "emo_calibrate.evaluation.generation",
    "run_lm_eval": "emo_calibrate.evaluation.lm_eval_adapter",
    "TrainingInterrupted": "emo_calibrate.training.callbacks",
    "NonFiniteTrainingError": "emo_calibrate.training.callbacks",
    "merge_adapter": "emo_calibrate.export.merge",
    "lora_config": "emo_calibrate.training.lora_presets",
    "LORA_PRESETS": "emo_calibrate.training.lora_presets",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'emo_calibrate' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
