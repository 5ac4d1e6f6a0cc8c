"""One process of a 2-process FSDP2 run on the CPU, launched by test_fsdp.py with
`accelerate launch --config_file recipes/accelerate/fsdp.yaml --mixed_precision no ...`.

Usage: fsdp_worker.py MODEL_DIR DATA_JSONL OUTPUT_DIR RECORD_DIR. Trains 4 steps with a checkpoint every 2 (run A),
then resumes a fresh trainer from checkpoint-2 to step 4 (run B), saves the adapter, and writes
RECORD_DIR/rank{RANK}.json with both runs' logs and LoRA weights.

accelerate enables FSDP only for GPU-class devices: on the CPU (distributed type MULTI_CPU) it drops the plugin and
trains with DDP (accelerate/state.py:986-1013; EMOTrainer refuses that case). This worker lifts that one gate, and
only it: it sets up the process group itself (gloo) and reports the distributed type as MULTI_GPU, so that accelerate
takes its real FSDP2 path (fully_shard with the config's wrap policy, cpu_ram_efficient_loading, FULL_STATE_DICT
checkpoints) on CPU tensors. Everything else is the launcher's environment and the Trainer's own code.
"""

import json
import os
import sys
from pathlib import Path


for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
    os.environ.setdefault(name, "1")

import torch  # noqa: E402
from accelerate import PartialState  # noqa: E402
from accelerate.utils import DistributedType  # noqa: E402


def lora_weights(model) -> dict[str, list]:
    """Full LoRA tensors (FSDP2 shards them: full_tensor() is a collective every rank joins, in the same order)."""
    out = {}
    for name, param in model.named_parameters():
        if "lora_" in name:
            value = param.detach()
            value = value.full_tensor() if hasattr(value, "full_tensor") else value
            out[name] = value.double().flatten().tolist()
    return out


def main(model_dir, data, output_dir, record_dir):
    torch.set_num_threads(1)
    state = PartialState(cpu=True)  # gloo, from the launcher's RANK / WORLD_SIZE / MASTER_ADDR
    state.distributed_type = DistributedType.MULTI_GPU  # the device gate, see the module docstring

    from datasets import load_dataset
    from tiny_models import lora, make_args

    from emo_calibrate import EMOTrainer

    dataset = load_dataset("json", data_files=data, split="train")

    def trainer():
        args = make_args(
            Path(output_dir), output_dir=output_dir, max_steps=4, per_device_train_batch_size=2, save_strategy="steps",
            save_steps=2, use_cpu=True, bf16=False, accelerator_config={"use_configured_state": True},
        )  # fmt: skip
        return EMOTrainer(model_dir, args=args, train_dataset=dataset, peft_config=lora())

    first = trainer()
    assert first.is_fsdp_enabled and first.accelerator.is_fsdp2, "accelerate did not take its FSDP2 path"
    first.train()
    head = first.model.get_output_embeddings().weight
    record = {"rank": state.process_index, "head_is_dtensor": hasattr(head, "full_tensor")}
    # With cpu_ram_efficient_loading only rank 0 reads the weights (the others start on the meta device)
    record["cost_identity_here"] = first._cost_identity is not None
    record["a_logs"] = [h for h in first.state.log_history if "mle" in h]
    record["a_lora"] = lora_weights(first.model)

    resumed = trainer()
    resumed.train(resume_from_checkpoint=os.path.join(output_dir, "checkpoint-2"))
    record["b_logs"] = [h for h in resumed.state.log_history if "mle" in h]
    record["b_lora"] = lora_weights(resumed.model)
    resumed.save_model(os.path.join(output_dir, "final"))  # every rank joins the gather of the full state dict
    record["budget"] = budget_run(model_dir, dataset, output_dir, make_args, lora, EMOTrainer)
    with open(os.path.join(record_dir, f"rank{state.process_index}.json"), "w") as handle:
        json.dump(record, handle)


def budget_run(model_dir, dataset, output_dir, make_args, lora, EMOTrainer) -> dict:
    """Run C: the perplexity budget, driven past it. Each rank copies and puts back its own shards; the full LoRA
    tensors after training must be those of the kept evaluation."""
    import random

    from datasets import Dataset
    from tiny_models import WORDS
    from transformers import TrainerCallback

    at_evaluation = {}

    class FullLoraAtEvaluation(TrainerCallback):
        def on_evaluate(self, args, state, control, model=None, **kwargs):
            at_evaluation[state.global_step] = lora_weights(model)  # a collective: every rank evaluates

    args = make_args(
        Path(output_dir) / "budget", max_steps=8, per_device_train_batch_size=2, learning_rate=0.06, use_cpu=True,
        bf16=False, accelerator_config={"use_configured_state": True}, emo_guard_max_ppl_ratio=1.05,
        emo_guard_eval_steps=2,
    )  # fmt: skip
    rng = random.Random(0)  # word salad: training on the tiny sentences drives its perplexity up
    salad = Dataset.from_dict({"text": [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(8)]})
    trainer = EMOTrainer(
        model_dir, args=args, train_dataset=dataset, eval_dataset=salad, peft_config=lora(),
        callbacks=[FullLoraAtEvaluation()],
    )  # fmt: skip
    trainer.train()
    budget = trainer.perplexity_budget
    final = lora_weights(trainer.model)
    return {
        "summary": budget.describe(),
        "tripped": budget.tripped.step if budget.tripped else None,
        "kept": budget.kept.step if budget.kept else None,
        "kept_how": budget.kept_how,
        "final_is_kept": budget.kept is not None and final == at_evaluation[budget.kept.step],
        "final_is_last": final == at_evaluation[trainer.state.global_step],
    }


if __name__ == "__main__":
    main(*sys.argv[1:5])
