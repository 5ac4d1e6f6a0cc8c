"""EMOConfig: defaults, validation messages, CLI help and serialisation."""

import dataclasses
import json

import pytest
from trl import TrlParser

from emo_calibrate import EMOConfig


EMO_FIELDS = [
    "emo_weighting",
    "emo_ratio_clamp",
    "emo_subtract_target_mass",
    "emo_cost_embedding",
    "emo_fused_head",
    "emo_chunk_size",
]


def test_defaults_are_the_official_continual_finetuning_setting(tmp_path):
    config = EMOConfig(output_dir=str(tmp_path), report_to="none")
    assert config.emo_weighting == "mle_anchored"
    assert config.emo_subtract_target_mass is True
    assert config.emo_ratio_clamp is None
    assert config.emo_cost_embedding == "frozen"
    assert config.emo_fused_head is True


def test_cpu_machine_falls_back_to_fp32_only_when_bf16_is_unset(tmp_path):
    assert EMOConfig(output_dir=str(tmp_path), report_to="none").bf16 is False
    # an explicit request is the user's: on CPU, bf16 autocast needs use_cpu=True
    assert EMOConfig(output_dir=str(tmp_path), report_to="none", bf16=True, use_cpu=True).bf16 is True


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(emo_weighting="emo3"), "emo_weighting='emo3' is not one of"),
        (dict(emo_weighting="emo_anchored", emo_ratio_clamp=3.0), "only applies to emo_weighting='mle_anchored'"),
        (dict(emo_weighting="mle_anchored", emo_ratio_clamp=0.0), "must be > 0"),
        (dict(emo_cost_embedding="/no/such/file.safetensors"), "neither 'frozen', 'adaptive' nor an existing path"),
        (dict(emo_chunk_size=0), "positive number of tokens"),
    ],
)
def test_invalid_options_say_what_to_do(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        EMOConfig(output_dir=str(tmp_path), report_to="none", **overrides)


def test_every_emo_field_is_documented_in_docstring_and_help():
    fields = {f.name: f for f in dataclasses.fields(EMOConfig)}
    for name in EMO_FIELDS:
        assert name in EMOConfig.__doc__, name
        assert fields[name].metadata.get("help"), name


def test_help_lists_emo_fields(capsys):
    parser = TrlParser((EMOConfig,))
    with pytest.raises(SystemExit):
        parser.parse_args_and_config(["--help"])
    text = capsys.readouterr().out
    for name in EMO_FIELDS:
        assert f"--{name}" in text
    assert "emo_anchored" in text and "mle_anchored" in text


def test_parse_from_yaml_and_command_line(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("output_dir: out\nemo_weighting: mle_anchored\nemo_ratio_clamp: 3.0\nreport_to: none\n")
    (config,) = TrlParser((EMOConfig,)).parse_args_and_config(
        ["--config", str(recipe), "--emo_subtract_target_mass", "false"]
    )
    assert config.emo_weighting == "mle_anchored" and config.emo_ratio_clamp == 3.0
    assert config.emo_subtract_target_mass is False


def test_unknown_yaml_key_is_rejected(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("output_dir: out\nemo_wieghting: mle\n")
    with pytest.raises(ValueError, match="emo_wieghting"):
        TrlParser((EMOConfig,)).parse_args_and_config(["--config", str(recipe)])


def test_to_dict_round_trip(tmp_path):
    config = EMOConfig(output_dir=str(tmp_path), report_to="none", emo_weighting="mle_anchored", emo_ratio_clamp=2.5)
    data = json.loads(config.to_json_string())
    assert data["emo_weighting"] == "mle_anchored" and data["emo_ratio_clamp"] == 2.5
