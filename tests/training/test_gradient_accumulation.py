"""Gradient accumulation is exact for every model: batch 4 x accumulation 1 and batch 2 x accumulation 2 log the same
loss, gradient norm and token metrics, with `accepts_loss_kwargs` True and False (the Trainer then counts no tokens by
itself), with micro-batches of unequal lengths, and in a 2-process run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from training_runs import LOGGED, as_table, train_logs


HERE = Path(__file__).parents[1]  # tests/, where the worker scripts live


@pytest.mark.parametrize("accepts_loss_kwargs", [True, False])
def test_accumulation_matches_one_big_batch(tiny_llama_dir, tmp_path, accepts_loss_kwargs):
    big = train_logs(tiny_llama_dir, tmp_path / "4x1", 4, 1, accepts_loss_kwargs)
    small = train_logs(tiny_llama_dir, tmp_path / "2x2", 2, 2, accepts_loss_kwargs)
    print(f"\naccepts_loss_kwargs={accepts_loss_kwargs}", *(f"{k}: {v}" for k, v in zip(LOGGED, as_table(big["logs"]).T.tolist())),
          *(f"{k} 2x2: {v}" for k, v in zip(LOGGED, as_table(small["logs"]).T.tolist())), sep="\n  ")  # fmt: skip
    # unequal micro-batches: the two halves of a window have different numbers of target tokens
    assert any(a != b for a, b in zip(small["tokens"][::2], small["tokens"][1::2]))
    assert [a + b for a, b in zip(small["tokens"][::2], small["tokens"][1::2])] == big["tokens"]
    torch.testing.assert_close(as_table(small["logs"]), as_table(big["logs"]), rtol=1e-5, atol=1e-6)
    assert small["lora"] == pytest.approx(big["lora"], rel=1e-5)


def test_two_processes_accumulate_like_one(tiny_llama_dir, tmp_path):
    """2 processes x (batch 1 x accumulation 2) and 2 x (2 x 1) equal one process with batch 4, for both model
    kinds (torchrun on CPU, gloo)."""
    records = tmp_path / "records"
    records.mkdir()
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
        "--rdzv_backend", "c10d", "--rdzv_endpoint", "localhost:0", str(HERE / "ga_worker.py"), str(records),
        str(tiny_llama_dir),
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(HERE.parent), str(HERE)]))
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    runs = json.loads((records / "runs.json").read_text())
    assert {run["world_size"] for run in runs.values()} == {2}
    for accepts in (True, False):
        single = as_table(train_logs(tiny_llama_dir, tmp_path / f"one-{accepts}", 4, 1, accepts)["logs"])
        for layout in ("1x2", "2x1"):
            print(f"\n2 processes x {layout}, accepts_loss_kwargs={accepts}:", as_table(runs[f"{accepts}-{layout}"]["logs"]).tolist(),
                  "one process x 4x1:", single.tolist())  # fmt: skip
            torch.testing.assert_close(as_table(runs[f"{accepts}-{layout}"]["logs"]), single, rtol=1e-4, atol=1e-5)
