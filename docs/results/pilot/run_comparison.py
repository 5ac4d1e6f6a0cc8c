"""Train one LoRA adapter of the base / MLE-LoRA / EMO-LoRA comparison in docs/results/pilot/README.md.

`emo-calibrate train` was not on main when this comparison was run, so this script calls `EMOTrainer` directly with
the settings of the embedded demo recipe (and of emo-method.md §0b): SmolLM2-135M-Instruct, LoRA r=16 / alpha=32 on
all linear layers, fp32 on CPU, batches of 4 x 256 tokens (wrapped packing), linear schedule, no warmup, seed 0.
Only `--weighting` and `--learning_rate` differ between the runs; data, steps and seed are the same.

    python docs/results/pilot/run_comparison.py --data /tmp/results_scratch/calib --weighting mle \
        --output_dir /tmp/results_scratch/mle --max_steps 60
    python docs/results/pilot/run_comparison.py --data /tmp/results_scratch/calib --weighting emo_anchored \
        --output_dir /tmp/results_scratch/emo --max_steps 60

Writes the adapter, the tokenizer and `trainer_state.json` (the log history that `emo-calibrate eval` plots as
training curves) to `--output_dir`, and `run_info.json` with the settings and wall time.
"""

import argparse
import json
import os
import time


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="A saved calibration set (emo-calibrate data); its train split.")
    parser.add_argument("--output_dir", required=True, help="Folder for the adapter and trainer_state.json (new).")
    parser.add_argument("--weighting", required=True, choices=["mle", "emo_anchored", "mle_anchored"])
    parser.add_argument("--learning_rate", type=float, default=2e-5, help="The paper's 2e-5 by default.")
    parser.add_argument("--max_steps", type=int, default=60)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--max_length", type=int, default=256)
    parser.add_argument("--logging_steps", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared machine).")
    parser.add_argument(
        "--model", default=None, help="Model folder; default: emo_calibrate.demo.assets.smollm2_path()."
    )
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if os.path.exists(args.output_dir):
        raise SystemExit(f"{args.output_dir} exists: choose a new --output_dir (nothing is overwritten).")

    import torch
    from datasets import load_from_disk
    from peft import LoraConfig

    from emo_calibrate import EMOConfig, EMOTrainer
    from emo_calibrate.demo.assets import smollm2_path

    torch.set_num_threads(args.threads)
    model = args.model or str(smollm2_path())
    train = load_from_disk(args.data)["train"]
    config = EMOConfig(
        output_dir=args.output_dir,
        emo_weighting=args.weighting,
        emo_subtract_target_mass=True,
        emo_cost_embedding="frozen",
        learning_rate=args.learning_rate,
        lr_scheduler_type="linear",
        warmup_steps=0,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        max_length=args.max_length,
        packing=True,
        packing_strategy="wrapped",  # plain 256-token blocks of the concatenated text, like the paper's group_texts
        gradient_checkpointing=False,
        bf16=False,
        logging_steps=args.logging_steps,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        seed=args.seed,
        data_seed=args.seed,
        model_init_kwargs={"dtype": torch.float32},
    )
    lora = LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", bias="none", task_type="CAUSAL_LM"
    )
    trainer = EMOTrainer(model, args=config, train_dataset=train, peft_config=lora)
    start = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - start
    trainer.save_model(args.output_dir)
    trainer.save_state()  # trainer_state.json: the log history (loss, mle, emo per logging step)
    info = {
        "model": model,
        "data": os.path.abspath(args.data),
        "weighting": args.weighting,
        "learning_rate": args.learning_rate,
        "max_steps": args.max_steps,
        "batch": f"{args.batch_size} x {args.max_length} tokens (wrapped packing)",
        "lora": "r=16, alpha=32, dropout 0, all-linear",
        "seed": args.seed,
        "threads": args.threads,
        "train_seconds": round(seconds, 1),
        "seconds_per_step": round(seconds / max(1, result.global_step), 2),
        "train_metrics": result.metrics,
    }
    with open(os.path.join(args.output_dir, "run_info.json"), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2)
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
