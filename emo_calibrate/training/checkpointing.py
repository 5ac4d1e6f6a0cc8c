"""What a Trainer checkpoint does not hold but an exact EMO resume needs, checkpoints that are whole or absent, and the
refusal to save NaN weights.

A checkpoint written by `EMOTrainer` gets small extra files:

- `emo_trainer_state.json`: the cost-embedding source, the non-finite step counters and the token count behind the
  logged `num_tokens`;
- `emo_cost_identity.safetensors`: the identity of the cost embedding the run started with (`cost_identity.py`),
  computed once before training, so that saving needs no collective and resuming with another matrix is refused;
- `emo_cost_embedding.safetensors`: the cost embedding itself, when it is a copy made before training (`frozen` with a
  trained head). On resume it is restored from here, never recaptured from the (by then trained) head;
- `emo_checkpoint_status.json`: `{"complete": false}` written before anything else, replaced by `{"complete": true,
  "files": {name: size}}` once every process has written its files. A checkpoint without `"complete": true` was
  interrupted while being written (SIGKILL, out of memory, node failure) and is never resumed from.
"""

import json
import logging
import os
import re

import torch
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .callbacks import _any_rank
from .cost_identity import CostIdentity


logger = logging.getLogger(__name__)

__all__ = [
    "COST_EMBEDDING_FILE",
    "IDENTITY_FILE",
    "STATE_FILE",
    "STATUS_FILE",
    "assert_finite_weights",
    "begin_checkpoint",
    "cost_identity_before_training",
    "finish_checkpoint",
    "latest_complete_checkpoint",
    "restore_emo_state",
    "save_emo_state",
]

STATE_FILE = "emo_trainer_state.json"
COST_EMBEDDING_FILE = "emo_cost_embedding.safetensors"
IDENTITY_FILE = "emo_cost_identity.safetensors"
STATUS_FILE = "emo_checkpoint_status.json"
_CHECKPOINT = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def _write_atomically(path: str, write) -> None:
    temporary = f"{path}.tmp-{os.getpid()}"
    write(temporary)
    os.replace(temporary, path)


def _write_json(path: str, value) -> None:
    text = json.dumps(value, indent=2)

    def write(temporary):
        with open(temporary, "w") as handle:
            handle.write(text)

    _write_atomically(path, write)


# ---- the cost embedding's identity, fixed before training --------------------------------------------------------


def cost_identity_before_training(trainer) -> CostIdentity | None:
    """The identity of the cost embedding the loss will read; None for `adaptive` (it follows the trained head) and
    where this process may hold no weights: with FSDP's cpu_ram_efficient_loading, transformers reads the checkpoint
    only on the first process of each node (`is_fsdp_enabled`, the condition it loads by), which then does the checks.
    Call it before accelerate / FSDP wraps the model."""
    from transformers.integrations import is_fsdp_enabled

    if trainer.args.emo_cost_embedding == "adaptive":
        return None
    if is_fsdp_enabled() and not trainer.accelerator.is_local_main_process:
        return None
    tensor = trainer._emo_cost
    if tensor is None:
        tensor = trainer.accelerator.unwrap_model(trainer.model).get_output_embeddings().weight
    if tensor.is_meta:
        return None
    if hasattr(tensor, "full_tensor"):  # sharded at load time: every process runs __init__, so all join the gather
        tensor = tensor.full_tensor()
    return CostIdentity.of(tensor)


def save_emo_state(trainer, checkpoint_dir: str) -> None:
    """Write the EMO extras into a checkpoint folder the Trainer has just written (main process; no collective)."""
    if not trainer.args.should_save:
        return
    from safetensors.torch import save_file

    copied = trainer._emo_cost is not None and trainer.args.emo_cost_embedding == "frozen"
    if copied:
        tensor = trainer._emo_cost.detach().contiguous().cpu()
        _write_atomically(os.path.join(checkpoint_dir, COST_EMBEDDING_FILE), lambda p: save_file({"cost": tensor}, p))
    identity = trainer._cost_identity
    if identity is not None:
        _write_atomically(os.path.join(checkpoint_dir, IDENTITY_FILE), identity.save)
    guard = trainer._nonfinite_guard
    state = {
        "emo_cost_embedding": trainer.args.emo_cost_embedding,
        "cost_embedding_saved": copied,
        "cost_embedding_identity": identity is not None,
        "nonfinite_steps": guard.total,
        "nonfinite_consecutive": guard.consecutive,
        "total_train_tokens": trainer._total_train_tokens,
    }
    _write_json(os.path.join(checkpoint_dir, STATE_FILE), state)


# ---- whole or absent ---------------------------------------------------------------------------------------------


