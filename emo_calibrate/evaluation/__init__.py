"""Evaluation of calibrated models: perplexity, calibration error, generation quality (MAUVE, repetition),
downstream lm-eval tasks, and a side-by-side report. See `emo-calibrate eval --help`.

Modules: `metrics` (pure metric functions), `perplexity`, `calibration`, `generation`, `lm_eval_adapter`, `texts`
(held-out text loading), `arguments` (`EvalArguments`), `runner` (`run_evaluation`), `report`. The main entry points
are also exported lazily from `emo_calibrate` itself.
"""
