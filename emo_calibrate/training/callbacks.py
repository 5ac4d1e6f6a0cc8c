"""Callbacks that keep a run safe: skip NaN/inf updates, and stop cleanly (with a checkpoint) on SIGTERM / Ctrl-C.

Both stop the same way: at the end of the current optimizer step they ask the Trainer for a checkpoint and for the end
of training (`control.should_save`, `control.should_training_stop`); once `Trainer.train` has returned,
`StopController.raise_if_stopped` raises an error that names the checkpoint and the exact option to resume from it.
A caller that ignores the error never mistakes a partial run for a finished one.
"""

import contextlib
import logging
import os
import signal
import threading
import time

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR


logger = logging.getLogger(__name__)

__all__ = [
    "NonFiniteGuard",
    "NonFiniteTrainingError",
    "StopController",
    "TrainingInterrupted",
    "TrainingStopped",
]


class TrainingStopped(RuntimeError):
    """Training stopped before `max_steps`; `checkpoint` is the folder to resume from (None when there is none).

    `cause` is why it stopped and `step` the optimizer step it stopped at (what the CLI reports).
    """

    exit_code = 1

    def __init__(self, message: str, checkpoint: str | None = None, *, cause: str = "", step: int | None = None):
        super().__init__(message)
        self.checkpoint = checkpoint
        self.cause = cause or message
        self.step = step


class TrainingInterrupted(TrainingStopped):
    """Stopped by SIGTERM (pre-emption) or SIGINT (Ctrl-C). `exit_code` is the shell's 128 + signal number."""

    def __init__(self, message: str, checkpoint: str | None = None, signum: int = signal.SIGTERM, **details):
        super().__init__(message, checkpoint, **details)
        self.exit_code = 128 + int(signum)


class NonFiniteTrainingError(TrainingStopped):
    """Stopped after `emo_max_nonfinite_steps` consecutive optimizer steps with a NaN/inf loss or gradient norm."""


