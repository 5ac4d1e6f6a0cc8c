"""Trainer options that would change the loss behind EMO's back: refused with one clear error, before the model loads.

`SFTConfig` and `Trainer` take options that only mean something for their own cross-entropy. `EMOTrainer` computes
its own loss, so each of these either works with EMO or stops here, naming the option and what to use instead:
`check_config_loss_options` runs in `EMOConfig.__post_init__`, `check_trainer_loss_options` in
`validate_trainer_inputs` (before `SFTTrainer.__init__` loads the model). Listed in docs/troubleshooting.md.
"""

import os


__all__ = ["SHIFT_LABELS_ERROR", "check_config_loss_options", "check_trainer_loss_options"]

SHIFT_LABELS_ERROR = (
    "Context / sequence parallelism splits every sequence across processes (the batches carry `shift_labels`), and "
    "EMOTrainer's loss does not support it: it would be computed on the wrong positions. Turn it off "
    "(parallelism_config cp_size=1 and sp_size=1) and use data parallelism (DDP, FSDP or DeepSpeed ZeRO) instead; for "
    "long sequences, gradient checkpointing or a smaller max_length keep the memory down."
)


def check_config_loss_options(config) -> None:
    """`loss_type` and `label_smoothing_factor`, checked when the `EMOConfig` is built."""
    if config.loss_type not in (None, "nll"):
        raise ValueError(
            f"loss_type={config.loss_type!r} selects one of SFTTrainer's own losses, which EMOTrainer does not compute: "
            "its loss is EMO, chosen with emo_weighting. Leave loss_type at 'nll' (plain cross-entropy inside EMO: "
            f"emo_weighting='mle'), or train with TRL's SFTTrainer for loss_type={config.loss_type!r}."
        )
    if config.label_smoothing_factor:
        raise ValueError(
            f"label_smoothing_factor={config.label_smoothing_factor} would be ignored: EMOTrainer computes the EMO loss "
            "itself, whose cross-entropy has no smoothing. Set label_smoothing_factor=0. EMO's transport cost already "
            "gives credit to probability on tokens close to the target; or use TRL's SFTTrainer for smoothed "
            "cross-entropy."
        )


def _parallel_sizes(args) -> dict:
    config = getattr(args, "parallelism_config", None)
    sizes = {
        "cp_size": getattr(config, "cp_size", None) or int(os.environ.get("PARALLELISM_CONFIG_CP_SIZE", "1")),
        "sp_size": getattr(config, "sp_size", None) or int(os.environ.get("PARALLELISM_CONFIG_SP_SIZE", "1")),
    }
    return {name: size for name, size in sizes.items() if size > 1}


def check_trainer_loss_options(model, args, bound: dict) -> None:
    """`compute_loss_func` and context / sequence parallelism, checked by `EMOTrainer` (prompt-learning PEFT is
    refused in `sharding_checks.check_peft_method`).

    Args:
        model: the model argument of the trainer (a path or a model).
        args: the `EMOConfig`.
        bound (`dict`): the trainer's other arguments by name (`compute_loss_func`, `peft_config`, ...).
    """
    if bound.get("compute_loss_func") is not None:
        raise ValueError(
            "compute_loss_func would replace the EMO loss (and cost a second, full-logits forward per step). Remove "
            "it: EMOTrainer's loss is set by the emo_* options. To compute another loss, subclass EMOTrainer and "
            "override compute_loss, or use TRL's SFTTrainer."
        )
    sizes = _parallel_sizes(args)
    if sizes:
        raise ValueError(f"{', '.join(f'{k}={v}' for k, v in sizes.items())}: {SHIFT_LABELS_ERROR}")
