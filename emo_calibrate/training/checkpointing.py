"""What a Trainer checkpoint does not hold but an exact EMO resume needs, and the refusal to save NaN weights.

A checkpoint written by `EMOTrainer` gets two small extra files:

- `emo_trainer_state.json`: the cost-embedding source and a fingerprint of the cost embedding, the non-finite step
  counters and the token count behind the logged `num_tokens`;
- `emo_cost_embedding.safetensors`: the cost embedding itself, when it is a copy made before training (`frozen` with a
  trained head). On resume it is restored from here, never recaptured from the (by then trained) head.
"""

import json
import logging
import os

import torch
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from .callbacks import _any_rank


logger = logging.getLogger(__name__)

__all__ = ["COST_EMBEDDING_FILE", "STATE_FILE", "assert_finite_weights", "restore_emo_state", "save_emo_state"]

STATE_FILE = "emo_trainer_state.json"
COST_EMBEDDING_FILE = "emo_cost_embedding.safetensors"


def _fingerprint(tensor: torch.Tensor, rows_per_chunk: int = 8192) -> list[float]:
    """Norm and two fixed random projections of a (V, d) matrix: equal for the same matrix whatever its dtype or
    device (to rounding), different for another one. Computed by row chunks: no full fp32 copy of a large head."""
    generator = torch.Generator().manual_seed(0)
    rows, cols = tensor.shape
    signs_v = torch.randint(0, 2, (2, rows), generator=generator).float().mul_(2).sub_(1).to(tensor.device)
    signs_d = torch.randint(0, 2, (cols, 2), generator=generator).float().mul_(2).sub_(1).to(tensor.device)
    squares = torch.zeros((), device=tensor.device)
    projections = torch.zeros(2, device=tensor.device)
    for start in range(0, rows, rows_per_chunk):
        chunk = tensor[start : start + rows_per_chunk].detach().float()
        squares += chunk.pow(2).sum()
        projections += torch.diagonal(signs_v[:, start : start + rows_per_chunk] @ chunk @ signs_d)
    return [squares.sqrt().item()] + (projections / (rows * cols) ** 0.5).tolist()


def _same_fingerprint(a: list[float], b: list[float]) -> bool:
    scale = max(abs(a[0]), 1e-12)
    return all(abs(x - y) <= 1e-2 * scale for x, y in zip(a, b))


def _cost_in_use(trainer) -> torch.Tensor | None:
    """The cost embedding the loss reads now (None for `adaptive`, which follows the trained head)."""
    if trainer.args.emo_cost_embedding == "adaptive":
        return None
    return trainer._emo_cost if trainer._emo_cost is not None else trainer._output_weight()


def _write_atomically(path: str, write) -> None:
    temporary = f"{path}.tmp-{os.getpid()}"
    write(temporary)
    os.replace(temporary, path)


def save_emo_state(trainer, checkpoint_dir: str) -> None:
    """Write the EMO extras into a checkpoint folder the Trainer has just written (main process only)."""
    if not trainer.args.should_save:
        return
    from safetensors.torch import save_file

    cost = _cost_in_use(trainer)
    copied = trainer._emo_cost is not None and trainer.args.emo_cost_embedding == "frozen"
    if copied:
        tensor = trainer._emo_cost.detach().contiguous().cpu()
        _write_atomically(os.path.join(checkpoint_dir, COST_EMBEDDING_FILE), lambda p: save_file({"cost": tensor}, p))
    guard = trainer._nonfinite_guard
    state = {
        "emo_cost_embedding": trainer.args.emo_cost_embedding,
        "cost_embedding_saved": copied,
        "cost_embedding_fingerprint": None if cost is None else _fingerprint(cost),
        "nonfinite_steps": guard.total,
        "nonfinite_consecutive": guard.consecutive,
        "total_train_tokens": trainer._total_train_tokens,
    }
    text = json.dumps(state, indent=2)
    _write_atomically(os.path.join(checkpoint_dir, STATE_FILE), lambda p: open(p, "w").write(text))


def _checkpoints_in(folder: str) -> list[str]:
    if not os.path.isdir(folder):
        return []
    return sorted(n for n in os.listdir(folder) if n.startswith(f"{PREFIX_CHECKPOINT_DIR}-"))


def restore_emo_state(trainer, resume_from_checkpoint):
    """Restore the EMO extras before `Trainer.train` resumes; returns `resume_from_checkpoint` resolved to a path.

    `True` means the latest checkpoint in `output_dir`, as for the Trainer. A checkpoint without EMO extras (written by
    another trainer) resumes with a warning; a cost embedding that differs from the one the run started with is refused.
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
    if resume_from_checkpoint is True:
        resume_from_checkpoint = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
        if resume_from_checkpoint is None:
            raise ValueError(f"resume_from_checkpoint=True, but {output_dir} holds no checkpoint-* folder to resume.")
    checkpoint = str(resume_from_checkpoint)
    if not os.path.isfile(os.path.join(checkpoint, "trainer_state.json")):
        available = _checkpoints_in(os.path.dirname(os.path.abspath(checkpoint)))
        raise ValueError(
            f"resume_from_checkpoint={checkpoint!r} is not a checkpoint folder (no trainer_state.json)."
            + (f" Checkpoints next to it: {', '.join(available)}." if available else "")
        )
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
        head = trainer._output_weight()
        trainer._emo_cost = saved.to(device=head.device, dtype=head.dtype)
        logger.info("EMO: restored the pre-training cost embedding from %s.", checkpoint)
    cost = _cost_in_use(trainer)
    expected = state["cost_embedding_fingerprint"]
    if cost is not None and expected is not None and not _same_fingerprint(_fingerprint(cost), expected):
        raise ValueError(
            f"The cost embedding differs from the one {checkpoint} was trained with (emo_cost_embedding="
            f"{trainer.args.emo_cost_embedding!r}): resuming would change the objective in the middle of the run. "
            "Resume with the same base model and the same emo_cost_embedding file as the original run."
        )
    trainer._nonfinite_guard.total = state["nonfinite_steps"]
    trainer._nonfinite_guard.consecutive = state["nonfinite_consecutive"]
    trainer._total_train_tokens = state["total_train_tokens"]
    return checkpoint


def assert_finite_weights(model) -> None:
    """Raise instead of saving when a trainable tensor holds NaN/inf (those are the tensors an adapter saves)."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    bad = [name for name, p in named if not bool(torch.isfinite(p.detach()).all())]
    device = named[0][1].device if named else "cpu"
    if _any_rank(bool(bad), device):
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise ValueError(
            f"Refusing to save: {len(bad)} trainable tensor(s) hold NaN/inf values ({shown or 'on another process'}). "
            "An adapter with NaN weights would produce garbage. Resume from the last good checkpoint with a lower "
            "learning_rate, or bf16 instead of fp16."
        )
