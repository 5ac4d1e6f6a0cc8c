"""`EMOConfig`: TRL's `SFTConfig` plus the fields of the EMO loss, and nothing else."""

import logging
import os
from dataclasses import dataclass, field

from trl import SFTConfig

from .holdout import HOLDOUT_MAX_ROWS
from .validation import check_config_loss_options, check_mixed_precision_request


logger = logging.getLogger(__name__)

__all__ = ["EMOConfig", "COST_EMBEDDING_KEYWORDS"]

COST_EMBEDDING_KEYWORDS = ("frozen", "adaptive")
WEIGHTING_CHOICES = ("emo_anchored", "mle_anchored", "mle")
# Metrics (logged by EMOTrainer and the perplexity budget) for which lower is better.
_LOWER_IS_BETTER = ("mle", "emo", "emd", "ppl", "ppl_ratio")


def _has_accelerator() -> bool:
    import torch

    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


@dataclass
class EMOConfig(SFTConfig):
    r"""
    Configuration for [`EMOTrainer`]: every field of [`~trl.SFTConfig`] plus the parameters of the EMO loss.
    SFTConfig's options for its own cross-entropy, `loss_type` other than `"nll"` and `label_smoothing_factor > 0`,
    are refused here: the loss is EMO's.

    > Parameters that control the EMO loss

    emo_weighting (`str`, *optional*, defaults to `"mle_anchored"`):
        How cross-entropy (mle) and the EMO term are mixed, per token, with a detached ratio of the two.
        `"mle_anchored"` = ½(mle + sg(mle/emo)·emo) ("EMO-1"; its loss value equals cross-entropy unless clamped).
        `"emo_anchored"` = sg(emo/mle)·mle + emo (the official continual fine-tuning default, "EMO-2"; its loss value
        is 2·emo). `"mle"` = plain cross-entropy with EMO only measured and logged, the A/B baseline. Why
        `"mle_anchored"` is the default (docs/results.md, one epoch on SmolLM2-135M with the official LoRA setting,
        each against its MLE twin): it kept perplexity (1.003x), calibration (ECE 1.2x) and in-context accuracy,
        raised MAUVE and cut greedy repetition by 7 %; `"emo_anchored"` cut repetition by 30 % but nearly doubled
        ECE and lost 3 points on one of four in-context tasks. Choose `"emo_anchored"` when less degeneration
        matters more than calibration.
    emo_ratio_clamp (`float`, *optional*):
        Upper bound on the detached mle/emo ratio of `"mle_anchored"` (3.0 in some official variants). Only valid with
        `emo_weighting="mle_anchored"`.
    emo_subtract_target_mass (`bool`, *optional*, defaults to `True`):
        Subtract the target's own (detached) probability from q before the EMO term, as the official code does. The
        gradient is unchanged; the value gains q_y, which keeps the detached ratios well-conditioned. The logged `emd`
        is the transport cost without it (the earth mover distance to the target); `emo` = `emd` + q_y.
    emo_cost_embedding (`str`, *optional*, defaults to `"frozen"`):
        Embedding that defines the transport cost 1 - cos(e_i, e_j). `"frozen"`: the model's pretrained output
        embedding as it is before training (under LoRA the head is frozen, so it is read in place, without a copy).
        `"adaptive"`: the live output embedding, detached, for runs that train the head. Or a path to a `.safetensors`
        file or a model folder whose output embedding has the same vocabulary (its width may differ).
    emo_fused_head (`bool`, *optional*, defaults to `True`):
        Compute the loss from the decoder's last hidden state in token chunks, never materialising the (batch,
        seq_len, vocab) logits, in the training dtype (under bf16 mixed precision its GEMMs run in bf16, with no
        fp32 copy of the head). Soft-capped or scaled logits (Gemma 2, Cohere, Granite, ...) and DeepSpeed ZeRO-3 are
        handled. A head it cannot stand in for (a bias, an adapter on `lm_head`, a quantised head, a model whose
        logits a one-time check does not reproduce) falls back to the reference full-logits path, with one warning
        giving the memory it costs.
    emo_chunk_size (`int`, *optional*):
        Tokens per chunk of the fused head. Default: chosen from the vocabulary and hidden sizes.

    > Parameters of the perplexity budget (on by default: a run stops before it damages the model it calibrates)

    emo_guard_max_ppl_ratio (`float`, *optional*, defaults to `1.05`):
        The budget: held-out perplexity over the starting model's. The starting model is evaluated once
        (`eval_on_start` is switched on), then the held-out split every `emo_guard_eval_steps`; each evaluation logs
        `eval_ppl` and `eval_ppl_ratio` (and, at the first, `eval_ppl_start`). At each evaluation inside the budget
        the trainable weights are copied to CPU memory (a few MB for LoRA; for full fine-tuning a copy of every
        trainable weight); at the first one past it, training stops and those weights are put back, so that
        `save_model()` saves the last evaluated step inside the budget, not the last step. Why 1.05 (docs/results.md):
        with the default (official) LoRA setting, one epoch on SmolLM2-135M ended at 0.98x the starting perplexity
        (`mle_anchored`) or 1.02x (`emo_anchored`), so the budget leaves both alone; with the 0.2 all-linear setting
        `emo_anchored` passed 1.05x between steps 52 and 104 (1.09x at 104, 1.33x at 156), and the budget stops it
        there. `None` turns the budget off: no evaluation, no hold-out. Cost: the evaluations (see
        `emo_guard_eval_steps`) and the copies.
    emo_guard_stop (`bool`, *optional*, defaults to `True`):
        Stop at the first evaluation past the budget and keep the last weights inside it. `False`: warn, train on to
        the end and keep the last step. With `load_best_model_at_end=True` the Trainer's best checkpoint is kept
        instead (the budget only stops).
    emo_guard_eval_steps (`float`, *optional*, defaults to `0.1`):
        How often the budget evaluates when `eval_strategy="no"` (otherwise the user's schedule is kept): a fraction
        `< 1` of the run's optimizer steps (`0.1`: every 10 %, i.e. 10 evaluations plus the start, whatever the
        length of the run), or a number of steps. Each evaluation is one forward pass over the held-out split (about
        a third of a training step per token), so the default adds about 11/3 x (held-out tokens) / (training
        tokens) to the training time: ~7 % for the default 2 % hold-out and one epoch, far more for a large given
        eval split or a short run on much data (then raise this, or give a smaller eval split).
    emo_guard_holdout (`float`, *optional*, defaults to `0.02`):
        When the data has no eval split: the share of the training rows held out by document (a fraction `< 1`, at
        most 1000 rows; or a number of rows), seeded by `data_seed` (else `seed`) and written to `emo_training.json`.
        Rows sharing a `document` / `document_id` / `doc_id` / `title` / `id` value are held out together; without
        such a column, a few contiguous spans of rows are (consecutive sentences of one article stay together). These
        rows are not trained on. `0`: no automatic hold-out; the budget is then off unless an eval split is given.

    > Parameters that keep a run safe

    emo_max_nonfinite_steps (`int`, *optional*, defaults to `10`):
        An optimizer step whose loss or gradient norm is NaN/inf (fp16 overflow, a bad batch) is skipped: its gradients
        are dropped, the weights and optimizer state stay as they were, and the total is logged as `nonfinite_steps`.
        After this many such steps in a row, training saves a checkpoint and stops with an error. `0` stops at the
        first one.

    > [!NOTE]
    > Defaults that differ from [`~trl.SFTConfig`]:
    > - `activation_checkpointing`: `True` unless `gradient_checkpointing` is given (TRL's `gradient_checkpointing=True`
    >   under the name transformers 5.24 uses; the old name is still accepted, with transformers' deprecation warning).
    > - `dataloader_pin_memory`: `False` when training on the CPU (pinned memory only speeds up copies to an
    >   accelerator).
    """

    # TRL's base config defaults the deprecated name to True, so every SFTConfig warns. Leave it unset here and default
    # `activation_checkpointing` in __post_init__ instead; a user's `gradient_checkpointing` still works (mapped there).
    gradient_checkpointing: bool | None = field(
        default=None,
        metadata={
            "help": "Deprecated alias of activation_checkpointing (transformers 5.24), still accepted.",
            "nargs": "?",
            "const": True,
        },
    )

    emo_weighting: str = field(
        default="mle_anchored",
        metadata={
            "help": "How cross-entropy (mle) and EMO are mixed per token. 'mle_anchored' = 0.5*(mle + sg(mle/emo)*emo) "
            "(the default: keeps perplexity, calibration and in-context accuracy, mildly less repetition; loss value "
            "= mle), 'emo_anchored' = sg(emo/mle)*mle + emo (the official script's: much less repetition, paid in "
            "calibration; loss value = 2*emo), 'mle' = plain cross-entropy with EMO only logged (A/B baseline). "
            "See docs/results.md.",
            "choices": list(WEIGHTING_CHOICES),
        },
    )
    emo_ratio_clamp: float | None = field(
        default=None,
        metadata={
            "help": "Upper bound on the detached mle/emo ratio of 'mle_anchored' (3.0 in some official variants)."
        },
    )
    emo_subtract_target_mass: bool = field(
        default=True,
        metadata={
            "help": "Subtract the target's own detached probability from q before the EMO term (official code). "
            "Same gradient; keeps the detached ratios well-conditioned."
        },
    )
    emo_cost_embedding: str = field(
        default="frozen",
        metadata={
            "help": "Embedding defining the transport cost 1 - cos: 'frozen' (the pretrained output embedding before "
            "training), 'adaptive' (the live head, detached), or a path to a .safetensors file or a model folder "
            "with the same vocabulary."
        },
    )
    emo_fused_head: bool = field(
        default=True,
        metadata={
            "help": "Compute EMO from the last hidden state in token chunks, in the training dtype, without the full "
            "logits (falls back to the reference path, with one warning, where the model's head cannot be fused)."
        },
    )
    emo_chunk_size: int | None = field(
        default=None,
        metadata={"help": "Tokens per chunk of the fused head (default: chosen from vocabulary and hidden size)."},
    )

    # ---- perplexity budget (training/perplexity_budget.py, holdout.py) ----
    emo_guard_max_ppl_ratio: float | None = field(
        default=1.05,
        metadata={
            "help": "Perplexity budget, on by default: evaluate the starting model and the held-out split every "
            "emo_guard_eval_steps; stop once held-out perplexity passes this ratio to the start's and keep (save) the "
            "last evaluated weights inside it. Without an eval split, emo_guard_holdout of the training documents is "
            "held out. Costs the evaluations and, per evaluation, a CPU copy of the trainable weights (LoRA: a few "
            "MB). null: off (no evaluation, no hold-out)."
        },
    )
    emo_guard_stop: bool = field(
        default=True,
        metadata={
            "help": "Stop at the first evaluation past the budget and keep the last weights inside it; false: warn "
            "only, train to the end and keep the last step."
        },
    )
    emo_guard_eval_steps: float = field(
        default=0.1,
        metadata={
            "help": "How often the budget evaluates when eval_strategy is 'no' (a schedule you set is kept): a "
            "fraction < 1 of the optimizer steps (0.1 = every tenth of the run: 10 evaluations + the start) or a "
            "number of steps. Each is one forward pass over the held-out split."
        },
    )
    emo_guard_holdout: float = field(
        default=0.02,
        metadata={
            "help": "Without an eval split: the share of the training rows held out by document for the budget (a "
            f"fraction < 1, at most {HOLDOUT_MAX_ROWS} rows, or a number of rows), seeded by data_seed (else seed). "
            "Rows sharing a document/document_id/doc_id/title/id value go together; otherwise contiguous spans of "
            "rows. 0: none (the budget is then off)."
        },
    )

    # ---- reliability (issue 7) ----
    emo_max_nonfinite_steps: int = field(
        default=10,
        metadata={
            "help": "Optimizer steps with a NaN/inf loss or gradient norm are skipped (and counted in the logged "
            "'nonfinite_steps'); after this many in a row, training saves a checkpoint and stops with an error. "
            "0 stops at the first one."
        },
    )

    def __post_init__(self):
        import torch

        if self.activation_checkpointing is None and self.gradient_checkpointing is None:
            self.activation_checkpointing = True  # TRL's default, under its current name
        if self.use_cpu or not torch.accelerator.is_available():
            self.dataloader_pin_memory = False  # torch warns that pinning needs an accelerator; it would do nothing
        # The Trainer's default best model is the one with the lowest eval loss, but with the default
        # emo_subtract_target_mass the EMO loss (2 * emo) rises as the model becomes confidently right: keep the
        # checkpoint with the lowest held-out cross-entropy instead, unless the user chose a metric.
        if self.load_best_model_at_end and self.metric_for_best_model is None:
            self.metric_for_best_model = "mle"
            logger.info(
                "load_best_model_at_end: keeping the checkpoint with the lowest eval_mle (held-out cross-entropy)."
            )
        # The budget's metrics are lower-is-better, but the Trainer assumes higher-is-better for names not ending in
        # "loss": set the direction unless the user did.
        best = (self.metric_for_best_model or "").removeprefix("eval_")
        if self.greater_is_better is None and best in _LOWER_IS_BETTER:
            self.greater_is_better = False
        # SFTConfig turns bf16 on by default, which raises on a machine without an accelerator. Only when the user
        # left bf16 unset, fall back to fp32 there instead of failing.
        if self.bf16 is None and not self.fp16 and not self.use_cpu and not _has_accelerator():
            logger.info("No GPU found: training in float32 (set bf16=True with use_cpu=True for CPU autocast).")
            self.bf16 = False
        check_mixed_precision_request(self)  # a clearer message than TrainingArguments' for bf16 without support
        super().__post_init__()
        check_config_loss_options(self)  # loss_type, label_smoothing_factor: SFT options EMO would ignore

        if self.emo_weighting not in WEIGHTING_CHOICES:
            raise ValueError(
                f"emo_weighting={self.emo_weighting!r} is not one of {list(WEIGHTING_CHOICES)}. Use 'mle_anchored' "
                "(the default), 'emo_anchored' (the official script's, stronger), or 'mle' for an MLE baseline."
            )
        if self.emo_ratio_clamp is not None:
            if self.emo_weighting != "mle_anchored":
                raise ValueError(
                    f"emo_ratio_clamp={self.emo_ratio_clamp} only applies to emo_weighting='mle_anchored' "
                    f"(got {self.emo_weighting!r}). Remove emo_ratio_clamp or switch the weighting."
                )
            if not self.emo_ratio_clamp > 0:
                raise ValueError(
                    f"emo_ratio_clamp must be > 0 (the official value is 3.0), got {self.emo_ratio_clamp}."
                )
        if self.emo_cost_embedding not in COST_EMBEDDING_KEYWORDS and not os.path.exists(self.emo_cost_embedding):
            raise ValueError(
                f"emo_cost_embedding={self.emo_cost_embedding!r} is neither 'frozen', 'adaptive' nor an existing path. "
                "Pass 'frozen' (default), 'adaptive', or the path of a .safetensors file / model folder."
            )
        if self.emo_guard_max_ppl_ratio is not None and not self.emo_guard_max_ppl_ratio > 1:
            raise ValueError(
                f"emo_guard_max_ppl_ratio must be > 1 (e.g. 1.05 = stop at +5% held-out perplexity), got "
                f"{self.emo_guard_max_ppl_ratio}. Use None to turn the perplexity budget off."
            )
        for name in ("emo_guard_eval_steps", "emo_guard_holdout"):
            value = getattr(self, name)
            if value < 0 or (name == "emo_guard_eval_steps" and value == 0) or (value >= 1 and value != int(value)):
                raise ValueError(
                    f"{name} must be a fraction below 1 or a whole number"
                    + (" (0: no automatic hold-out)" if name == "emo_guard_holdout" else " above 0")
                    + f", got {value}."
                )
            if value >= 1:
                setattr(self, name, int(value))  # a number of steps / rows, as the Trainer's own eval_steps
        if self.emo_chunk_size is not None and self.emo_chunk_size < 1:
            raise ValueError(f"emo_chunk_size must be a positive number of tokens, got {self.emo_chunk_size}.")
        if self.emo_max_nonfinite_steps < 0:
            raise ValueError(
                f"emo_max_nonfinite_steps must be >= 0 (0 stops at the first NaN/inf step), got "
                f"{self.emo_max_nonfinite_steps}."
            )