def begin_checkpoint(checkpoint_dir: str) -> None:
    """Mark `checkpoint_dir` incomplete before anything is written into it (also when it is rewritten in place)."""
    os.makedirs(checkpoint_dir, exist_ok=True)
    _write_json(os.path.join(checkpoint_dir, STATUS_FILE), {"complete": False})


def _file_sizes(folder: str) -> dict[str, int]:
    sizes = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            relative = os.path.relpath(path, folder)
            if relative != STATUS_FILE and ".tmp-" not in name:
                sizes[relative] = os.path.getsize(path)
    return sizes


def finish_checkpoint(checkpoint_dir: str, step: int) -> None:
    """Mark `checkpoint_dir` complete; call it once every process has written its files."""
    _write_json(
        os.path.join(checkpoint_dir, STATUS_FILE),
        {"complete": True, "step": step, "files": _file_sizes(checkpoint_dir)},
    )


def _status(folder: str) -> tuple[str, str]:
    """("complete" | "incomplete" | "foreign" | "none", why) for a folder that may be a checkpoint."""
    path = os.path.join(folder, STATUS_FILE)
    if not os.path.isfile(path):
        if os.path.isfile(os.path.join(folder, "trainer_state.json")):
            return "foreign", "written without EMOTrainer's completeness record"
        return "none", "no trainer_state.json"
    try:
        with open(path) as handle:
            status = json.load(handle)
    except (OSError, ValueError):
        return "incomplete", f"its {STATUS_FILE} is unreadable"
    if not status.get("complete"):
        return "incomplete", "its write was interrupted before every file was saved"
    sizes = _file_sizes(folder)
    changed = [name for name, size in status.get("files", {}).items() if sizes.get(name) != size]
    if changed:
        return (
            "incomplete",
            f"{', '.join(sorted(changed)[:3])} {'is' if len(changed) == 1 else 'are'} missing or truncated",
        )
    return "complete", ""


def _checkpoints_in(folder: str) -> list[str]:
    """checkpoint-N folders of `folder`, by step (oldest first)."""
    if not os.path.isdir(folder):
        return []
    names = [n for n in os.listdir(folder) if _CHECKPOINT.match(n) and os.path.isdir(os.path.join(folder, n))]
    return sorted(names, key=lambda n: int(_CHECKPOINT.match(n).group(1)))


def latest_complete_checkpoint(folder: str, before: str | None = None) -> tuple[str | None, list[str]]:
    """The latest checkpoint of `folder` that was completely written (optionally older than the folder `before`),
    and the incomplete ones skipped on the way."""
    names = _checkpoints_in(folder)
    if before is not None and os.path.basename(os.path.normpath(before)) in names:
        names = names[: names.index(os.path.basename(os.path.normpath(before)))]
    skipped = []
    for name in reversed(names):
        path = os.path.join(folder, name)
        kind, _ = _status(path)
        if kind in ("complete", "foreign"):
            return path, skipped
        skipped.append(path)
    return None, skipped


def _resolve_checkpoint(output_dir: str, resume_from_checkpoint) -> str:
    if resume_from_checkpoint is True:
        checkpoint, skipped = latest_complete_checkpoint(output_dir)
        if checkpoint is None:
            raise ValueError(
                f"resume_from_checkpoint=True, but {output_dir} holds no complete checkpoint-* folder to resume"
                + (f" (incomplete: {', '.join(skipped)})." if skipped else ".")
            )
        for path in skipped:
            logger.warning(
                "%s is incomplete (%s): resuming from %s, the latest complete checkpoint.",
                path, _status(path)[1], checkpoint,
            )  # fmt: skip
        return checkpoint
    checkpoint = str(resume_from_checkpoint)
    kind, why = _status(checkpoint)
    if kind == "incomplete":
        parent = os.path.dirname(os.path.abspath(checkpoint))
        previous, _ = latest_complete_checkpoint(parent, before=checkpoint)
        raise ValueError(
            f"resume_from_checkpoint={checkpoint!r} is incomplete: {why}, so it cannot be resumed from. "
            + (
                f"The previous complete checkpoint is {previous}: resume from it (--resume_from_checkpoint {previous})."
                if previous
                else "There is no complete checkpoint before it: start the run again."
            )
        )
    if kind == "none":
        available = _checkpoints_in(os.path.dirname(os.path.abspath(checkpoint)))
        raise ValueError(
            f"resume_from_checkpoint={checkpoint!r} is not a checkpoint folder (no trainer_state.json)."
            + (f" Checkpoints next to it: {', '.join(available)}." if available else "")
        )
    return checkpoint


# ---- resume ------------------------------------------------------------------------------------------------------


