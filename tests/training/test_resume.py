"""Exact resume for every cost-embedding source, and the SIGTERM / Ctrl-C path that makes the checkpoint."""

import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file
from tiny_models import lora, make_args
from transformers import AutoModelForCausalLM, TrainerCallback

from emo_calibrate import EMOTrainer
from emo_calibrate.training.callbacks import StopController, TrainingInterrupted
from emo_calibrate.training.checkpointing import COST_EMBEDDING_FILE, STATE_FILE


STEPS, STOP_AT = 6, 3
# Everything a training log line holds except wall-clock figures.
LOGGED = ("loss", "mle", "emo", "emo_ratio", "entropy", "mean_token_accuracy", "grad_norm", "learning_rate",
          "num_tokens", "nonfinite_steps", "epoch")  # fmt: skip


class SignalAtStep(TrainerCallback):
    """Sends a real signal to this process at the end of optimizer step `step` (the handler runs right away)."""

    def __init__(self, step, signum=signal.SIGTERM, times=1):
        self.step, self.signum, self.times = step, signum, times

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            for _ in range(self.times):
                signal.raise_signal(self.signum)


def make_trainer(source, paths, out, callbacks=(), model=None):
    """One of the four cost-embedding set-ups on the tiny model: (cost source, LoRA or full fine-tuning)."""
    options = {
        "frozen_lora": ("frozen", True),
        "frozen_full": ("frozen", False),  # the trained head is copied before training: the copy must be checkpointed
        "adaptive_full": ("adaptive", False),
        "external_lora": (paths["external"], True),
    }
    cost, use_lora = options[source]
    model = model or (paths["llama"] if use_lora else AutoModelForCausalLM.from_pretrained(paths["tied"]))
    args = make_args(out, output_dir=str(out), max_steps=STEPS, emo_cost_embedding=cost, learning_rate=2e-2)
    return EMOTrainer(
        model,
        args=args,
        train_dataset=paths["data"],
        peft_config=lora() if use_lora else None,
        callbacks=list(callbacks),
    )


def trained_state(trainer):
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


def train_logs(trainer):
    return [
        {k: h[k] for k in LOGGED if k in h} | {"step": h["step"]} for h in trainer.state.log_history if "loss" in h
    ]


@pytest.fixture
def paths(tiny_llama_dir, tiny_tied_dir, tiny_dataset, tmp_path):
    vocab = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).config.vocab_size
    external = tmp_path / "cost.safetensors"
    save_file({"lm_head.weight": torch.randn(vocab, 24, generator=torch.Generator().manual_seed(1))}, str(external))
    return {"llama": tiny_llama_dir, "tied": tiny_tied_dir, "data": tiny_dataset, "external": str(external)}


@pytest.mark.parametrize("source", ["frozen_lora", "frozen_full", "adaptive_full", "external_lora"])
def test_interrupted_and_resumed_run_equals_uninterrupted_run(source, paths, tmp_path):
    reference = make_trainer(source, paths, tmp_path / "reference")
    reference.train()

    interrupted = make_trainer(source, paths, tmp_path / "run", callbacks=[SignalAtStep(STOP_AT)])
    with pytest.raises(TrainingInterrupted) as stopped:
        interrupted.train()
    checkpoint = stopped.value.checkpoint
    assert checkpoint == os.path.join(str(tmp_path / "run"), f"checkpoint-{STOP_AT}")
    assert f"--resume_from_checkpoint {checkpoint}" in str(stopped.value)
    assert stopped.value.exit_code == 128 + signal.SIGTERM
    assert interrupted.state.global_step == STOP_AT
    assert os.path.isfile(os.path.join(checkpoint, STATE_FILE))
    # Only a cost embedding copied before training is stored; the others are the live head or a file on disk.
    assert os.path.isfile(os.path.join(checkpoint, COST_EMBEDDING_FILE)) == (source == "frozen_full")

    if source == "frozen_full":
        # Start from the checkpoint's own (trained) weights: recapturing the head now would give the wrong cost.
        model = AutoModelForCausalLM.from_pretrained(checkpoint)
        resumed = make_trainer(source, paths, tmp_path / "run", model=model)
        assert not torch.equal(resumed._emo_cost, reference._emo_cost)
    else:
        resumed = make_trainer(source, paths, tmp_path / "run")
    resumed.train(resume_from_checkpoint=checkpoint)

    assert resumed.state.global_step == STEPS
    if source == "frozen_full":
        torch.testing.assert_close(resumed._emo_cost, reference._emo_cost, rtol=0, atol=0)
    expected, got = trained_state(reference), trained_state(resumed)
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-6, atol=1e-7, msg=name)
    expected_logs, got_logs = train_logs(reference), train_logs(resumed)
    assert [h["step"] for h in got_logs] == list(range(1, STEPS + 1))
    for want, have in zip(expected_logs, got_logs):
        assert want.keys() == have.keys()
        for key in want:
            assert have[key] == pytest.approx(want[key], rel=1e-6, abs=1e-7), (have["step"], key)


