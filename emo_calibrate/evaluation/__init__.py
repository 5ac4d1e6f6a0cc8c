"""Evaluation of calibrated models: perplexity, calibration error, generation quality (MAUVE, repetition),
downstream lm-eval tasks, and a side-by-side report. See `emo-calibrate eval --help`.

Modules: `metrics` (pure metric functions), `perplexity`, `calibration`, `generation`, `lm_eval_adapter`, `texts`
(held-out text loading), `arguments` (`EvalArguments`), `runner` (`run_evaluation`), `paired` (paired differences
between models, also across runs: `paired_statistics`, `merge_results`), `report`. The main entry points are also
exported lazily from `emo_calibrate` itself.
"""

import importlib


# Lazy, so that importing `emo_calibrate.evaluation.arguments` (the CLI's parser) does not import torch.
_LAZY = {"paired_statistics": "paired", "merge_results": "paired"}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
