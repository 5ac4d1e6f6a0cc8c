"""FSDP2 that checkpoints: 2 CPU processes (gloo) through `accelerate launch --config_file recipes/accelerate/fsdp.yaml`
train with a checkpoint mid-run, resume from it, and match one process with the same global batch.

accelerate runs FSDP only on GPU-class devices (on the CPU it silently trains with DDP, accelerate/state.py:986-1013,
which EMOTrainer refuses): tests/training/fsdp_worker.py lifts that device gate and nothing else, so the sharding,
the DTensor head, cpu_ram_efficient_loading and the FULL_STATE_DICT checkpoints are accelerate's and PyTorch's own.
The config's bf16 mixed precision is replaced by fp32 (`--mixed_precision no`) so that the comparison with one
process can be tight.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from datasets import load_dataset
from tiny_models import lora, make_args

from emo_calibrate import EMOTrainer
from emo_calibrate.training.checkpointing import IDENTITY_FILE, STATUS_FILE


HERE = Path(__file__).parent
ROOT = HERE.parents[1]
# Sharding reorders the sums of the gradient reductions: fp32 results agree to rounding, not bitwise.
RTOL, ATOL = 1e-4, 1e-6


def test_fsdp2_trains_checkpoints_resumes_and_matches_one_process(tmp_path, tiny_llama_dir, tiny_dataset):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in tiny_dataset["text"]))
    out, records = tmp_path / "fsdp", tmp_path / "records"
    records.mkdir()
    launcher = Path(sys.executable).with_name("accelerate")
    command = [
        str(launcher), "launch", "--config_file", str(ROOT / "recipes" / "accelerate" / "fsdp.yaml"),
        "--mixed_precision", "no", "--num_processes", "2", "--main_process_port", "0",
        str(HERE / "fsdp_worker.py"), tiny_llama_dir, str(data), str(out), str(records),
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), str(HERE.parent)]))
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-6000:]  # both ranks finished

    ranks = [json.loads((records / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["head_is_dtensor"] for r in ranks)  # really sharded by FSDP2
    assert [r["cost_identity_here"] for r in ranks] == [True, False]  # rank 1 loaded on the meta device
    checkpoint = out / "checkpoint-2"
    assert json.loads((checkpoint / STATUS_FILE).read_text())["complete"]
    assert (checkpoint / IDENTITY_FILE).is_file() and (out / "final" / "adapter_model.safetensors").is_file()

    # Resumed from checkpoint-2 == uninterrupted, on both ranks.
    for rank in ranks:
        assert [h["step"] for h in rank["b_logs"]] == [1, 2, 3, 4]
        for want, got in zip(rank["a_logs"], rank["b_logs"]):
            for key in ("loss", "mle", "emo", "grad_norm"):
                assert got[key] == want[key], (rank["rank"], got["step"], key)
        for name, value in rank["a_lora"].items():
            assert rank["b_lora"][name] == value, name
    assert ranks[0]["a_lora"] == ranks[1]["a_lora"]

    # The perplexity budget under FSDP2: stopped, and each rank put back its shards of the kept evaluation's weights.
    budget = ranks[0]["budget"]
    assert budget == ranks[1]["budget"], (budget, ranks[1]["budget"])
    assert budget["kept_how"] == "restored", budget
    assert budget["kept"] < budget["tripped"] and budget["final_is_kept"] and not budget["final_is_last"], budget

    # One process, the same global batch (2 ranks x 2 = 4), no FSDP.
    args = make_args(tmp_path, output_dir=str(tmp_path / "one"), max_steps=4, per_device_train_batch_size=4)
    dataset = load_dataset("json", data_files=str(data), split="train")
    single = EMOTrainer(tiny_llama_dir, args=args, train_dataset=dataset, peft_config=lora())
    single.train()
    single_logs = [h for h in single.state.log_history if "mle" in h]
    for key in ("loss", "mle", "emo", "grad_norm"):
        torch.testing.assert_close(torch.tensor([h[key] for h in ranks[0]["a_logs"]]),
                                   torch.tensor([h[key] for h in single_logs]), rtol=RTOL, atol=ATOL, msg=key)  # fmt: skip
    single_lora = {n: p.detach().double().flatten() for n, p in single.model.named_parameters() if "lora_" in n}
    assert single_lora.keys() == ranks[0]["a_lora"].keys()
    for name, value in single_lora.items():
        torch.testing.assert_close(torch.tensor(ranks[0]["a_lora"][name], dtype=torch.float64), value,
                                   rtol=RTOL, atol=ATOL, msg=name)  # fmt: skip
