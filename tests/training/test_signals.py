"""SIGTERM / Ctrl-C through the real `emo-calibrate train` command: a checkpoint, the exact resume command, exit code
128 + signal and no traceback; with two processes, a signal to one of them stops both at the same step."""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny_models import lora, make_args
from transformers import TrainerCallback

from emo_calibrate import EMOTrainer
from emo_calibrate.cli import train as cli_train
from emo_calibrate.training.callbacks import TrainingInterrupted
from emo_calibrate.training.checkpointing import STATUS_FILE


ROOT = Path(__file__).parents[2]


def cli_argv(model_dir, dataset, out, max_steps=100000, batch=2):
    return [
        "--model_name_or_path", str(model_dir), "--dataset_name", str(dataset), "--output_dir", str(out),
        "--max_steps", str(max_steps), "--per_device_train_batch_size", str(batch), "--learning_rate", "5e-2",
        "--max_length", "32", "--packing", "false", "--logging_steps", "1", "--lora_r", "4", "--lora_alpha", "8",
        "--lora_dropout", "0", "--save_strategy", "no", "--disable_tqdm", "true", "--use_cpu", "true",
        "--bf16", "false", "--seed", "0", "--data_seed", "0",
    ]  # fmt: skip


@pytest.fixture
def jsonl(tmp_path, tiny_dataset):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in tiny_dataset["text"]))
    return path


def start(command, tmp_path):
    """Start `command` with stdout piped line by line and stderr in a file (no pipe to fill up)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    stderr = open(tmp_path / "stderr.txt", "w")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env, cwd=tmp_path)
    stderr.close()
    return process


def wait_for_training(process, tmp_path):
    """Read stdout until the first logged step (the Trainer prints {'loss': ...} with tqdm disabled)."""
    lines = []
    for line in process.stdout:
        lines.append(line)
        if "'loss'" in line:
            return lines
    raise AssertionError("training never logged a step:\n" + "".join(lines) + (tmp_path / "stderr.txt").read_text())


def finish(process, tmp_path, timeout=240):
    try:
        stdout, _ = process.communicate(timeout=timeout)
    finally:
        process.kill()
    return stdout, (tmp_path / "stderr.txt").read_text()


def printed_resume_command(stderr: str) -> list[str]:
    commands = [line.strip() for line in stderr.splitlines() if line.strip().startswith("emo-calibrate train ")]
    assert len(commands) == 1, stderr[-3000:]  # printed once (by the main process)
    return shlex.split(commands[0])


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_the_cli_saves_prints_the_resume_command_and_exits_without_a_traceback(
    signum, tmp_path, tiny_llama_dir, jsonl
):
    out = tmp_path / "run"
    argv = cli_argv(tiny_llama_dir, jsonl, out)
    process = start([sys.executable, "-m", "emo_calibrate.cli.main", "train", *argv], tmp_path)
    wait_for_training(process, tmp_path)
    process.send_signal(signum)
    stdout, stderr = finish(process, tmp_path)

    assert process.returncode == 128 + signum, stderr[-3000:]
    assert "Traceback" not in stderr + stdout, stderr[-3000:]
    checkpoints = sorted(p.name for p in out.glob("checkpoint-*"))
    assert len(checkpoints) == 1, checkpoints
    checkpoint = out / checkpoints[0]
    assert json.loads((checkpoint / STATUS_FILE).read_text())["complete"]
    assert f"interrupted by {signal.Signals(signum).name}. Stopped at step {checkpoints[0].split('-')[1]}" in stderr

    # The printed command is this run's, with the checkpoint: paste it (here with 2 more steps) and it resumes.
    command = printed_resume_command(stderr)
    assert command[:2] == ["emo-calibrate", "train"]
    assert command[2:] == [*argv, "--resume_from_checkpoint", str(checkpoint)]
    stopped_at = int(checkpoints[0].split("-")[1])
    resumed = command[2:]
    resumed[resumed.index("--max_steps") + 1] = str(stopped_at + 2)
    assert cli_train.run(resumed) == 0
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == stopped_at + 2
    assert [h["step"] for h in state["log_history"] if "loss" in h] == list(range(1, stopped_at + 3))


def test_a_signal_before_training_exits_cleanly_with_no_checkpoint(tmp_path, tiny_llama_dir, jsonl):
    """Outside the training loop (here: while the model loads) there is nothing to save: same exit, no traceback."""
    code = (
        "import sys, os, signal, transformers.trainer as t\n"
        "load = t.Trainer.__init__\n"
        "def slow(self, *a, **k):\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    return load(self, *a, **k)\n"
        "t.Trainer.__init__ = slow\n"
        "from emo_calibrate.cli.main import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    process = start(
        [sys.executable, "-c", code, "train", *cli_argv(tiny_llama_dir, jsonl, tmp_path / "run")], tmp_path
    )
    stdout, stderr = finish(process, tmp_path)
    assert process.returncode == 143, stderr[-3000:]
    assert "Traceback" not in stderr and "interrupted by SIGTERM; no new checkpoint was written" in stderr
    assert "There is no checkpoint to resume from" in stderr


class SignalTwice(TrainerCallback):
    """Two SIGINTs in a row at the end of step 2, as Ctrl-C under torchrun delivers them (terminal + launcher)."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 2:
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)


