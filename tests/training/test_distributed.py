"""Multi-process training: a real 2-process CPU launch (gloo). DeepSpeed ZeRO-3 (a stand-in): test_zero3.py."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from emo_calibrate.cli import train as cli_train


HERE = Path(__file__).parents[1]  # tests/, where the shared worker scripts live


def train_argv(model_dir, dataset, output_dir, batch):
    return [
        "--model_name_or_path", str(model_dir), "--dataset_name", str(dataset), "--output_dir", str(output_dir),
        "--max_steps", "3", "--per_device_train_batch_size", str(batch), "--learning_rate", "5e-2",
        "--max_length", "32", "--packing", "false", "--logging_steps", "1", "--lora_r", "4", "--lora_alpha", "8",
        "--lora_dropout", "0", "--seed", "0", "--data_seed", "0", "--use_cpu", "true", "--bf16", "false",
        "--emo_guard_max_ppl_ratio", "null",  # every row trained on: 32 rows split evenly over 2 processes
    ]  # fmt: skip


def test_two_cpu_processes_agree_with_each_other_and_with_one_process(tmp_path, tiny_llama_dir, tiny_dataset):
    """`torchrun --nproc_per_node 2` on CPU (gloo), 3 steps: both ranks log the same losses and end with the same
    adapter, the adapter is written once, and the run matches one process with the same global batch."""
    dataset = tmp_path / "train.jsonl"
    dataset.write_text("".join(json.dumps({"text": t}) + "\n" for t in tiny_dataset["text"]))
    records, out = tmp_path / "records", tmp_path / "ddp"
    records.mkdir()
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
        "--rdzv_backend", "c10d", "--rdzv_endpoint", "localhost:0", str(HERE / "distributed_worker.py"), str(records), "--", *train_argv(tiny_llama_dir, dataset, out, batch=2),
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(HERE.parent), str(HERE)]))
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]

    ranks = [json.loads((records / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert len(ranks[0]["logs"]) == 3
    for key in ("loss", "mle", "emo"):
        assert [h[key] for h in ranks[0]["logs"]] == [h[key] for h in ranks[1]["logs"]], key
    assert ranks[0]["num_lora_tensors"] == ranks[1]["num_lora_tensors"] > 0
    assert ranks[0]["lora_checksum"] == pytest.approx(ranks[1]["lora_checksum"], rel=1e-6)  # gradients were averaged

    # written once: one adapter, no staging folder left, one summary printed
    assert sorted(p.name for p in out.glob("adapter_model*")) == ["adapter_model.safetensors"]
    assert not (out / cli_train._SAVING).exists()
    assert result.stdout.count("emo-calibrate train: done") == 1

    # one process with the same global batch (2 ranks x 2 = 4) sees the same samples and logs the same losses
    single = cli_train.main(*cli_train.parse(train_argv(tiny_llama_dir, dataset, tmp_path / "one", batch=4)))
    single_logs = [h for h in single["trainer"].state.log_history if "mle" in h]
    for key in ("loss", "mle", "emo"):
        torch.testing.assert_close(
            torch.tensor([h[key] for h in ranks[0]["logs"]]), torch.tensor([h[key] for h in single_logs]),
            rtol=1e-4, atol=1e-5, msg=key,
        )  # fmt: skip
