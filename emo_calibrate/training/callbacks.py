"""Callbacks that keep a run safe: skip NaN/inf updates, and stop cleanly (with a checkpoint) on SIGTERM / Ctrl-C.

Both stop the same way: at the end of the current optimizer step they ask the Trainer for a checkpoint and for the end
of training (`control.should_save`, `control.should_training_stop`); once `Trainer.train` has returned,
`StopController.raise_if_stopped` raises an error that names the checkpoint and the exact option to resume from it.
A caller that ignores the error never mistakes a partial run for a finished one.
"""

import contextlib
import logging
import math
import os
import signal
import threading

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR


logger = logging.getLogger(__name__)

__all__ = [
    "CalibrationGuard",
    "NonFiniteGuard",
    "NonFiniteTrainingError",
    "StopController",
    "TrainingInterrupted",
    "TrainingStopped",
]


class TrainingStopped(RuntimeError):
    """Training stopped before `max_steps` after saving a resumable checkpoint (`checkpoint`, a folder path)."""

    exit_code = 1

    def __init__(self, message: str, checkpoint: str | None = None):
        super().__init__(message)
        self.checkpoint = checkpoint


class TrainingInterrupted(TrainingStopped):
    """Stopped by SIGTERM (pre-emption) or SIGINT (Ctrl-C). `exit_code` is the shell's 128 + signal number."""

    def __init__(self, message: str, checkpoint: str | None = None, signum: int = signal.SIGTERM):
        super().__init__(message, checkpoint)
        self.exit_code = 128 + int(signum)


class NonFiniteTrainingError(TrainingStopped):
    """Stopped after `emo_max_nonfinite_steps` consecutive optimizer steps with a NaN/inf loss or gradient norm."""


def _any_rank(flag: bool, device) -> bool:
    """`flag` OR-ed over all processes, so that every rank takes the same decision (and joins the same save)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if torch.distributed.get_world_size() > 1:
            value = torch.tensor(float(flag), device=device)
            torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
            return bool(value.item())
    return flag


def resume_hint(checkpoint: str) -> str:
    return (
        f"Resume with the same command plus `--resume_from_checkpoint {checkpoint}` "
        f"(in Python: trainer.train(resume_from_checkpoint={checkpoint!r}))."
    )


class StopController(TrainerCallback):
    """Ends training at the next optimizer-step boundary with a checkpoint, when asked to.

    Asked by a signal (inside `catch_signals()`: SIGTERM and SIGINT; a second signal stops at once, without saving) or
    by `request` (the non-finite guard).
    """

    def __init__(self):
        self.reason: tuple[str, str, int] | None = None  # (kind, message, signal number)
        self.stopped_at: int | None = None
        self.checkpoint: str | None = None
        self._previous_handlers: dict[int, object] = {}

    def request(self, kind: str, message: str, signum: int = 0) -> None:
        if self.reason is None:
            self.reason = (kind, message, signum)

    # ---- signals ----

    @contextlib.contextmanager
    def catch_signals(self):
        """Install the SIGTERM/SIGINT handlers for the duration of training (main thread only; restored after)."""
        self.reason, self.stopped_at, self.checkpoint = None, None, None
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
            # Asked twice: the user wants out now. Hand the signal to whoever handled it before (default: exit).
            logger.warning("Received %s again: stopping at once, without a checkpoint.", name)
            self._restore_handlers()
            signal.raise_signal(signum)
            return
        self.request("signal", f"Training was interrupted by {name}.", signum)
        logger.warning(
            "Received %s: finishing the current step, then saving a checkpoint and stopping. Send it again to stop at "
            "once without saving.",
            name,
        )

    # ---- the Trainer's side ----

    def on_step_end(self, args, state, control, **kwargs):
        if _any_rank(self.reason is not None, args.device):
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at = state.global_step
        return control

    def on_save(self, args, state, control, **kwargs):
        if self.stopped_at == state.global_step:
            self.checkpoint = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        return control

    def raise_if_stopped(self, state) -> None:
        """After `Trainer.train` returned: raise if training was stopped early, naming the checkpoint to resume."""
        if self.stopped_at is None:
            return
        kind, message, signum = self.reason or ("signal", "Another process of this run was interrupted.", 0)
        if state.global_step >= state.max_steps and kind == "signal":
            logger.warning("%s It came during the last step: training had finished.", message)
            return
        full = (
            f"{message} Stopped at step {state.global_step}/{state.max_steps}; a resumable checkpoint was saved to "
            f"{self.checkpoint}. {resume_hint(self.checkpoint)}"
        )
        logger.warning(full)
        if kind == "signal":
            raise TrainingInterrupted(full, self.checkpoint, signum or signal.SIGTERM)
        raise NonFiniteTrainingError(full, self.checkpoint)


class NonFiniteGuard(TrainerCallback):
    """Skips every optimizer step whose loss or gradient norm is NaN/inf, counts it, and stops after too many in a row.

    The check runs after gradient clipping and before `optimizer.step()`. Clipping multiplies every gradient by
    `max_norm / norm`, so a non-finite norm leaves NaN in the gradients and the norm computed here is non-finite too.
    A bad step's gradients are dropped (set to None), so the optimizer leaves the weights and its state untouched; the
    learning-rate schedule still advances, as for any consumed batch. The total is logged as `nonfinite_steps`.

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

    def observe_loss(self, loss: torch.Tensor) -> None:
        bad = ~torch.isfinite(loss.detach()).all()
        self._bad_loss = bad if self._bad_loss is None else self._bad_loss | bad.to(self._bad_loss.device)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        bad = self._bad_loss if self._bad_loss is not None else torch.tensor(False)
        self._bad_loss = None
        if grads:
            norm = torch.nn.utils.get_total_norm(grads, error_if_nonfinite=False)
            bad = bad.to(norm.device) | ~torch.isfinite(norm)
        if not _any_rank(bool(bad.item()), args.device):
            self.consecutive = 0
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