def test_a_signal_delivered_twice_at_once_is_one_request(tmp_path, tiny_llama_dir, tiny_dataset):
    args = make_args(tmp_path, output_dir=str(tmp_path / "run"), max_steps=6)
    trainer = EMOTrainer(tiny_llama_dir, args=args, train_dataset=tiny_dataset, peft_config=lora(),
                         callbacks=[SignalTwice()])  # fmt: skip
    with pytest.raises(TrainingInterrupted) as stopped:
        trainer.train()
    assert stopped.value.checkpoint == str(tmp_path / "run" / "checkpoint-2")
    assert stopped.value.exit_code == 130


# ---- two processes -----------------------------------------------------------------------------------------------


def children_of(pid: int) -> dict[int, int]:
    """{RANK: pid} of the worker processes torchrun started (read from /proc)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            environ = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) != pid:
            continue
        for item in environ:
            if item.startswith(b"RANK="):
                found[int(item[5:])] = int(entry)
    return found


def test_a_signal_to_one_of_two_processes_stops_both_at_the_same_step_with_one_checkpoint(
    tmp_path, tiny_llama_dir, jsonl
):
    out = tmp_path / "run"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1", "--rdzv_backend",
        "c10d", "--rdzv_endpoint", "localhost:0", "-m", "emo_calibrate.cli.main", "train",
        *cli_argv(tiny_llama_dir, jsonl, out),
    ]  # fmt: skip
    process = start(command, tmp_path)
    wait_for_training(process, tmp_path)
    deadline = time.monotonic() + 30
    while len(workers := children_of(process.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    os.kill(workers[1], signal.SIGTERM)  # rank 1 only: rank 0 learns it at the next step boundary
    stdout, stderr = finish(process, tmp_path)

    checkpoints = sorted(p.name for p in out.glob("checkpoint-*"))
    assert len(checkpoints) == 1, (checkpoints, stderr[-3000:])
    step = int(checkpoints[0].split("-")[1])
    assert json.loads((out / checkpoints[0] / STATUS_FILE).read_text())["complete"]
    assert (out / checkpoints[0] / "rng_state_0.pth").is_file() and (
        out / checkpoints[0] / "rng_state_1.pth"
    ).is_file()
    # Each rank reports where it stopped: the signalled one and the other one, at the same step.
    stops = re.findall(r"(Training was interrupted by SIGTERM|Another process of this run received SIGTERM)\. "
                       r"Stopped at step (\d+)/", stderr)  # fmt: skip
    assert sorted(kind for kind, _ in stops) == ["Another process of this run received SIGTERM",
                                                 "Training was interrupted by SIGTERM"], stderr[-3000:]  # fmt: skip
    assert {int(s) for _, s in stops} == {step}
    assert printed_resume_command(stderr)[-2:] == ["--resume_from_checkpoint", str(out / checkpoints[0])]
    assert "emo-calibrate train: done" not in stdout
    assert re.search(r"exitcode\s*:\s*143", stderr), stderr[-3000:]  # torchrun's summary: the worker exited 143
    assert not re.search(r'File "[^"]*emo_calibrate', stderr), stderr[-5000:]  # no traceback from our code
