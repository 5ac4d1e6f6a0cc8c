"""A tiny-model run that blocks in the middle of writing checkpoint-4, for test_checkpoint_integrity.py to SIGKILL.

Usage: python kill_during_checkpoint.py MODEL_DIR OUTPUT_DIR {optimizer,emo_state}. Saves every 2 steps keeping one
checkpoint (save_total_limit=1). While writing checkpoint-4 it stops, deterministically, at the chosen point:
`optimizer` = after the adapter, before the optimizer and trainer_state.json; `emo_state` = after every Trainer file,
before EMOTrainer's own. It then creates OUTPUT_DIR/paused and waits forever for the parent's SIGKILL.
"""

import os
import sys
import threading


for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
    os.environ.setdefault(name, "1")

import torch  # noqa: E402
from tiny_models import lora, make_args, tiny_text_dataset  # noqa: E402

import emo_calibrate.training.trainer as trainer_module  # noqa: E402
from emo_calibrate import EMOTrainer  # noqa: E402


PAUSE_AT_STEP = 4


def pausing(function, trainer, output_dir):
    def wrapper(*args, **kwargs):
        if trainer.state.global_step == PAUSE_AT_STEP:
            open(os.path.join(output_dir, "paused"), "w").close()
            threading.Event().wait()  # until SIGKILL
        return function(*args, **kwargs)

    return wrapper


def main(model_dir: str, output_dir: str, where: str) -> None:
    torch.set_num_threads(1)
    from pathlib import Path

    args = make_args(Path(output_dir).parent, output_dir=output_dir, max_steps=100, save_strategy="steps",
                     save_steps=2, save_total_limit=1)  # fmt: skip
    trainer = EMOTrainer(model_dir, args=args, train_dataset=tiny_text_dataset(), peft_config=lora())
    if where == "optimizer":
        trainer._save_optimizer_and_scheduler = pausing(trainer._save_optimizer_and_scheduler, trainer, output_dir)
    else:
        trainer_module.save_emo_state = pausing(trainer_module.save_emo_state, trainer, output_dir)
    trainer.train()


if __name__ == "__main__":
    main(*sys.argv[1:4])
