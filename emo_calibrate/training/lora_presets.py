"""Named LoRA settings, so a user can pick the official EMO setting without knowing a model's module names.

- `official`: what the official LoRA continual fine-tuning script does (DRSY/EMO `continual_finetuning/
  finetune_lora.sh` + `run_clm_trainer_emo.py`): `LoraConfig(r=32, lora_alpha=16, lora_dropout=0.05)` with no
  `target_modules`, so PEFT picks its default modules for the model type: the attention query and value projections
  (`q_proj`, `v_proj`) for LLaMA, Mistral, Qwen2/3 and Gemma; the fused query-key-value projection where a family
  has no separate ones (`c_attn` for GPT-2, `query_key_value` for Falcon and GPT-NeoX). Scale alpha / r = 0.5.
- `all-linear`: every linear layer of the blocks, r=16, alpha=32 (scale 2): a much larger update per step (the
  0.1 versions' default; with EMO it drifts several times faster, docs/results.md).

`emo-calibrate train --lora_preset official` (or `lora_preset: official` in a recipe) fills in the four LoRA options;
Python users call `lora_config("official")` for the `peft_config` of `EMOTrainer`.
"""

from dataclasses import dataclass


__all__ = [
    "DEFAULT_LORA_PRESET",
    "LORA_PRESETS",
    "LoraPreset",
    "check_lora_targets",
    "lora_config",
    "resolve_target_modules",
]


@dataclass(frozen=True)
class LoraPreset:
    """A named LoRA setting: the four options of TRL's `ModelConfig` it sets, and where it comes from.

    Args:
        r (`int`): LoRA rank.
        alpha (`int`): LoRA alpha (the update is scaled by alpha / r).
        dropout (`float`): dropout on the adapters' input.
        target_modules (`str | None`): PEFT's `target_modules`; `None` = PEFT's default for the model type.
        source (`str`): one line saying where the setting comes from.
    """

    r: int
    alpha: int
    dropout: float
    target_modules: str | None
    source: str

    def options(self) -> dict:
        """The `emo-calibrate train` options (TRL `ModelConfig` fields) this preset sets."""
        # a single module name is a string, as TRL's ModelConfig leaves it ("all-linear" is PEFT's shorthand)
        return dict(
            lora_r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, lora_target_modules=self.target_modules
        )


LORA_PRESETS: dict[str, LoraPreset] = {
    "official": LoraPreset(
        r=32,
        alpha=16,
        dropout=0.05,
        target_modules=None,
        source="the official EMO LoRA script (DRSY/EMO finetune_lora.sh): PEFT's default modules, q_proj + v_proj "
        "for LLaMA-family models",
    ),
    "all-linear": LoraPreset(
        r=16,
        alpha=32,
        dropout=0.05,
        target_modules="all-linear",
        source="every linear layer of the blocks (emo_calibrate 0.1-0.2's default)",
    ),
}
DEFAULT_LORA_PRESET = "official"


def _preset(name: str) -> LoraPreset:
    if name not in LORA_PRESETS:
        raise ValueError(f"unknown LoRA preset {name!r}; choose one of {sorted(LORA_PRESETS)}.")
    return LORA_PRESETS[name]


def lora_config(name: str = DEFAULT_LORA_PRESET, **overrides):
    """A `peft.LoraConfig` for causal-LM calibration from a named preset.

    Args:
        name (`str`, *optional*, defaults to `"official"`): a key of `LORA_PRESETS`.
        overrides: any other `LoraConfig` argument (they win over the preset's).

    Example:

    ```python
    trainer = EMOTrainer(model=..., args=EMOConfig(...), train_dataset=..., peft_config=lora_config("official"))
    ```
    """
    from peft import LoraConfig

    preset = _preset(name)
    kwargs = dict(
        r=preset.r,
        lora_alpha=preset.alpha,
        lora_dropout=preset.dropout,
        target_modules=preset.target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )
    kwargs.update(overrides)
    return LoraConfig(**kwargs)


def resolve_target_modules(target_modules, model_type: str | None) -> list[str] | str:
    """The modules LoRA will adapt: `target_modules` as given, or PEFT's default for `model_type` when it is `None`.

    Raises:
        `ValueError`: `target_modules` is `None` and PEFT has no default for `model_type` (PEFT itself would only
            fail once the model is loaded).
    """
    if target_modules is not None:
        return target_modules
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    if model_type not in DEFAULTS:
        raise ValueError(
            f"PEFT has no default LoRA modules for model type {model_type!r}, which the 'official' LoRA preset relies "
            "on. Name the attention query and value projections of this architecture (or its fused query-key-value "
            "projection) with --lora_target_modules NAME [NAME ...]."
        )
    return list(DEFAULTS[model_type])


def check_lora_targets(peft_config, model_type: str | None) -> None:
    """Before the model loads: a LoRA config that leaves `target_modules` to PEFT must have a default for this model
    type (the `official` preset does). Anything else is left to PEFT."""
    if peft_config is None or model_type is None or not hasattr(peft_config, "target_modules"):
        return
    if getattr(peft_config, "target_parameters", None):
        return
    resolve_target_modules(peft_config.target_modules, model_type)
