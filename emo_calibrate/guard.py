"""The calibration guard: watch held-out perplexity drift from the starting model during training.

EMO's effect depends steeply on the weighting and the learning rate: on SmolLM2-135M, `emo_anchored` at 5x the paper's
learning rate tripled held-out perplexity within 60 steps (emo-method.md section 0b). `CalibrationGuard` makes such a
run visible and, optionally, stops it:

- the Trainer evaluates the starting model once before the first step (`eval_on_start`, switched on by `EMOTrainer`
  when the guard is active), which fixes the reference perplexity `exp(eval_mle)`;
- at every evaluation it adds `eval_ppl` and `eval_ppl_ratio` (= eval_ppl / start) to the metrics and to the logged
  history, so `trainer_state.json` and the evaluation report's training curves show the drift;
- past `max_ppl_ratio` it logs a warning, and with `stop=True` it ends training there.

Keeping the best checkpoint is the Trainer's own job: `load_best_model_at_end=True` with
`metric_for_best_model="mle"` (or `"ppl"` / `"ppl_ratio"`, all lower-is-better) and matching save/eval strategies.
The reference survives a resume: it is read back from the `eval_ppl_start` entry of the restored log history.
"""

import logging
import math

from transformers import TrainerCallback


__all__ = ["CalibrationGuard"]

logger = logging.getLogger(__name__)


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
