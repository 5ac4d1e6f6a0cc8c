"""Checkpoints are whole or absent: a checkpoint whose write was killed is never resumed from, and the previous
complete one survives the kill (it is rotated away only once the new one is complete)."""

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny_models import lora, make_args

from emo_calibrate import EMOTrainer
from emo_calibrate.training.checkpointing import STATUS_FILE, begin_checkpoint


HERE = Path(__file__).parent


def killed_during_checkpoint(model_dir, out, where):
    """Run kill_during_checkpoint.py until it blocks inside the write of checkpoint-4, then SIGKILL it."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parents[1]), str(HERE.parent)]))
    process = subprocess.Popen([sys.executable, str(HERE / "kill_during_checkpoint.py"), model_dir, str(out), where],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while not (out / "paused").exists():
            assert process.poll() is None, process.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "the run never reached checkpoint-4"
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        process.kill()
        process.stderr.close()
    return out / "checkpoint-2", out / "checkpoint-4"


def resumed_trainer(model_dir, out, dataset, steps=3):
    args = make_args(out.parent, output_dir=str(out), max_steps=steps)
    return EMOTrainer(model_dir, args=args, train_dataset=dataset, peft_config=lora())


@pytest.mark.parametrize("where", ["optimizer", "emo_state"])
def test_a_checkpoint_killed_while_written_is_never_resumed(where, tmp_path, tiny_llama_dir, tiny_dataset, caplog):
    out = tmp_path / "run"
    previous, partial = killed_during_checkpoint(tiny_llama_dir, out, where)
    assert partial.is_dir()
    assert previous.is_dir(), "the complete checkpoint was rotated away before the new one was complete"

    with pytest.raises(ValueError, match=rf"checkpoint-4'? is incomplete.*previous complete checkpoint is {previous}"):
        resumed_trainer(tiny_llama_dir, out, tiny_dataset).train(resume_from_checkpoint=str(partial))

    trainer = resumed_trainer(tiny_llama_dir, out, tiny_dataset)
    with caplog.at_level(logging.WARNING, logger="emo_calibrate"):
        trainer.train(resume_from_checkpoint=True)
    assert f"{partial} is incomplete" in caplog.text and f"resuming from {previous}" in caplog.text
    assert trainer.state.global_step == 3
    assert [h["step"] for h in trainer.state.log_history if "loss" in h] == [1, 2, 3]


def test_rewritten_or_truncated_checkpoints_are_incomplete(tmp_path, tiny_llama_dir, tiny_dataset):
    out = tmp_path / "run"
    args = make_args(tmp_path, output_dir=str(out), max_steps=2, save_strategy="steps", save_steps=1)
    EMOTrainer(tiny_llama_dir, args=args, train_dataset=tiny_dataset, peft_config=lora()).train()
    assert '"complete": true' in (out / "checkpoint-2" / STATUS_FILE).read_text()

    weights = out / "checkpoint-2" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # e.g. a disk that filled up after the save
    with pytest.raises(ValueError, match=r"adapter_model.safetensors is missing or truncated.*checkpoint-1"):
        resumed_trainer(tiny_llama_dir, out, tiny_dataset).train(resume_from_checkpoint=str(out / "checkpoint-2"))

    begin_checkpoint(str(out / "checkpoint-1"))  # a rewrite in place that never finished
    with pytest.raises(ValueError, match=r"holds no complete checkpoint.*incomplete: .*checkpoint-2, .*checkpoint-1"):
        resumed_trainer(tiny_llama_dir, out, tiny_dataset).train(resume_from_checkpoint=True)
