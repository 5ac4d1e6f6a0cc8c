"""Named LoRA settings: `--lora_preset official` is the official EMO LoRA script's setting on any model family, the
command line wins over it, and a recipe that contradicts its own preset is refused."""

import pytest
import torch
from peft import get_peft_model
from tiny_models import build_tiny_model

from emo_calibrate import lora_config
from emo_calibrate.cli import train as cli_train
from emo_calibrate.training.lora_presets import check_lora_targets, resolve_target_modules


USER = ["--model_name_or_path", "org/My-Model-7B", "--dataset_name", "my_sentences.jsonl"]


@pytest.fixture(autouse=True)
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def adapted_modules(model) -> set[str]:
    return {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if hasattr(module, "lora_A")}


def test_official_preset_adapts_query_and_value_at_half_scale():
    model = get_peft_model(build_tiny_model("llama"), lora_config("official"))
    assert adapted_modules(model) == {"q_proj", "v_proj"}
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.r["default"] == 32 and layer.scaling["default"] == 0.5
    assert layer.lora_dropout["default"].p == 0.05


def test_all_linear_preset_adapts_every_block_linear():
    model = get_peft_model(build_tiny_model("llama"), lora_config("all-linear"))
    assert adapted_modules(model) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert model.base_model.model.model.layers[0].mlp.up_proj.scaling["default"] == 2.0


def test_cli_preset_fills_the_lora_options_and_the_command_line_wins():
    _, _, model_args, options, _ = cli_train.parse([*USER, "--lora_preset", "all-linear"])
    assert options.lora_preset == "all-linear"
    assert (model_args.lora_r, model_args.lora_alpha, model_args.lora_target_modules) == (16, 32, "all-linear")
    _, _, model_args, _, _ = cli_train.parse([*USER, "--lora_preset", "official", "--lora_r", "8"])
    assert (model_args.lora_r, model_args.lora_alpha, model_args.lora_target_modules) == (8, 16, None)
    with pytest.raises(SystemExit):  # argparse: not one of the choices
        cli_train.parse([*USER, "--lora_preset", "everything"])


def test_recipe_preset(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("use_peft: true\nlora_preset: official\nlora_dropout: 0.05\n")  # agrees with the preset
    _, _, model_args, _, _ = cli_train.parse(["--config", str(recipe), *USER])
    assert (model_args.lora_r, model_args.lora_alpha, model_args.lora_target_modules) == (32, 16, None)
    recipe.write_text("use_peft: true\nlora_preset: official\nlora_r: 16\n")
    with pytest.raises(SystemExit, match="lora_preset: official and also lora_r: 16"):
        cli_train.parse(["--config", str(recipe), *USER])
    # the command line's preset wins over the recipe's own LoRA options
    _, _, model_args, _, _ = cli_train.parse(["--config", str(recipe), *USER, "--lora_preset", "all-linear"])
    assert (model_args.lora_r, model_args.lora_target_modules) == (16, "all-linear")
    recipe.write_text("use_peft: false\nlora_preset: official\n")
    with pytest.raises(SystemExit, match="use_peft is false"):
        cli_train.parse(["--config", str(recipe), *USER])


def test_families_without_a_peft_default_are_refused_before_loading():
    assert resolve_target_modules(None, "gpt2") == ["c_attn"]  # fused query-key-value: the equivalent
    assert resolve_target_modules(None, "llama") == ["q_proj", "v_proj"]
    assert resolve_target_modules(["w_q"], "mystery") == ["w_q"]  # named modules are PEFT's business
    with pytest.raises(ValueError, match="--lora_target_modules"):
        check_lora_targets(lora_config("official"), "mystery")
    check_lora_targets(lora_config("all-linear"), "mystery")
