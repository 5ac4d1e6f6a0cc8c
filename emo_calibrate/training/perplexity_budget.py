"""The perplexity budget: a calibration run stops before it damages the model it calibrates, and keeps the last
weights inside the budget.

EMO's benefit (less greedy repetition) comes early in a run while the damage to likelihood keeps growing: in the
one-epoch study (docs/results/study/README.md) held-out perplexity doubled by the end. So, by default:

- held-out data: the user's eval split as given, else a small split of whole documents held out of the training data
  (`holdout.py`);
- evaluation: the Trainer's own loop, at the start (the reference: the starting model) and, when the user left
  `eval_strategy="no"`, every `emo_guard_eval_steps`; each evaluation logs `eval_ppl`, `eval_ppl_ratio` (to the
  start) and, at the first, `eval_ppl_start` into `trainer_state.json`;
- at each evaluation inside the budget (`eval_ppl_ratio <= emo_guard_max_ppl_ratio`), a CPU copy of the trainable
  weights is kept; at the first one past it, training stops, and when it ends those weights are put back, so that
  `save_model()` writes them: the result is the last evaluated step inside the budget, not the last step.
"""

import logging
import math
from dataclasses import dataclass

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import IntervalStrategy

from .checkpointing import _local_values
from .holdout import HoldOut, hold_out


logger = logging.getLogger(__name__)

__all__ = ["Evaluation", "PerplexityBudget", "choose_heldout", "perplexity", "prepare_perplexity_budget"]


@dataclass(frozen=True)
class Evaluation:
    """One evaluation during training: the optimizer step, held-out perplexity, its ratio to the start, entropy."""

    step: int
    ppl: float
    ratio: float
    entropy: float | None = None

    def record(self) -> dict:
        return {"step": self.step, "ppl": self.ppl, "ratio": self.ratio, "entropy": self.entropy}