def _max_over_ranks(values: list[float], device) -> list[float]:
    """Each of `values` maxed over all processes, in one collective (every rank must call it)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if torch.distributed.get_world_size() > 1:
            tensor = torch.tensor(values, dtype=torch.float64, device=device)
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
            return tensor.tolist()
    return list(values)


def _any_rank(flag: bool, device) -> bool:
    """`flag` OR-ed over all processes, so that every rank takes the same decision (and joins the same save)."""
    return bool(_max_over_ranks([float(flag)], device)[0])


def resume_hint(checkpoint: str) -> str:
    return (
        f"Resume with the same command plus `--resume_from_checkpoint {checkpoint}` "
        f"(in Python: trainer.train(resume_from_checkpoint={checkpoint!r}))."
    )


class StopController(TrainerCallback):
    """Ends training at the next optimizer-step boundary with a checkpoint, when asked to.

    Asked by a signal (inside `catch_signals()`: SIGTERM and SIGINT) or by `request` (the non-finite guard). The
    decision is shared by all processes at every step, so a signal to ONE process stops every process at the same
    step, with one checkpoint. A second signal more than `repeat_window` seconds after the first stops at once,
    without saving; repeats within the window are the same request arriving twice (a launcher such as torchrun
    forwards the Ctrl-C that the terminal already sent to every process).
    """

    repeat_window = 2.0  # seconds

    def __init__(self):
        self.reason: tuple[str, str, int] | None = None  # (kind, message, signal number)
        self.save = True
        self.stopped_at: int | None = None
        self.checkpoint: str | None = None
        self._signal_time: float | None = None
        self._previous_handlers: dict[int, object] = {}

    def request(self, kind: str, message: str, signum: int = 0, save: bool = True) -> None:
        if self.reason is None:
            self.reason = (kind, message, signum)
            self.save = save

    # ---- signals ----

    @contextlib.contextmanager
    def catch_signals(self):
        """Install the SIGTERM/SIGINT handlers for the duration of training (main thread only; restored after)."""
        self.reason, self.save, self.stopped_at, self.checkpoint, self._signal_time = None, True, None, None, None
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous_handlers[signum] = signal.signal(signum, self._on_signal)
        try:
            yield self
        finally:
            self._restore_handlers()

    def _restore_handlers(self):
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers.clear()

    def _on_signal(self, signum, frame):
        name = signal.Signals(signum).name
        if self.reason is not None and self.reason[0] == "signal":
            if time.monotonic() - self._signal_time < self.repeat_window:
                return  # the same request, delivered twice
            # Asked again: the user wants out now. Hand the signal to whoever handled it before (default: exit).
            logger.warning("Received %s again: stopping at once, without a checkpoint.", name)
            self._restore_handlers()
            signal.raise_signal(signum)
            return
        self._signal_time = time.monotonic()
        self.request("signal", f"Training was interrupted by {name}.", signum)
        logger.warning(
            "Received %s: finishing the current step, then saving a checkpoint and stopping. Send it again to stop at "
            "once without saving.",
            name,
        )

    # ---- the Trainer's side ----

    def on_step_end(self, args, state, control, **kwargs):
        # One collective per step: the signal number (or 1 for a non-finite stop) and whether to skip the save.
        local = (self.reason[2] or 1) if self.reason is not None else 0
        code, no_save = _max_over_ranks([float(local), float(self.reason is not None and not self.save)], args.device)
        if code:
            if self.reason is None:  # another process was signalled
                name = signal.Signals(int(code)).name if code > 1 else "a stop request"
                self.request("signal", f"Another process of this run received {name}.", int(code) if code > 1 else 0)
            control.should_save = not no_save
            control.should_training_stop = True
            self.stopped_at = state.global_step
        return control

    def on_save(self, args, state, control, **kwargs):
        if self.stopped_at == state.global_step:
            self.checkpoint = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        return control

    def raise_if_stopped(self, state, last_complete: str | None = None) -> None:
        """After `Trainer.train` returned: raise if training was stopped early, naming the checkpoint to resume.

        `last_complete` is named when this stop saved none (non-finite weights under DeepSpeed).
        """
        if self.stopped_at is None:
            return
        kind, message, signum = self.reason or ("signal", "Another process of this run was interrupted.", 0)
        if state.global_step >= state.max_steps and kind == "signal":
            logger.warning("%s It came during the last step: training had finished.", message)
            return
        checkpoint = self.checkpoint if self.checkpoint is not None else last_complete
        where = f"Stopped at step {state.global_step}/{state.max_steps}; "
        if self.checkpoint is not None:
            where += f"a resumable checkpoint was saved to {checkpoint}. {resume_hint(checkpoint)}"
        elif checkpoint is not None:
            where += f"no checkpoint was saved; the latest complete one is {checkpoint}. {resume_hint(checkpoint)}"
        else:
            where += "no checkpoint was saved and none exists: start again with the fix."
        full = f"{message} {where}"
        logger.warning(full)
        details = dict(cause=message, step=state.global_step)
        if kind == "signal":
            raise TrainingInterrupted(full, checkpoint, signum or signal.SIGTERM, **details)
        raise NonFiniteTrainingError(full, checkpoint, **details)


class NonFiniteGuard(TrainerCallback):
    """Skips every optimizer step whose loss or gradient norm is NaN/inf, counts it, and stops after too many in a row.

    The check runs after gradient clipping and before `optimizer.step()`. Clipping multiplies every gradient by
    `max_norm / norm`, so a non-finite norm leaves NaN in the gradients and the norm computed here is non-finite too.
    A bad step's gradients are dropped (set to None), so the optimizer leaves the weights and its state untouched; the
    learning-rate schedule still advances, as for any consumed batch. The total is logged as `nonfinite_steps`.

    Under DeepSpeed the engine steps inside `backward`, before this check: a bad step cannot be skipped here. Steps
    that DeepSpeed skips itself (fp16 loss-scale overflow) are counted as skipped; at the first other one the guard
    stops training, with a checkpoint when the weights are still finite (otherwise naming the last complete one), and
    it says so once when training starts.

    Args:
        trainer: the trainer whose `_metrics` receive `nonfinite_steps`.
        stop (`StopController`): asked to stop after more than `max_consecutive` bad steps in a row.
        max_consecutive (`int`): consecutive bad steps that are skipped; the next one stops training.
    """

    def __init__(self, trainer, stop: StopController, max_consecutive: int):
        self.trainer = trainer
        self.stop = stop
        self.max_consecutive = max_consecutive
        self.total = 0
        self.consecutive = 0
        self._bad_loss = None  # device tensor: no host sync per micro-batch
        self._deepspeed = False

    def observe_loss(self, loss: torch.Tensor) -> None:
        bad = ~torch.isfinite(loss.detach()).all()
        self._bad_loss = bad if self._bad_loss is None else self._bad_loss | bad.to(self._bad_loss.device)

    def on_train_begin(self, args, state, control, **kwargs):
        # accelerate hands backward AND the optimizer step to this wrapper of the DeepSpeed engine (set by prepare)
        self._deepspeed = getattr(self.trainer.accelerator, "deepspeed_engine_wrapped", None) is not None
        if self._deepspeed:
            logger.warning(
                "Non-finite guard under DeepSpeed: the engine applies each update inside backward, before the guard "
                "sees it, so a NaN/inf step cannot be skipped (only DeepSpeed's own fp16 overflow skips are). "
                "Training stops at the first NaN/inf loss or gradient norm instead, saving a checkpoint if the weights "
                "are still finite; emo_max_nonfinite_steps does not apply."
            )

    def _grad_norm(self, model) -> torch.Tensor | None:
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if grads:
            return torch.nn.utils.get_total_norm(grads, error_if_nonfinite=False)
        engine = getattr(self.trainer.accelerator, "deepspeed_engine_wrapped", None)  # DeepSpeed keeps its own
        value = engine.get_global_grad_norm() if engine is not None else None
        return None if value is None else torch.as_tensor(float(value))

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        bad = self._bad_loss if self._bad_loss is not None else torch.tensor(False)
        self._bad_loss = None
        norm = self._grad_norm(model)
        if norm is not None:
            bad = bad.to(norm.device) | ~torch.isfinite(norm)
        if not _any_rank(bool(bad.item()), args.device):
            self.consecutive = 0
        elif self._deepspeed and not self.trainer.accelerator.optimizer_step_was_skipped:
            self._stop_after_applied_update(state, model, args.device)
        else:
            model.zero_grad(set_to_none=True)
            self.total += 1
            self.consecutive += 1
            logger.warning(
                "Step %d: the loss or the gradient norm is NaN/inf; the update was skipped (%d in a row, %d in total).",
                state.global_step + 1,
                self.consecutive,
                self.total,
            )
            if self.consecutive > self.max_consecutive:
                self.stop.request(
                    "nonfinite",
                    f"Training stopped: {self.consecutive} optimizer steps in a row had a NaN/inf loss or gradient "
                    f"norm (emo_max_nonfinite_steps={self.max_consecutive}). Their updates were skipped, so the weights "
                    "are the last finite ones. Usual causes: fp16 overflow (use bf16=True), a learning rate too high "
                    "(lower learning_rate), or a broken batch (check the data of those steps).",
                )
        self.trainer._metrics["train"]["nonfinite_steps"] = [self.total]
        return control

    def _stop_after_applied_update(self, state, model, device):
        from .checkpointing import nonfinite_trainable

        self.total += 1
        self.consecutive += 1
        finite = not _any_rank(bool(nonfinite_trainable(model)), device)
        self.stop.request(
            "nonfinite",
            f"Training stopped: step {state.global_step + 1} had a NaN/inf loss or gradient norm, and under DeepSpeed "
            "the update was already applied (the engine steps inside backward), so it could not be skipped. "
            + (
                "The weights are still finite. "
                if finite
                else "The weights now hold NaN/inf, so they were not saved. "
            )
            + "Usual causes: fp16 overflow (use bf16=True), a learning rate too high (lower learning_rate), or a broken "
            "batch (check the data of that step).",
            save=finite,
        )
