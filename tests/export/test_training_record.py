"""Reading training_args.bin / trainer_state.json from an adapter folder without executing anything."""

import json
import os
from dataclasses import dataclass, field

import torch

from emo_calibrate.export.records import read_trainer_state, read_training_args, summarize_training_run


@dataclass
class FakeEMOArgs:  # pickled by reference; the reader never imports it
    learning_rate: float = 1e-4
    max_steps: int = 7
    emo_weighting: str = "emo_anchored"
    emo_ratio_clamp: float | None = None
    model_init_kwargs: dict = field(
        default_factory=lambda: {"dtype": torch.bfloat16, "quantization_config": {"bnb_4bit_quant_type": "nf4"}}
    )


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch exploited",))


def test_training_args_from_trl_config(tmp_path):
    from trl import SFTConfig

    torch.save(
        SFTConfig(output_dir=str(tmp_path / "o"), use_cpu=True, learning_rate=3e-4), tmp_path / "training_args.bin"
    )
    args = read_training_args(tmp_path)
    assert args["learning_rate"] == 3e-4
    assert args["lr_scheduler_type"] == "linear"  # an enum, read back as its value
    assert args["max_length"] == 1024


def test_summary_has_emo_fields_and_run_facts(tmp_path):
    torch.save(FakeEMOArgs(), tmp_path / "training_args.bin")
    (tmp_path / "trainer_state.json").write_text(
        json.dumps({"global_step": 7, "log_history": [{"loss": 2.5, "step": 5}, {"train_loss": 2.4, "step": 7}]})
    )
    args = read_training_args(tmp_path)
    assert args["model_init_kwargs"] == {"dtype": "bfloat16", "quantization_config": {"bnb_4bit_quant_type": "nf4"}}
    assert summarize_training_run(tmp_path) == {
        "emo_ratio_clamp": None,
        "emo_weighting": "emo_anchored",
        "learning_rate": 1e-4,
        "max_steps": 7,
        "global_step": 7,
        "last_logged_loss": 2.5,
    }
    assert read_trainer_state(tmp_path)["global_step"] == 7


def test_reading_never_executes_the_pickle(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"learning_rate": 1.0, "payload": _Exploit()}, tmp_path / "training_args.bin")
    args = read_training_args(tmp_path)
    assert args["learning_rate"] == 1.0
    assert not (tmp_path / "exploited").exists()


def test_missing_or_broken_files_give_nothing(tmp_path):
    assert read_training_args(tmp_path) is None and read_trainer_state(tmp_path) is None
    assert summarize_training_run(tmp_path) == {}
    (tmp_path / "training_args.bin").write_bytes(b"not a zip")
    (tmp_path / "trainer_state.json").write_text("{")
    assert read_training_args(tmp_path) is None and read_trainer_state(tmp_path) is None
