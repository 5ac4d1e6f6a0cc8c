"""Run `emo-calibrate train` in one process of a distributed launch and record what this rank saw.

Used by tests/training/test_distributed.py through `accelerate launch --cpu --num_processes 2`. Usage:
`distributed_worker.py RECORD_DIR -- TRAIN_ARGS...`; writes RECORD_DIR/rank{RANK}.json with the logged losses, the
world size and a checksum of this rank's LoRA weights.
"""

import json
import os
import sys

import torch


def main():
    torch.set_num_threads(1)
    record_dir, train_argv = sys.argv[1], sys.argv[sys.argv.index("--") + 1 :]
    from emo_calibrate.cli.train import main as train_main
    from emo_calibrate.cli.train import parse

    summary = train_main(*parse(train_argv))
    trainer = summary["trainer"]
    lora = {n: p.detach().double() for n, p in trainer.model.named_parameters() if "lora_" in n}
    record = {
        "rank": int(os.environ["RANK"]),
        "world_size": trainer.args.world_size,
        "logs": [h for h in trainer.state.log_history if "mle" in h],
        "lora_checksum": sum(float(p.sum()) + float(p.abs().sum()) for p in lora.values()),
        "num_lora_tensors": len(lora),
    }
    with open(os.path.join(record_dir, f"rank{record['rank']}.json"), "w") as f:
        json.dump(record, f)


if __name__ == "__main__":
    main()
