"""Every recipe parses with `emo-calibrate train`'s parser (unknown keys rejected) and has the settings it claims."""

from pathlib import Path

import pytest
import torch
import yaml

from emo_calibrate.cli import train as cli_train
from emo_calibrate.demo import DEMO_RECIPE


RECIPES = Path(__file__).resolve().parents[2] / "recipes"
TRAIN_RECIPES = sorted(RECIPES.glob("*.yaml"))
SEVEN_B = [p for p in TRAIN_RECIPES if "_qlora_" in p.name]
ACCELERATE = sorted((RECIPES / "accelerate").glob("*.yaml"))


def parse_recipe(path, *overrides):
    # the 7B recipes ask for bf16, which the Trainer refuses on a machine without a GPU unless use_cpu is set
    return cli_train.parse(["--config", str(path), "--use_cpu", "true", *overrides])


def test_the_expected_recipes_exist():
    names = {p.name for p in TRAIN_RECIPES}
    assert {
        "demo.yaml",
        "llama2-7b_qlora_emo.yaml",
        "llama2-7b_qlora_mle.yaml",
        "mistral-7b_qlora_emo.yaml",
        "llama3.1-8b_qlora_emo.yaml",
        "qwen2.5-7b_qlora_emo.yaml",
    } <= names
    assert {p.name for p in ACCELERATE} == {"ddp.yaml", "fsdp.yaml", "deepspeed_zero2.yaml", "deepspeed_zero3.yaml"}
    # recipes/demo.yaml is the packaged embedded default itself
    assert (RECIPES / "demo.yaml").read_text() == DEMO_RECIPE.read_text()


@pytest.mark.parametrize("path", TRAIN_RECIPES, ids=lambda p: p.name)
def test_recipe_parses_and_documents_itself(path):
    text = path.read_text()
    keys = yaml.safe_load(text)
    script_args, training_args, model_args, options, _ = parse_recipe(path)
    parsed = {**vars(script_args), **vars(model_args), **training_args.to_dict(), **vars(options)}
    for key, value in keys.items():  # every key is an option name and arrives with the recipe's value
        got = parsed[key]
        if key == "report_to":
            assert got in ([], "none", ["none"]) if value == "none" else got == value
        elif isinstance(value, float) or key in ("learning_rate", "warmup_steps"):
            assert float(got) == pytest.approx(float(value)), key
        else:
            assert got == value, key
    assert training_args.learning_rate == float(keys["learning_rate"])
    # torchtune-style header and sections
    assert text.startswith("#") and "emo-calibrate train" in text.split("\n###")[0]
    for section in ("### model", "### lora", "### emo", "### train"):
        assert section in text, section


@pytest.mark.parametrize("path", TRAIN_RECIPES, ids=lambda p: p.name)
def test_recipes_use_current_option_names(path):
    """No recipe spells an option that transformers or TRL deprecated (e.g. `gradient_checkpointing`)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        parse_recipe(path)


def test_unknown_recipe_keys_are_rejected(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((RECIPES / "llama2-7b_qlora_emo.yaml").read_text() + "lora_rank: 64\n")
    with pytest.raises(SystemExit, match="lora_rank"):
        parse_recipe(bad)


@pytest.mark.parametrize("path", SEVEN_B, ids=lambda p: p.name)
def test_7b_recipes_have_the_papers_calibration_settings(path):
    from trl import get_peft_config, get_quantization_config

    script_args, training_args, model_args, _, _ = parse_recipe(path)
    assert training_args.learning_rate == 2e-5 and training_args.num_train_epochs == 1
    assert training_args.max_length == 256 and training_args.packing
    assert training_args.emo_weighting == ("mle" if path.name.endswith("_mle.yaml") else "mle_anchored")
    assert training_args.emo_cost_embedding == "frozen" and training_args.emo_subtract_target_mass
    assert training_args.bf16 and training_args.activation_checkpointing
    quant = get_quantization_config(model_args)
    assert quant.load_in_4bit and quant.bnb_4bit_quant_type == "nf4" and quant.bnb_4bit_use_double_quant
    assert quant.bnb_4bit_compute_dtype == torch.bfloat16
    lora = get_peft_config(model_args)
    # the official EMO LoRA setting, by name: PEFT's default modules for the family (q_proj + v_proj)
    assert (lora.r, lora.lora_alpha, lora.lora_dropout, lora.target_modules) == (32, 16, 0.05, None)
    assert "lora_preset: official" in path.read_text() and "finetune_lora.sh" in path.read_text()
    assert script_args.dataset_name and script_args.dataset_test_split == "test"
    header = path.read_text().split("\n###")[0]
    assert "emo-calibrate data" in header and "UNVERIFIED" in header and "GB" in header


def test_the_mle_twin_differs_only_in_the_weighting():
    emo = yaml.safe_load((RECIPES / "llama2-7b_qlora_emo.yaml").read_text())
    mle = yaml.safe_load((RECIPES / "llama2-7b_qlora_mle.yaml").read_text())
    assert {k for k in emo if emo[k] != mle.get(k)} == {"emo_weighting", "output_dir"} and emo.keys() == mle.keys()
    assert (emo["emo_weighting"], mle["emo_weighting"]) == ("mle_anchored", "mle")


@pytest.mark.parametrize("path", ACCELERATE, ids=lambda p: p.name)
def test_accelerate_configs_load_and_name_their_launch_command(path):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    config = load_config_from_file(str(path))  # unknown top-level keys raise here
    launch_options = {action.dest for action in launch_command_parser()._actions}
    for key in list(config.fsdp_config) + list(config.deepspeed_config):
        assert key in launch_options, key  # nested keys become `accelerate launch --<key>` options
    header = path.read_text().split("\ncompute_environment")[0]
    assert f"accelerate launch --config_file recipes/accelerate/{path.name}" in header
    assert "-m emo_calibrate.cli.main train" in header and "--config recipes/" in header and "EMO under" in header