def _check_cost_identity(trainer, checkpoint: str, state: dict) -> None:
    stored_path = os.path.join(checkpoint, IDENTITY_FILE)
    stored = CostIdentity.load(stored_path) if state.get("cost_embedding_identity") else None
    current = trainer._cost_identity
    if stored is None and current is not None:
        logger.warning(
            "%s records no identity of its cost embedding (written by an older emo_calibrate): the cost embedding "
            "cannot be checked against the one the run started with.", checkpoint,
        )  # fmt: skip
    difference = stored.difference(current) if stored is not None and current is not None else None
    # Processes without the weights (FSDP cpu_ram_efficient_loading) learn the verdict from the others.
    if _any_rank(difference is not None, trainer.args.device):
        raise ValueError(
            f"The cost embedding differs from the one {checkpoint} was trained with (emo_cost_embedding="
            f"{trainer.args.emo_cost_embedding!r}): {difference or 'found by another process'}. Resuming would change "
            "the objective in the middle of the run. Resume with the same base model and the same "
            "emo_cost_embedding file as the original run."
        )


def restore_emo_state(trainer, resume_from_checkpoint):
    """Restore the EMO extras before `Trainer.train` resumes; returns `resume_from_checkpoint` resolved to a path.

    `True` means the latest complete checkpoint in `output_dir`. An incomplete checkpoint is refused, naming the
    previous complete one. A checkpoint without EMO extras (written by another trainer) resumes with a warning; a cost
    embedding that differs from the one the run started with is refused.
    """
    output_dir = trainer.args.output_dir
    if resume_from_checkpoint is None or resume_from_checkpoint is False:
        existing = _checkpoints_in(output_dir)
        if existing:
            logger.warning(
                "output_dir %s already holds %s from an earlier run; this new run may overwrite them. To continue that "
                "run instead, pass resume_from_checkpoint.", output_dir, ", ".join(existing[-3:]),
            )  # fmt: skip
        return resume_from_checkpoint
    checkpoint = _resolve_checkpoint(output_dir, resume_from_checkpoint)
    state_file = os.path.join(checkpoint, STATE_FILE)
    if not os.path.isfile(state_file):
        logger.warning(
            "%s has no %s (not written by EMOTrainer): the cost embedding is taken from the model as loaded now.",
            checkpoint,
            STATE_FILE,
        )
        return checkpoint
    with open(state_file) as handle:
        state = json.load(handle)
    if state["emo_cost_embedding"] != trainer.args.emo_cost_embedding:
        raise ValueError(
            f"{checkpoint} was trained with emo_cost_embedding={state['emo_cost_embedding']!r}, but this run has "
            f"{trainer.args.emo_cost_embedding!r}. Resume with the same emo_cost_embedding."
        )
    if state["cost_embedding_saved"]:
        from safetensors.torch import load_file

        saved = load_file(os.path.join(checkpoint, COST_EMBEDDING_FILE))["cost"]
        head = trainer.accelerator.unwrap_model(trainer.model).get_output_embeddings().weight
        trainer._emo_cost = saved.to(device="cpu" if head.is_meta else head.device, dtype=head.dtype)
        trainer._cost_identity = CostIdentity.of(saved)  # the identity of the run's start, read back
        logger.info("EMO: restored the pre-training cost embedding from %s.", checkpoint)
    _check_cost_identity(trainer, checkpoint, state)
    trainer._nonfinite_guard.total = state["nonfinite_steps"]
    trainer._nonfinite_guard.consecutive = state["nonfinite_consecutive"]
    trainer._total_train_tokens = state["total_train_tokens"]
    return checkpoint


# ---- never a NaN save --------------------------------------------------------------------------------------------


def _local_values(param: torch.Tensor) -> torch.Tensor:
    """The values this process holds: the local shard of an FSDP2 DTensor, the partition of a ZeRO-3 parameter."""
    if hasattr(param, "ds_tensor"):
        return param.ds_tensor
    data = param.detach()
    return data.to_local() if hasattr(data, "to_local") else data


def nonfinite_trainable(model) -> list[str]:
    """Names of the trainable tensors that hold NaN/inf on this process (every process must call it)."""
    return [
        n for n, p in model.named_parameters() if p.requires_grad and not bool(torch.isfinite(_local_values(p)).all())
    ]


def assert_finite_weights(model) -> None:
    """Raise instead of saving when a trainable tensor holds NaN/inf (those are the tensors an adapter saves)."""
    bad = nonfinite_trainable(model)
    device = next((p.device for p in model.parameters()), "cpu")
    if _any_rank(bool(bad), device):
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise ValueError(
            f"Refusing to save: {len(bad)} trainable tensor(s) hold NaN/inf values ({shown or 'on another process'}). "
            "An adapter with NaN weights would produce garbage. Resume from the last good checkpoint with a lower "
            "learning_rate, or bf16 instead of fp16."
        )