def test_resume_refuses_another_cost_embedding(paths, tmp_path):
    interrupted = make_trainer("external_lora", paths, tmp_path / "run", callbacks=[SignalAtStep(2)])
    with pytest.raises(TrainingInterrupted) as stopped:
        interrupted.train()
    save_file({"lm_head.weight": torch.randn(128, 24)}, paths["external"])  # the file changed since the run started
    resumed = make_trainer("external_lora", paths, tmp_path / "run")
    with pytest.raises(ValueError, match="cost embedding differs"):
        resumed.train(resume_from_checkpoint=stopped.value.checkpoint)


def test_resume_true_takes_the_latest_checkpoint_and_bad_paths_are_clear(paths, tmp_path):
    trainer = make_trainer("frozen_lora", paths, tmp_path / "run", callbacks=[SignalAtStep(2, signal.SIGINT)])
    with pytest.raises(TrainingInterrupted, match="SIGINT") as stopped:
        trainer.train()
    assert stopped.value.exit_code == 128 + signal.SIGINT
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored after training

    resumed = make_trainer("frozen_lora", paths, tmp_path / "run")
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == STEPS

    with pytest.raises(ValueError, match="not a checkpoint folder.*checkpoint-2"):
        make_trainer("frozen_lora", paths, tmp_path / "run").train(resume_from_checkpoint=str(tmp_path / "run" / "x"))
    with pytest.raises(ValueError, match="holds no complete checkpoint"):
        make_trainer("frozen_lora", paths, tmp_path / "empty").train(resume_from_checkpoint=True)


def test_second_signal_stops_at_once_without_a_checkpoint(paths, tmp_path, monkeypatch):
    monkeypatch.setattr(StopController, "repeat_window", 0.0)  # the second signal is not a duplicate delivery
    trainer = make_trainer("frozen_lora", paths, tmp_path / "run", callbacks=[SignalAtStep(2, signal.SIGINT, times=2)])
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert not os.path.exists(tmp_path / "run" / "checkpoint-2")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_sigterm_to_a_training_process_saves_a_checkpoint_that_resumes(paths, tmp_path):
    out = tmp_path / "run"
    tests = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = os.path.join(tests, "interruptible_training.py")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), tests])}
    process = subprocess.Popen(
        [sys.executable, script, paths["llama"], str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        for line in process.stdout:  # the script prints "step N" after each optimizer step (and slows down)
            if line.strip() == "step 2":
                process.send_signal(signal.SIGTERM)
                break
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    checkpoints = sorted(p for p in os.listdir(out) if p.startswith("checkpoint-"))
    assert len(checkpoints) == 1, checkpoints
    checkpoint = os.path.join(str(out), checkpoints[0])
    assert f"--resume_from_checkpoint {checkpoint}" in stderr
    stopped_at = int(checkpoints[0].split("-")[1])
    assert stopped_at >= 2

    args = make_args(out, output_dir=str(out), max_steps=stopped_at + 2, learning_rate=2e-2)
    resumed = EMOTrainer(paths["llama"], args=args, train_dataset=paths["data"], peft_config=lora())
    resumed.train(resume_from_checkpoint=checkpoint)
    assert resumed.state.global_step == stopped_at + 2
    assert [h["step"] for h in resumed.state.log_history if "loss" in h] == list(range(1, stopped_at + 3))
