"""Train the tiny model with several batch x accumulation layouts in one process of a 2-process launch.

Used by tests/training/test_gradient_accumulation.py through `torch.distributed.run --nproc_per_node 2`. Usage:
`ga_worker.py RECORD_DIR MODEL_DIR`; rank 0 writes RECORD_DIR/runs.json: for each model kind (`accepts_loss_kwargs`
True / False) and per-process layout (batch, accumulation), the logged values of 3 steps.
"""

import json
import os
import sys

import torch


def main():
    torch.set_num_threads(1)
    record_dir, model_dir = sys.argv[1], sys.argv[2]
    from training_runs import train_logs

    runs = {}
    for accepts in (True, False):
        for batch, accumulation in ((1, 2), (2, 1)):
            output = os.path.join(record_dir, f"{accepts}-{batch}x{accumulation}")
            runs[f"{accepts}-{batch}x{accumulation}"] = train_logs(model_dir, output, batch, accumulation, accepts)
    if int(os.environ["RANK"]) == 0:
        with open(os.path.join(record_dir, "runs.json"), "w") as f:
            json.dump(runs, f)


if __name__ == "__main__":
    main()