# ---- the calibration guard ---------------------------------------------------------------------------------------
# The calibration guard: watch held-out perplexity drift from the starting model during training.
#
# EMO's effect depends steeply on the weighting and the learning rate: on SmolLM2-135M, `emo_anchored` at 5x the paper's
# learning rate tripled held-out perplexity within 60 steps (emo-method.md section 0b). `CalibrationGuard` makes such a
# run visible and, optionally, stops it:
#
# - the Trainer evaluates the starting model once before the first step (`eval_on_start`, switched on by `EMOTrainer`
#   when the guard is active), which fixes the reference perplexity `exp(eval_mle)`;
# - at every evaluation it adds `eval_ppl` and `eval_ppl_ratio` (= eval_ppl / start) to the metrics and to the logged
#   history, so `trainer_state.json` and the evaluation report's training curves show the drift;
# - past `max_ppl_ratio` it logs a warning, and with `stop=True` it ends training there.
#
# Keeping the best checkpoint is the Trainer's own job: `load_best_model_at_end=True` with
# `metric_for_best_model="mle"` (or `"ppl"` / `"ppl_ratio"`, all lower-is-better) and matching save/eval strategies.
# The reference survives a resume: it is read back from the `eval_ppl_start` entry of the restored log history.


class CalibrationGuard(TrainerCallback):
    """Log the held-out perplexity ratio to the starting model at every evaluation; warn, and optionally stop, past a bound.

    Args:
        max_ppl_ratio (`float`, *optional*, defaults to `1.2`): the ratio `eval_ppl / start_ppl` that triggers the
            warning (and the stop).
        stop (`bool`, *optional*, defaults to `False`): end training at the first evaluation past `max_ppl_ratio`.
        metric (`str`, *optional*, defaults to `"eval_mle"`): the mean held-out cross-entropy in the evaluation
            metrics (EMOTrainer logs it whatever the weighting; `eval_loss` is used when it is missing, which is the
            cross-entropy for plain SFT).
    """

    def __init__(self, max_ppl_ratio: float = 1.2, stop: bool = False, metric: str = "eval_mle"):
        if not max_ppl_ratio > 0:
            raise ValueError(f"max_ppl_ratio must be positive, got {max_ppl_ratio}.")
        self.max_ppl_ratio = max_ppl_ratio
        self.stop = stop
        self.metric = metric
        self.start_ppl: float | None = None
        self.tripped_at: int | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        # A resumed run keeps the reference of the original start, not of the checkpoint it resumes from.
        for entry in state.log_history:
            if "eval_ppl_start" in entry:
                self.start_ppl = entry["eval_ppl_start"]
        if self.start_ppl is None and not args.eval_on_start:
            logger.warning(
                "Calibration guard: eval_on_start is off, so the first evaluation (step %s), not the starting "
                "model, is the perplexity reference.",
                args.eval_steps,
            )

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if not metrics:
            return
        nll = metrics.get(self.metric, metrics.get("eval_loss"))
        if nll is None:
            return
        ppl = math.exp(min(nll, 700.0))  # exp overflows float past ~709
        added = {"eval_ppl": ppl}
        if self.start_ppl is None:
            self.start_ppl = ppl
            added["eval_ppl_start"] = ppl
            logger.info("Calibration guard: held-out perplexity at step %d is %.3f.", state.global_step, ppl)
        ratio = ppl / self.start_ppl
        added["eval_ppl_ratio"] = ratio
        # Visible to metric_for_best_model (read after this callback) and to the caller of evaluate() ...
        metrics.update(added)
        # ... and to trainer_state.json: the Trainer logged this evaluation just before calling on_evaluate.
        if state.log_history and self.metric in state.log_history[-1]:
            state.log_history[-1].update(added)
        if ratio > self.max_ppl_ratio:
            self.tripped_at = state.global_step if self.tripped_at is None else self.tripped_at
            logger.warning(
                "Calibration guard: held-out perplexity %.3f at step %d is %.2fx the starting %.3f (bound %.2fx). "
                "The learning rate or the weighting is likely too aggressive for this model (emo-method.md 0b: "
                "emo_anchored at 5x the paper's learning rate tripled perplexity); lower learning_rate or try "
                "emo_weighting='mle_anchored'.%s",
                ppl,
                state.global_step,
                ratio,
                self.start_ppl,
                self.max_ppl_ratio,
                " Stopping training (emo_guard_stop)." if self.stop else "",
            )
            if self.stop:
                control.should_training_stop = True
        return control
