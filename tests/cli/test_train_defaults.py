"""Which defaults `emo-calibrate train` applies: the demo recipe only for the demo, the calibration defaults for the
hardware for a user's model or data, a recipe as it is, and the command line over all of them."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from emo_calibrate.cli import train as cli_train
from emo_calibrate.cli.train_defaults import _effective


MODEL, DATA = "org/My-Model-7B", "my_sentences.jsonl"  # parse never opens them
USER = ["--model_name_or_path", MODEL, "--dataset_name", DATA]


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture(params=[True, False], ids=["bf16-gpu", "fp16-gpu"])
def fake_cuda(monkeypatch, request):
    """A CUDA machine as `parse` and `TrainingArguments` see it (bf16 support per the parameter); nothing runs on it."""
    import transformers.training_args
    import transformers.utils

    bf16 = request.param
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda *a: None)
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
    monkeypatch.setattr(transformers.training_args, "is_torch_bf16_gpu_available", lambda *a, **k: bf16)
    monkeypatch.setattr(transformers.utils, "is_torch_bf16_gpu_available", lambda *a, **k: bf16)
    return bf16


def _calibration_setting(training_args, model_args):
    """What every user default shares: the paper's LoRA calibration, one epoch, packed 256-token blocks."""
    from trl import get_peft_config

    assert (
        training_args.learning_rate == 2e-5 and training_args.num_train_epochs == 1 and training_args.max_steps == -1
    )
    assert training_args.max_length == 256 and training_args.packing and training_args.packing_strategy == "wrapped"
    assert training_args.activation_checkpointing and training_args.gradient_checkpointing  # the old name mirrors
    assert training_args.save_strategy == "steps" and training_args.save_steps == 100
    assert training_args.save_total_limit == 2 and training_args.emo_weighting == "mle_anchored"
    lora = get_peft_config(model_args)
    # the official EMO LoRA setting: PEFT's default modules for the model type (q_proj + v_proj for LLaMA)
    assert (lora.r, lora.lora_alpha, lora.lora_dropout, lora.target_modules) == (32, 16, 0.05, None)


def test_only_the_demo_gets_the_demo_recipe(no_gpu):
    for argv in ([], ["--max_steps", "5"], ["--emo_weighting", "mle"]):
        *_, defaults = cli_train.parse(argv)
        assert defaults.is_demo and defaults.settings == (), argv
    # a model or a dataset alone: the calibration defaults (the missing one is filled with the demo's by main())
    for argv, model, data in (
        (["--model_name_or_path", MODEL], MODEL, None),
        (["--dataset_name", DATA], None, DATA),
        (USER, MODEL, DATA),
    ):
        script_args, training_args, model_args, _, defaults = cli_train.parse(argv)
        assert defaults.kind == "cpu" and not defaults.is_demo, argv
        assert (model_args.model_name_or_path, script_args.dataset_name) == (model, data)
        _calibration_setting(training_args, model_args)
    # the output folder is named after the model (the demo model when none is given)
    assert cli_train.parse(USER)[1].output_dir == "runs/My-Model-7B-emo"
    assert cli_train.parse(["--dataset_name", DATA])[1].output_dir == "runs/smollm2-135m-emo"


def test_user_model_on_the_cpu(no_gpu):
    _, training_args, model_args, _, defaults = cli_train.parse(USER)
    _calibration_setting(training_args, model_args)
    assert model_args.dtype == "float32" and not training_args.bf16 and not training_args.fp16
    assert not model_args.load_in_4bit and model_args.use_peft
    assert (training_args.per_device_train_batch_size, training_args.gradient_accumulation_steps) == (4, 4)
    assert not training_args.dataloader_pin_memory
    assert defaults.kind == "cpu"


