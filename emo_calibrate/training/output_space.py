"""Will the output folder hold the run? A real write probe, and the disk space for the adapter and its checkpoints.

Called from `validation.validate_trainer_inputs` (the folder) and `validation.validate_prepared_trainer` (the space,
once the trainable parameters are known), before the first step.
"""

import math
import os
import shutil
import tempfile


__all__ = ["check_disk_space", "check_output_dir", "estimate_output_bytes"]

_GIB = 1024**3


def _existing_ancestor(path: str) -> str:
    path = os.path.abspath(os.path.expanduser(path))
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def check_output_dir(path: str) -> None:
    """Check that `path` is (or can be created as) a folder this process can write, with a real write probe."""
    ancestor = _existing_ancestor(path)
    if not os.path.isdir(ancestor):
        raise ValueError(f"output_dir={path!r} cannot be created: {ancestor} is a file. Choose another output_dir.")
    try:
        handle, probe = tempfile.mkstemp(prefix=".emo-write-test-", dir=ancestor)
        os.close(handle)
        os.remove(probe)
    except OSError as error:
        raise ValueError(
            f"output_dir={path!r} is not writable ({error.strerror or error} in {ancestor}). Choose a folder you can "
            "write to, or fix its permissions."
        ) from None


def estimate_output_bytes(trainer) -> dict:
    """Estimate the disk space a run needs: the saved weights, and the checkpoints kept at the same time.

    Weights: the trainable tensors for a PEFT adapter, every tensor for a full model, in their own dtype. A checkpoint
    adds the optimizer state (2 tensors per trainable parameter for Adam-type optimizers, 1 byte each for 8-bit ones).
    Rotation writes a new checkpoint before deleting the oldest, so `save_total_limit + 1` can exist at once.

    Returns:
        `dict` with `weights`, `optimizer`, `checkpoints` (how many can exist at once) and `total` (bytes, including
        32 MiB per save for the tokenizer, trainer state and RNG files).
    """
    args, model = trainer.args, trainer.model
    params = list(model.parameters())  # shared (tied) parameters are listed once
    trainable = [p for p in params if p.requires_grad]
    saved = trainable if hasattr(model, "peft_config") else params
    weights = sum(p.numel() * p.element_size() for p in saved)
    optim = str(args.optim)
    per_param = 2 if "8bit" in optim else 0 if "adafactor" in optim else None
    optimizer = sum(p.numel() * (per_param if per_param is not None else 2 * p.element_size()) for p in trainable)

    saves = 0
    strategy = getattr(args.save_strategy, "value", args.save_strategy)
    if strategy != "no":
        steps = args.max_steps
        if steps <= 0 and hasattr(trainer.train_dataset, "__len__"):
            batches = math.ceil(len(trainer.train_dataset) / (args.per_device_train_batch_size * args.world_size))
            steps = math.ceil(batches / args.gradient_accumulation_steps * args.num_train_epochs)
        if strategy == "steps" and steps > 0:
            every = math.ceil(args.save_steps * steps) if args.save_steps < 1 else args.save_steps
            saves = max(1, steps // max(1, int(every)))
        else:  # per epoch, or "best": at most one per epoch / evaluation; count the epochs
            saves = max(1, math.ceil(args.num_train_epochs))
    kept = min(saves, args.save_total_limit) if args.save_total_limit else saves
    checkpoints = kept + (1 if saves > kept else 0)
    overhead = 32 * 1024**2
    total = weights + overhead + checkpoints * (weights + optimizer + overhead)
    return {"weights": weights, "optimizer": optimizer, "checkpoints": checkpoints, "total": total}


def check_disk_space(trainer) -> None:
    """Refuse to start when the output folder's disk cannot hold the adapter and the checkpoints of the run."""
    if not trainer.args.should_save:
        return
    need = estimate_output_bytes(trainer)
    ancestor = _existing_ancestor(trainer.args.output_dir)
    free = shutil.disk_usage(ancestor).free
    if free < need["total"]:
        raise ValueError(
            f"output_dir={trainer.args.output_dir!r} has {free / _GIB:.2f} GiB free, but this run needs about "
            f"{need['total'] / _GIB:.2f} GiB: the weights ({need['weights'] / _GIB:.2f} GiB) and up to "
            f"{need['checkpoints']} checkpoints (weights + optimizer state each). Free some space, choose another "
            "output_dir, or keep fewer checkpoints (save_total_limit, save_steps)."
        )