def _copy_trainable(model) -> dict[str, torch.Tensor]:
    """A CPU copy of what this process holds of each trainable tensor (an FSDP2 / ZeRO-3 rank: its shard)."""
    return {n: _local_values(p).detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def _restore_trainable(model, saved: dict[str, torch.Tensor]) -> None:
    for name, param in model.named_parameters():
        if name in saved:
            _local_values(param).copy_(saved[name])


def perplexity(nll: float) -> float:
    """exp of a mean token cross-entropy, capped where float `exp` would overflow (past ~709) on a diverged run."""
    return math.exp(min(nll, 700.0))


class PerplexityBudget(TrainerCallback):
    """Stop training when held-out perplexity passes `max_ppl_ratio` x the starting model's, and keep the last
    evaluated weights inside the budget.

    Evaluations run in the Trainer's loop (`EMOTrainer` schedules them, see `prepare_perplexity_budget`); this
    callback reads the held-out cross-entropy `eval_mle` of each and adds `eval_ppl`, `eval_ppl_ratio` (and, at the
    first, `eval_ppl_start`) to the metrics and to the logged history.

    The weights are put back when training ends (`on_train_end`), so checkpoints written on the way hold the weights
    of their step, and `save_model()` after `train()` writes the kept ones. With `load_best_model_at_end` the Trainer's
    best checkpoint is kept instead and the budget only stops. A resumed run reads its reference back from the
    `eval_ppl_start` of the restored history; the weights it can keep are those evaluated since the resume (the
    Trainer evaluates the resumed weights first): copies made before an interruption are not in a checkpoint.

    Cost: at each evaluation inside the budget (with `stop`), a CPU copy of the trainable tensors: a few MB for LoRA
    adapters; for full fine-tuning, one copy of every trainable weight in its training dtype in CPU memory (28 GB for
    7B fp32 parameters). Under FSDP2 or ZeRO-3 each process copies and puts back only its own shard; every process
    decides alike, because the evaluation metrics it reads are gathered over processes.

    Args:
        max_ppl_ratio (`float`, *optional*, defaults to `1.05`): the budget, held-out perplexity over the start's.
            `None`: off (the callback then only describes why).
        stop (`bool`, *optional*, defaults to `True`): stop at the first evaluation past the budget and put the last
            weights inside it back when training ends. `False`: warn, train on, keep the last step.
        eval_key (`str`, *optional*, defaults to `"eval"`): the prefix of the evaluated split's metrics
            (`"eval_<name>"` for the first of several eval datasets, the one the budget reads).
    """

    def __init__(self, max_ppl_ratio: float | None = 1.05, stop: bool = True, eval_key: str = "eval"):
        self.max_ppl_ratio = max_ppl_ratio
        self.stop = stop
        self.eval_key = eval_key
        self.off_reason: str | None = None if max_ppl_ratio is not None else "emo_guard_max_ppl_ratio is null"
        self.heldout: HoldOut | None = None
        self.heldout_dataset = None  # the raw held-out rows of an automatic hold-out (for generation samples)
        self.eval_steps: float | None = None  # the budget's own schedule, when it set one
        self.start_ppl: float | None = None
        self.start_entropy: float | None = None
        self.max_steps: int | None = None
        self.last: Evaluation | None = None  # the last evaluation during training
        self.inside: Evaluation | None = None  # the last one inside the budget
        self.tripped: Evaluation | None = None  # the first one past it
        self.kept: Evaluation | None = None  # the evaluation whose weights are in the model after training
        self.kept_how: str | None = None
        self._saved: dict[str, torch.Tensor] | None = None
        self._training = False

    @property
    def active(self) -> bool:
        return self.off_reason is None

    # ---- the Trainer's side ----

    def on_train_begin(self, args, state, control, **kwargs):
        # A resumed run keeps the reference of the original start, not of the checkpoint it resumes from.
        # A fresh run measures its own (eval_on_start), also after an evaluate() before train().
        self.start_ppl = None
        for entry in state.log_history:
            if "eval_ppl_start" in entry:
                self.start_ppl = entry["eval_ppl_start"]
        self.max_steps, self._training = state.max_steps, True
        self.last = self.inside = self.tripped = self.kept = self.kept_how = self._saved = None

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
        if not metrics or f"{self.eval_key}_loss" not in metrics:
            return  # another of several eval datasets
        nll = metrics.get("eval_mle", metrics[f"{self.eval_key}_loss"])  # eval_loss is the cross-entropy of SFT
        ppl = perplexity(nll)
        added = {"eval_ppl": ppl}
        if self.start_ppl is None:
            self.start_ppl = added["eval_ppl_start"] = ppl
            self.start_entropy = metrics.get("eval_entropy")
        ratio = added["eval_ppl_ratio"] = ppl / self.start_ppl
        # Visible to metric_for_best_model (read after this callback) and to the caller of evaluate() ...
        metrics.update(added)
        # ... and to trainer_state.json: the Trainer logged this evaluation just before calling on_evaluate.
        if state.log_history and f"{self.eval_key}_loss" in state.log_history[-1]:
            state.log_history[-1].update(added)
        if not self._training:
            return  # evaluate() called outside train(): measured, nothing to keep or stop
        self.last = Evaluation(state.global_step, ppl, ratio, metrics.get("eval_entropy"))
        if ratio <= self.max_ppl_ratio:
            self.inside = self.last
            if self.stop:
                self._saved = _copy_trainable(model)
        elif self.tripped is None:
            self.tripped = self.last
            logger.warning(
                "Perplexity budget: held-out perplexity %.3f at step %d is %.3fx the start's %.3f, past the budget "
                "of %.3fx.%s",
                ppl, state.global_step, ratio, self.start_ppl, self.max_ppl_ratio,
                " Stopping training; the last weights inside the budget are kept (the usual cause: a learning rate "
                "too high for this model)."
                if self.stop
                else " Training on (emo_guard_stop=False): the last step is kept.",
            )  # fmt: skip
            control.should_training_stop = self.stop

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._training = False
        if args.load_best_model_at_end and state.best_model_checkpoint is not None:
            # The user's choice wins: the Trainer has just loaded the best checkpoint.
            step = int(state.best_model_checkpoint.rstrip("/").rsplit("-", 1)[-1])
            self.kept, self.kept_how = self._logged_evaluation(state, step), "best"
        elif self.tripped is not None and self.stop and self._saved is not None:
            _restore_trainable(model, self._saved)
            self.kept, self.kept_how = self.inside, "restored"
        else:  # within the budget, warn-only, or no weights inside it in memory (a run resumed past it)
            measured = self.last is not None and self.last.step == state.global_step
            self.kept, self.kept_how = (self.last if measured else None), "last"
        self._saved = None

    @staticmethod
    def _logged_evaluation(state, step: int) -> Evaluation | None:
        for entry in state.log_history:
            if entry.get("step") == step and "eval_ppl_ratio" in entry:
                return Evaluation(step, entry["eval_ppl"], entry["eval_ppl_ratio"], entry.get("eval_entropy"))
        return None

    # ---- what happened ----

    def current_ppl(self) -> float | None:
        """Held-out perplexity of the weights in the model after training, when an evaluation measured them."""
        return self.kept.ppl if self.kept is not None else None

    def _kept_phrase(self) -> str:
        kept = self.kept
        if self.kept_how == "best":
            where = f", step {kept.step}, {kept.ratio:.2f}x" if kept is not None else ""
            return f"kept the best checkpoint (load_best_model_at_end){where}"
        if self.kept_how == "restored":
            start = ", the starting weights" if kept.step == 0 else ""
            return f"kept step {kept.step}{start}, {kept.ratio:.2f}x"
        if kept is not None:
            return f"kept the last step, {kept.step}, {kept.ratio:.2f}x"
        return "kept the last step, not evaluated"

    def describe(self) -> str:
        """One line for the end-of-run summary, e.g. `stopped at step 180 of 312: held-out perplexity 1.07x the
        start; kept step 150, 1.04x`."""
        if not self.active:
            return f"off ({self.off_reason})"
        if self.last is None:
            return "not measured: no evaluation ran during training"
        budget, kept, past = f"{self.max_ppl_ratio:g}x", self._kept_phrase(), self.tripped
        if past is None:
            if self.kept_how == "last" and self.kept is not None:
                kept = self.kept
                return (
                    f"held-out perplexity stayed within the budget ({budget}): {kept.ratio:.2f}x at step {kept.step}"
                )
            return (
                f"held-out perplexity stayed within the budget ({budget}) up to step {self.last.step}, "
                f"{self.last.ratio:.2f}x; {kept}"
            )
        if not self.stop:
            return (
                f"held-out perplexity passed the budget ({budget}) at step {past.step}, {past.ratio:.2f}x; "
                f"not stopped (emo_guard_stop false): {kept}"
            )
        line = (
            f"stopped at step {past.step} of {self.max_steps}: held-out perplexity {past.ratio:.2f}x the start; {kept}"
        )
        if self.kept_how == "last":  # nothing inside the budget since train() began
            line += " (no weights inside the budget in memory: the run was resumed past it)"
        return line

    def record(self) -> dict:
        """The budget, its held-out split and what happened, for `emo_training.json`."""
        return {
            "max_ppl_ratio": self.max_ppl_ratio,
            "stop": self.stop,
            "off_reason": self.off_reason,
            "eval_steps": self.eval_steps,
            "heldout": self.heldout.record() if self.heldout is not None else None,
            "start_ppl": self.start_ppl,
            "start_entropy": self.start_entropy,
            "max_steps": self.max_steps,
            "stopped_at": self.tripped.step if self.tripped is not None and self.stop else None,
            "first_past_budget": _entry(self.tripped),
            "kept": _entry(self.kept),
            "kept_how": self.kept_how,
            "summary": self.describe(),
        }


def _entry(evaluation: Evaluation | None) -> dict | None:
    return evaluation.record() if evaluation is not None else None


def prepare_perplexity_budget(args, kwargs: dict) -> tuple[dict, "PerplexityBudget"]:
    """Before `SFTTrainer.__init__(model, args, **kwargs)` (`kwargs`: its other arguments by name): the held-out split
    and evaluation schedule of the budget. Returns `kwargs` with the datasets to use, and the budget."""
    kwargs = dict(kwargs)
    kwargs["train_dataset"], kwargs["eval_dataset"], budget = choose_heldout(
        args, kwargs.get("train_dataset"), kwargs.get("eval_dataset")
    )
    return kwargs, budget


def choose_heldout(args, train_dataset, eval_dataset):
    """The held-out split and the evaluation schedule of the budget.

    An eval split the user gives is used as it is. Without one, `emo_guard_holdout` of the training documents is held
    out (`holdout.py`; seeded by `data_seed`, else `seed`); with `emo_guard_holdout=0`, or data that cannot be split
    (streaming), the budget is off and says so. When the user left `eval_strategy="no"`, evaluation is switched to
    every `emo_guard_eval_steps` steps (a fraction < 1 of the run, or a number of steps); a schedule the user set is
    kept. `eval_on_start` is switched on: the starting model is the reference. `args` is changed in place.

    Returns:
        `tuple`: (train dataset, eval dataset, `PerplexityBudget`); the datasets are those given unless a split was
        held out.
    """
    first = next(iter(eval_dataset)) if isinstance(eval_dataset, dict) else None
    budget = PerplexityBudget(args.emo_guard_max_ppl_ratio, args.emo_guard_stop, f"eval_{first}" if first else "eval")
    if not budget.active:
        return train_dataset, eval_dataset, budget
    if eval_dataset is not None:
        given = eval_dataset[first] if first else eval_dataset
        budget.heldout = HoldOut("given", len(given) if hasattr(given, "__len__") else None)  # None: streaming
    else:
        split = hold_out(train_dataset, args.emo_guard_holdout, _seed(args)) if args.emo_guard_holdout else None
        if split is None:
            budget.off_reason = (
                "no eval split and emo_guard_holdout=0"
                if not args.emo_guard_holdout
                else "no eval split, and the training data cannot be split (streaming, or under 2 rows)"
            )
            logger.warning("Perplexity budget off: %s. Pass an eval_dataset to keep it on.", budget.off_reason)
            return train_dataset, eval_dataset, budget
        train_dataset, eval_dataset, budget.heldout = split
        budget.heldout_dataset = eval_dataset
        logger.info("Perplexity budget: %s.", budget.heldout.describe())
    if args.eval_strategy == IntervalStrategy.NO:
        args.eval_strategy, args.eval_steps = IntervalStrategy.STEPS, args.emo_guard_eval_steps
        budget.eval_steps = args.emo_guard_eval_steps
    args.eval_on_start = True
    return train_dataset, eval_dataset, budget


def _seed(args) -> int:
    return args.data_seed if args.data_seed is not None else args.seed
