"""The defaults of `emo-calibrate train`: a recipe as it is, the embedded demo, or calibration defaults for the hardware.

Which defaults apply (explicit command-line values always win over all of them):

- `--config RECIPE.yaml`: the recipe, as it is (and the dataclasses' own defaults for what it leaves out);
- no `--config`, no `--model_name_or_path` and no `--dataset_name`: the embedded demo recipe
  (`emo_calibrate/demo/recipe.yaml`: SmolLM2-135M on Wikipedia articles, 60 CPU-sized steps);
- no `--config` but a model or a dataset (or both): the paper's calibration setting for the hardware found
  (`calibration_defaults`); a model or dataset left out is the demo's. They are printed at start, one line per
  setting, each as the option that changes it.
"""

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..training.lora_presets import DEFAULT_LORA_PRESET


__all__ = [
    "Setting",
    "TrainDefaults",
    "apply_lora_preset",
    "calibration_defaults",
    "detect_hardware",
    "given_options",
    "recipe_keys",
]


@dataclass(frozen=True)
class Setting:
    """One default: an option name of `emo-calibrate train`, its value, and why it is the default."""

    name: str
    value: Any
    why: str


@dataclass(frozen=True)
class TrainDefaults:
    """What `parse` based the run on.

    Args:
        kind (`str`): `"recipe"` (`--config`), `"demo"` (the embedded demo recipe), `"cuda"` or `"cpu"` (the
            calibration defaults for that hardware).
        settings (`tuple[Setting, ...]`): the calibration defaults applied (empty for a recipe or the demo).
        given (`frozenset[str]`): the options set on the command line.
    """

    kind: str
    settings: tuple[Setting, ...] = ()
    given: frozenset[str] = field(default_factory=frozenset)

    @property
    def is_demo(self) -> bool:
        return self.kind == "demo"

    def lines(self, *parsed) -> list[str]:
        """The applied settings, one line each, as the command-line option with its effective value.

        Args:
            parsed: the parsed dataclasses (ScriptArguments, EMOConfig, ModelConfig, ...), read for the values in
                effect, so what is printed is what runs.
        """
        if not self.settings:
            return []
        where = "this CUDA GPU" if self.kind == "cuda" else "the CPU (no CUDA GPU found, or --use_cpu true)"
        out = [
            f"No --config: the paper's calibration setting, with defaults for {where}. Change any of them on the "
            "command line (e.g. --learning_rate 1e-5), or save them in a recipe for --config (recipes/README.md):"
        ]
        width = max(len(s.name) + len(_show(_effective(s.name, parsed))) for s in self.settings) + 4
        for setting in self.settings:
            option = f"--{setting.name} {_show(_effective(setting.name, parsed))}"
            why = "(set on the command line)" if setting.name in self.given else setting.why
            out.append(f"  {option:<{width}} {why}")
        return out


def _effective(name: str, parsed) -> Any:
    for args in parsed:
        if hasattr(args, name):
            return getattr(args, name)
    raise KeyError(f"no parsed argument has the option {name!r}")


def _show(value) -> str:
    """A value as it is written on the command line."""
    value = getattr(value, "value", value)  # the Trainer's str enums (save_strategy, lr_scheduler_type)
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value))
    return str(value)


def detect_hardware(given: dict) -> tuple[str, bool]:
    """`("cuda", bf16_supported)` on a CUDA machine (unless `--use_cpu` was given), else `("cpu", False)`."""
    import torch

    if given.get("use_cpu") or not torch.cuda.is_available():
        return "cpu", False
    return "cuda", torch.cuda.is_bf16_supported()


def given_options(parser: argparse.ArgumentParser, argv: list[str]) -> dict[str, Any]:
    """The options `argv` sets explicitly (destination -> parsed value), read with the parser's own rules.

    Every destination starts as a private marker, so argparse leaves those it does not see on the command line at
    the marker instead of filling in their defaults (abbreviations and `--no_x` flags resolve as in the real parse).
    """
    unset = object()
    namespace = argparse.Namespace(**{a.dest: unset for a in parser._actions if a.dest != argparse.SUPPRESS})
    parsed, _ = parser.parse_known_args(argv, namespace=namespace)
    return {name: value for name, value in vars(parsed).items() if value is not unset}


def _output_dir(model: str | None) -> str:
    name = Path(model.rstrip("/")).name if model else "smollm2-135m"
    return f"runs/{name}-emo"