def test_user_model_on_a_cuda_gpu(fake_cuda):
    from trl import get_quantization_config

    _, training_args, model_args, _, defaults = cli_train.parse(USER)
    _calibration_setting(training_args, model_args)
    dtype = torch.bfloat16 if fake_cuda else torch.float16
    assert model_args.dtype == str(dtype).removeprefix("torch.")
    assert (training_args.bf16, training_args.fp16) == (fake_cuda, not fake_cuda)
    quant = get_quantization_config(model_args)
    assert quant.load_in_4bit and quant.bnb_4bit_quant_type == "nf4" and quant.bnb_4bit_use_double_quant
    assert quant.bnb_4bit_compute_dtype == dtype
    assert (training_args.per_device_train_batch_size, training_args.gradient_accumulation_steps) == (16, 1)
    assert training_args.dataloader_pin_memory  # pinned memory is only turned off on the CPU
    assert defaults.kind == "cuda"
    # --use_cpu on a GPU machine: the CPU defaults
    assert cli_train.parse([*USER, "--use_cpu", "true"])[-1].kind == "cpu"


def test_command_line_values_win(fake_cuda):
    argv = [*USER, "--learning_rate", "1e-5", "--lora_r", "8", "--activation_checkpointing", "false", "--max_steps",
            "7", "--packing", "false", "--use_bnb_nested_quant", "false", "--output_dir", "mine"]  # fmt: skip
    _, training_args, model_args, _, defaults = cli_train.parse(argv)
    assert (training_args.learning_rate, model_args.lora_r, training_args.max_steps) == (1e-5, 8, 7)
    assert not training_args.activation_checkpointing and not training_args.packing
    assert not model_args.use_bnb_nested_quant and model_args.load_in_4bit and training_args.output_dir == "mine"
    assert {"learning_rate", "lora_r", "activation_checkpointing", "use_bnb_nested_quant"} <= defaults.given
    # choices that make the 4-bit default meaningless drop it instead of contradicting it
    _, _, model_args, _, _ = cli_train.parse([*USER, "--use_peft", "false"])
    assert not model_args.use_peft and not model_args.load_in_4bit
    _, _, model_args, _, _ = cli_train.parse([*USER, "--load_in_8bit"])
    assert model_args.load_in_8bit and not model_args.load_in_4bit


def test_a_recipe_is_used_as_it_is(tmp_path, no_gpu):
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("learning_rate: 1.0e-3\nuse_peft: true\n")
    _, training_args, model_args, _, defaults = cli_train.parse(["--config", str(recipe), *USER])
    assert defaults.kind == "recipe" and defaults.settings == ()
    assert training_args.learning_rate == 1e-3
    # what the recipe leaves out keeps the dataclasses' defaults, not the calibration defaults
    assert training_args.max_length == 1024 and not training_args.packing and training_args.num_train_epochs == 3
    assert training_args.activation_checkpointing  # EMOConfig's default (TRL's), under its current name


def test_printed_defaults_are_the_effective_config(no_gpu):
    """One line per applied setting, as the option that sets it; the printed options, given explicitly on a command
    line, reproduce the same configuration, and exactly the user's own options are marked as theirs."""
    argv = [*USER, "--lora_preset", "all-linear", "--learning_rate", "1e-4"]
    *parsed, defaults = cli_train.parse(argv)
    header, *lines = defaults.lines(*parsed)
    assert "No --config" in header and "the CPU" in header
    printed = [line.split()[:2] for line in lines]
    assert [name.removeprefix("--") for name, _ in printed] == [s.name for s in defaults.settings]
    for line, (name, _) in zip(lines, printed):
        assert ("(set on the command line)" in line) == (name in ("--lora_preset", "--learning_rate")), line
    assert ["--learning_rate", "0.0001"] in printed and ["--lora_preset", "all-linear"] in printed

    replayed = cli_train.parse([*USER, *(token for option in printed for token in option)])
    for name, _ in printed:
        name = name.removeprefix("--")
        assert _effective(name, replayed[:-1]) == _effective(name, parsed), name


def test_help_documents_the_defaults_and_the_start_is_quiet(tmp_path):
    """`--help` in a fresh process (so bitsandbytes is first imported by the command itself): it explains which
    defaults apply, and bitsandbytes' import-time notice about its optional CPU kernels is not shown."""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))  # this checkout, not an install
    result = subprocess.run(
        [sys.executable, "-m", "emo_calibrate.cli.main", "train", "--help"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    text = " ".join(result.stdout.split())
    for phrase in ("neither --model_name_or_path nor --dataset_name", "embedded demo", "the recipe is used as it is",
                   "4-bit NF4", "Command-line values always win", "--generation_sample"):  # fmt: skip
        assert phrase in text, phrase
    assert "kernels-community" not in result.stderr + result.stdout
