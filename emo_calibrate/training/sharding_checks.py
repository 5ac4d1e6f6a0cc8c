"""Set-ups the EMO loss path cannot serve, refused before the model loads: FSDP1, FSDP where accelerate would silently
fall back to DDP, and prompt-learning PEFT methods. Called by `validation.validate_trainer_inputs`.

- **FSDP1** keeps each wrapped module's parameters in one flat, sharded buffer: outside the module's own forward the
  head's weight is not the (V, d) matrix that the fused EMO head and the cost embedding read. FSDP2 (`fully_shard`)
  shards it as a DTensor that is gathered on purpose. transformers 5.24 also deprecates FSDP1.
- **FSDP without a GPU-class device**: accelerate 1.15 enables FSDP only for multi-process GPU (or other
  accelerator) runs (`accelerate/state.py`, `AcceleratorState.__init__`: the `DistributedType.FSDP` switch sits under
  `distributed_type in [MULTI_GPU, MULTI_NPU, ...]`, lines 986-1013). On the CPU (`MULTI_CPU`, gloo) or in a single
  process (`NO`) the FSDP plugin is dropped without a word and every process trains a full DDP copy; `accelerate
  launch --cpu` even starts a single process (`accelerate/commands/launch.py:1399`).
- **Prompt learning** (prompt tuning, prefix tuning, p-tuning) adds virtual tokens or key/value prefixes inside
  `PeftModel.forward`: the model's output positions no longer match the labels EMOTrainer aligns them with, and a loss
  that runs the decoder backbone itself (as TRL's fused head and DistillationTrainer do) bypasses them altogether.
  TRL's DistillationTrainer refuses them for the same reason.
"""

import os


__all__ = ["check_peft_method", "check_sharding", "requested_fsdp_version"]

# Distributed types for which accelerate ignores the FSDP plugin (see the module docstring).
_FSDP_DROPPED = ("NO", "MULTI_CPU")


def requested_fsdp_version(args) -> int | None:
    """The FSDP version asked for by the training arguments or by `accelerate launch` (its environment), else None."""
    if args.fsdp:  # any `fsdp` value; TrainingArguments defaults fsdp_config["version"] to 2
        return int((args.fsdp_config or {}).get("version", 2))
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return int(os.environ.get("FSDP_VERSION", "1"))  # accelerate's plugin default
    return None


def check_sharding(args) -> None:
    """Refuse FSDP1, and FSDP where accelerate would silently train with DDP instead."""
    version = requested_fsdp_version(args)
    if version is None:
        return
    if version != 2:
        raise ValueError(
            f"FSDP version {version} was requested, but EMOTrainer supports FSDP2 only: FSDP1 keeps the head's weight "
            "in a flat sharded buffer that the EMO head cannot read outside the forward (and transformers deprecates "
            "it). Set `fsdp_version: 2` in the accelerate config (as recipes/accelerate/fsdp.yaml does) or "
            "fsdp_config={'version': 2}."
        )
    state = getattr(args, "distributed_state", None)
    kind = getattr(getattr(state, "distributed_type", None), "value", None)
    if kind in _FSDP_DROPPED:
        raise ValueError(
            f"FSDP was requested, but accelerate only runs FSDP with several GPU-class processes: here (device "
            f"{args.device.type}, distributed type {kind}) it would silently drop FSDP and train a full copy per "
            "process (DDP). On GPUs, launch with `accelerate launch --config_file recipes/accelerate/fsdp.yaml ...`; "
            "on the CPU or a single GPU, drop FSDP (recipes/accelerate/ddp.yaml for several CPU processes)."
        )


def check_peft_method(model, peft_config) -> None:
    """Refuse prompt tuning, prefix tuning and p-tuning (given as `peft_config` or as an already wrapped model)."""
    config = peft_config
    if config is None and hasattr(model, "active_peft_config"):
        config = model.active_peft_config
    if getattr(config, "is_prompt_learning", False):
        raise ValueError(
            f"{type(config).__name__} is a prompt-learning PEFT method (virtual tokens or key/value prefixes added "
            "inside PeftModel.forward), which EMOTrainer does not support: the model's output positions would no "
            "longer match the labels of the EMO loss. Use an adapter that changes the weights in place, e.g. LoRA "
            "(LoraConfig(target_modules='all-linear'), or --use_peft --lora_target_modules all-linear)."
        )