def calibration_defaults(given: dict) -> tuple[str, tuple[Setting, ...]]:
    """The paper's calibration setting (the official LoRA setting, lr 2e-5, one epoch, 256-token blocks) for the
    hardware found, with periodic checkpoints.

    On a CUDA GPU: bf16 (fp16 on GPUs without bf16), a 4-bit NF4 base with double quantisation, 16 x 256 tokens per
    step. On the CPU: fp32 weights and compute, no 4-bit, 4 x 256 tokens x 4 accumulation steps. Settings that a
    command-line choice makes meaningless are left out (4-bit with `--use_peft false` or `--load_in_8bit`; LoRA
    settings with `--use_peft false`).

    Args:
        given (`dict`): the options set on the command line (`given_options`).

    Returns:
        `tuple[str, tuple[Setting, ...]]`: the hardware kind (`"cuda"` or `"cpu"`) and the settings.
    """
    from ..training.config import EMOConfig

    kind, bf16_ok = detect_hardware(given)
    budget = EMOConfig.__dataclass_fields__["emo_guard_max_ppl_ratio"].default  # printed, not changed
    lora = given.get("use_peft", True)
    if kind == "cuda":
        dtype, name = ("bfloat16", "bf16") if bf16_ok else ("float16", "fp16 (this GPU has no bf16)")
        four_bit = lora and not given.get("load_in_8bit") and given.get("load_in_4bit", True)
        precision = [
            Setting(
                "dtype", dtype, f"weights in {name}" + ("; also the 4-bit layers' compute dtype" if four_bit else "")
            ),
            Setting("bf16" if bf16_ok else "fp16", True, f"{name} mixed precision"),
        ]
        if four_bit:
            precision += [
                Setting("load_in_4bit", True, "4-bit base weights (QLoRA): a 7B model fits one 24 GB GPU"),
                Setting("bnb_4bit_quant_type", "nf4", "NormalFloat-4, the QLoRA format"),
                Setting("use_bnb_nested_quant", True, "double quantisation: ~0.4 bits/parameter less"),
            ]
        batch = [
            Setting("per_device_train_batch_size", 16, "16 x 256 tokens per step, as the official script"),
            Setting("per_device_eval_batch_size", 16, "blocks per forward when measuring held-out perplexity"),
        ]
    else:
        precision = [
            Setting("dtype", "float32", "fp32 weights, as the demo measurements"),
            Setting(
                "bf16", False, "fp32 compute; --use_cpu true --bf16 true (autocast) is faster on CPUs with bf16 units"
            ),
        ]
        if lora and not given.get("load_in_8bit"):
            precision.append(
                Setting(
                    "load_in_4bit", False, "bitsandbytes' CPU 4-bit kernels run, but save memory, not time, on a CPU"
                )
            )
        batch = [
            Setting("per_device_train_batch_size", 4, "4 blocks of 256 tokens per forward pass"),
            Setting("gradient_accumulation_steps", 4, "x 4 passes = 16 x 256 tokens per step, as the official script"),
            Setting("per_device_eval_batch_size", 4, "blocks per forward when measuring held-out perplexity"),
        ]
    adapters = [
        Setting("use_peft", True, "train LoRA adapters; the base model stays as it is"),
        Setting(
            "lora_preset",
            DEFAULT_LORA_PRESET,
            "the official EMO LoRA setting: r 32, alpha 16, dropout 0.05, PEFT's default modules (q_proj + v_proj "
            "for LLaMA-family models); the head stays frozen",
        ),
    ]
    training = [
        Setting(
            "activation_checkpointing", True, "recompute each block in backward: one extra forward, far less memory"
        ),
        Setting("learning_rate", 2e-5, "the paper's rate; emo_anchored at 5x this wrecked perplexity"),
        Setting("num_train_epochs", 1, "one pass over the calibration set"),
        Setting("warmup_steps", 0.03, "warm up over the first 3 % of the steps (official warmup_ratio)"),
        Setting("max_length", 256, "the paper's block size"),
        Setting("packing", True, "concatenate the texts and cut full blocks (the official group_texts)"),
        Setting("packing_strategy", "wrapped", "plain blocks: any attention implementation"),
        Setting("save_strategy", "steps", "periodic checkpoints"),
        Setting("save_steps", 100, "every 100 steps (--resume_from_checkpoint continues a stopped run)"),
        Setting("save_total_limit", 2, "keep the last 2 checkpoints"),
        Setting("logging_steps", 10, "log mle / emo every 10 steps (trainer_state.json in output_dir)"),
        Setting(
            "emo_guard_max_ppl_ratio",
            budget,
            f"perplexity budget: stop once held-out perplexity passes {budget}x the start's, keep the last evaluated "
            "step inside it (null = off)",
        ),
        Setting("output_dir", _output_dir(given.get("model_name_or_path")), "where the adapter and checkpoints go"),
    ]
    settings = precision + (adapters if lora else []) + batch + training
    return kind, tuple(settings)


def recipe_keys(path) -> set[str]:
    """The option names the YAML recipe at `path` sets."""
    import yaml

    with open(path, encoding="utf-8") as f:
        return set(yaml.safe_load(f) or {})


def apply_lora_preset(model_args, preset: str | None, given: dict, from_recipe: set[str]) -> None:
    """Fill the LoRA options of `model_args` (a `trl.ModelConfig`) from the named LoRA preset, in place.

    Options given on the command line (`given`) win over the preset. A recipe that names a preset and also sets one
    of its options (`from_recipe`: the recipe's keys) to another value is refused: which the author meant is unknown.
    """
    from ..training.lora_presets import LORA_PRESETS

    if preset is None:
        return
    if not model_args.use_peft:
        raise ValueError(f"lora_preset={preset!r} sets LoRA options, but use_peft is false.")
    preset_from_recipe = "lora_preset" not in given
    for name, value in LORA_PRESETS[preset].options().items():
        if name in given:
            continue
        if preset_from_recipe and name in from_recipe and getattr(model_args, name) != value:
            raise ValueError(
                f"the recipe sets lora_preset: {preset} and also {name}: {getattr(model_args, name)}, "
                f"which the preset sets to {value}. Keep one of the two (or override on the command line)."
            )
        setattr(model_args, name, value)
