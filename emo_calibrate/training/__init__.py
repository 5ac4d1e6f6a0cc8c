"""The TRL integration and what keeps a run safe.

- `config.py`: `EMOConfig(SFTConfig)`, the EMO fields and their validation;
- `trainer.py`: `EMOTrainer(SFTTrainer)`, which overrides `compute_loss` (and small save / resume hooks);
- `callbacks.py`: the non-finite step guard, the stop on SIGTERM / Ctrl-C;
- `perplexity_budget.py`, `holdout.py`: the perplexity budget (on by default) and its held-out split;
- `checkpointing.py`: what an exact resume needs beyond the Trainer's checkpoint, and the refusal to save NaN weights;
- `validation.py`: bad input turned into one clear error before the model loads.

Imported lazily by `emo_calibrate`; importing this package imports TRL.
"""
