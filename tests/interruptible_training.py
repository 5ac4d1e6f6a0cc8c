"""A long tiny-model training run for tests/training/test_resume.py to interrupt with a real SIGTERM.

Usage: python interruptible_training.py MODEL_DIR OUTPUT_DIR. Prints "step N" after every optimizer step; on
interruption prints the error message to stderr and exits with its exit code (128 + signal number).
"""

import os
import sys
import time


for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
    os.environ.setdefault(name, "1")

import torch  # noqa: E402
from tiny_models import (  # noqa: E402
    lora,
    make_args,
    tiny_text_dataset,  # noqa: E402
)
from transformers import TrainerCallback  # noqa: E402

from emo_calibrate import EMOTrainer  # noqa: E402
from emo_calibrate.training.callbacks import TrainingStopped  # noqa: E402


class Announce(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        print(f"step {state.global_step}", flush=True)
        time.sleep(0.2)  # leave the parent time to send its signal while training is still running


def main(model_dir: str, output_dir: str) -> int:
    torch.set_num_threads(1)
    from pathlib import Path

    args = make_args(Path(output_dir).parent, output_dir=output_dir, max_steps=500, learning_rate=2e-2)
    trainer = EMOTrainer(
        model_dir, args=args, train_dataset=tiny_text_dataset(), peft_config=lora(), callbacks=[Announce()]
    )
    try:
        trainer.train()
    except TrainingStopped as stopped:
        print(stopped, file=sys.stderr, flush=True)
        return stopped.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
