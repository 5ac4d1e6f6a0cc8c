"""`EMOTrainer`: TRL's `SFTTrainer` with the EMO loss. Only `compute_loss` is overridden.

Everything else (loading a model from an id or path, 4-bit quantisation, LoRA wrapping, dataset preparation, packing,
completion-only masking, checkpoints, logging) is SFTTrainer's own.
"""

import dataclasses
import inspect
import logging
import os
import textwrap

import torch
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints
from trl import SFTTrainer

from ..export.records import save_training_record
from ..losses.cost_embedding import load_cost_embedding
from ..losses.fused import fused_head_unsupported_reason, fused_linear_emo_loss
from ..losses.reference import emo_loss
from ..utils.quantization import disable_cpu_4bit_repacking
from .callbacks import CalibrationGuard, NonFiniteGuard, StopController
from .checkpointing import (
    assert_finite_weights,
    begin_checkpoint,
    cost_identity_before_training,
    finish_checkpoint,
    latest_complete_checkpoint,
    restore_emo_state,
    save_emo_state,
)
from .config import EMOConfig
from .validation import validate_prepared_trainer, validate_trainer_inputs


logger = logging.getLogger(__name__)

__all__ = ["EMOTrainer"]

# Metrics logged next to the loss; each is a mean over the valid target tokens of the logging window.
_TOKEN_METRICS = {
    "mle": "mle",
    "emo": "emo",
    "emo_ratio": "ratio",
    "entropy": "entropy",
    "mean_token_accuracy": "accuracy",
}


class EMOTrainer(SFTTrainer):
    """Supervised fine-tuning with the EMO loss (Earth Mover Distance Optimization; Ren, Wu, Zhu, ICLR 2024).

    Takes exactly the arguments of [`~trl.SFTTrainer`]; `args` is an [`EMOConfig`] (a plain `SFTConfig` or
    `TrainingArguments` is converted, keeping the EMO defaults). The EMO cost embedding is fixed here, before the
    first step, from `args.emo_cost_embedding`.

    Example:

    ```python
    from peft import LoraConfig
    from emo_calibrate import EMOConfig, EMOTrainer

    trainer = EMOTrainer(
        model="path/or/id",
        args=EMOConfig(output_dir="emo-out", learning_rate=2e-5),
        train_dataset=dataset,  # a "text" column
        peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    trainer.train()
    ```
    """

    _tag_names = ["trl", "sft", "emo", "emo-calibrate"]
    _name = "EMO"
    _paper = {
        "title": "EMO: Earth Mover Distance Optimization for Auto-Regressive Language Modeling",
        "id": "2310.04691",
        # docstyle-ignore
        "citation": textwrap.dedent("""\
            @inproceedings{ren2024emo,
                title        = {{EMO: Earth Mover Distance Optimization for Auto-Regressive Language Modeling}},
                author       = {Siyu Ren and Zhiyong Wu and Kenny Q. Zhu},
                year         = 2024,
                booktitle    = {The Twelfth International Conference on Learning Representations, {ICLR} 2024},
            }"""),
    }
    # compute_loss returns sum / num_items_in_batch, already correct under gradient accumulation: the Trainer must not
    # divide it again by the number of accumulation steps.
    loss_is_scaled_for_ga = True

    def __init__(self, model, args=None, *pargs, **kwargs):
        args = _as_emo_config(model, args)
        # Bad input fails here, with one clear message, before the model is loaded (see validation.py).
        kwargs = validate_trainer_inputs(model, args, pargs, kwargs)
        super().__init__(model, args, *pargs, **kwargs)
        # bitsandbytes' CPU fast path breaks gradients and merges after any eval forward (see utils/quantization.py).
        disable_cpu_4bit_repacking(self.model)
        # DeepSpeed ZeRO-3 partitions every parameter, the head too: outside the model's own forward its weight is an
        # empty placeholder. The cost embedding is then a copy gathered once, and the loss takes the reference path
        # (the model's forward gathers the head for the logits).
        self._zero3 = is_deepspeed_zero3_enabled()
        self._check_vocabulary()
        self._emo_cost = self._resolve_cost_embedding()
        # Fixed now, before accelerate / FSDP wraps the head: checkpoints store it without any collective.
        self._cost_identity = cost_identity_before_training(self)
        self._fused_reason = self._fused_head_check()
        self._fused_verified = False
        # Reliability: tokenized data and disk space are checked before the first step; NaN/inf updates are skipped;
        # SIGTERM / Ctrl-C stop with a checkpoint.
        validate_prepared_trainer(self)
        self._stop = StopController()
        self._nonfinite_guard = NonFiniteGuard(self, self._stop, self.args.emo_max_nonfinite_steps)
        self.add_callback(self._stop)
        self.add_callback(self._nonfinite_guard)
        # Calibration guard (callbacks.py): with an eval set, held-out perplexity is compared with the starting model's.
        if self.eval_dataset is not None and self.args.eval_strategy != "no" and self.args.emo_guard_max_ppl_ratio:
            self.args.eval_on_start = True
            self.add_callback(CalibrationGuard(self.args.emo_guard_max_ppl_ratio, stop=self.args.emo_guard_stop))

    # ---- set-up -------------------------------------------------------------------------------------------------

    def _output_weight(self, model=None) -> torch.Tensor:
        model = self.accelerator.unwrap_model(model if model is not None else self.model)
        weight = model.get_output_embeddings().weight
        # FSDP2 shards parameters as DTensors; the head is used whole.
        return weight.full_tensor() if hasattr(weight, "full_tensor") else weight

    def _gathered_output_weight(self) -> torch.Tensor:
        """A (V, d) copy of the head gathered from its ZeRO-3 partitions (a collective: every process calls it)."""
        import deepspeed

        weight = self.accelerator.unwrap_model(self.model).get_output_embeddings().weight
        with deepspeed.zero.GatheredParameters([weight], modifier_rank=None):
            return weight.detach().clone()

    def _check_vocabulary(self):
        weight = self._output_weight()
        rows = getattr(weight, "ds_shape", weight.shape)[0]  # ZeRO-3 keeps the full shape in ds_shape
        tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
        if tokenizer is not None and len(tokenizer) > rows:
            raise ValueError(
                f"The tokenizer has {len(tokenizer)} tokens but the model's output embedding has only {rows} rows, so "
                "some targets have no logit and no EMO cost. Use the tokenizer that belongs to the model, or call "
                "model.resize_token_embeddings(len(tokenizer)) before creating the trainer."
            )

    def _resolve_cost_embedding(self) -> torch.Tensor | None:
        """The cost embedding, or None when it is the live output embedding itself (read in place, detached)."""
        source = self.args.emo_cost_embedding
        weight = self._output_weight()
        if self._zero3 and source == "adaptive":
            raise ValueError(
                "emo_cost_embedding='adaptive' reads the live head at every step, but DeepSpeed ZeRO-3 partitions it "
                "across processes. Use 'frozen' (the default) or a file, or shard with ZeRO-2 or FSDP instead."
            )
        if self._zero3 and source == "frozen":
            cost = self._gathered_output_weight()
        elif source == "adaptive":
            cost = None
        elif source == "frozen":
            # A frozen head (LoRA, QLoRA) never changes, so it is read in place: no V x d copy. A trained head is
            # copied once, now, before the first update.
            cost = weight.detach().clone() if weight.requires_grad else None
        else:
            rows = getattr(weight, "ds_shape", weight.shape)[0]
            cost = load_cost_embedding(source, vocab_size=rows).to(weight.device)
        logger.info(
            "EMO: weighting=%s, cost embedding=%s%s",
            self.args.emo_weighting,
            source,
            " (the frozen output embedding, read in place)" if cost is None and source == "frozen" else "",
        )
        return cost

    def _fused_head_check(self) -> str | None:
        if not self.args.emo_fused_head:
            return "emo_fused_head=False"
        if self._zero3:
            reason = "DeepSpeed ZeRO-3 partitions the head weight that the fused head reads outside the forward"
            logger.warning("EMO: using the reference full-logits loss because %s.", reason)
            return reason
        base = self.accelerator.unwrap_model(self.model)
        base = base.get_base_model() if hasattr(base, "get_base_model") else base
        reason = fused_head_unsupported_reason(base)
        if reason is None and "logits_to_keep" not in inspect.signature(type(base).forward).parameters:
            reason = f"{type(base).__name__}.forward has no `logits_to_keep` argument"
        if reason is not None:
            logger.warning("EMO: using the reference full-logits loss because %s.", reason)
        return reason

    # ---- the loss -----------------------------------------------------------------------------------------------

    def _loss_options(self) -> dict:
        return dict(
            weighting=self.args.emo_weighting,
            ratio_clamp=self.args.emo_ratio_clamp,
            subtract_target_mass=self.args.emo_subtract_target_mass,
        )

    def _fused_loss(self, model, model_inputs, labels, num_items_in_batch):
        # Going through the (possibly DDP-wrapped, PEFT-wrapped) model keeps hooks and adapters active; only the last
        # position's logits are projected (logits_to_keep=1), the rest of the head is ours, chunk by chunk.
        outputs = model(**model_inputs, output_hidden_states=True, logits_to_keep=1)
        hidden = outputs.hidden_states[-1]
        weight = self._output_weight(model)
        if not self._fused_verified:
            self._verify_last_hidden_state(hidden, weight, outputs.logits)
        hidden = hidden[:, :-1].to(weight.device)
        targets = labels[:, 1:].to(weight.device)
        mask = targets != -100
        result = fused_linear_emo_loss(
            hidden[mask],
            weight,
            targets[mask],
            cost_embedding=self._emo_cost,
            num_items_in_batch=num_items_in_batch,
            chunk_size=self.args.emo_chunk_size,
            **self._loss_options(),
        )
        return result, outputs

    @torch.no_grad()
    def _verify_last_hidden_state(self, hidden, weight, last_logits):
        """Check once that `hidden_states[-1]` is what the head projects (final norm applied) for this model."""
        expected = last_logits[:, -1].float()
        got = (hidden[:, -1].to(weight.dtype) @ weight.t()).float()
        tolerance = 1e-3 if weight.dtype == torch.float32 else 5e-2
        if not torch.allclose(got, expected, atol=tolerance * max(1.0, expected.abs().max().item()), rtol=0):
            raise RuntimeError(
                "EMO fused head: the model's last hidden state does not reproduce its logits, so the fused loss would "
                "be wrong for this architecture. Set emo_fused_head=False to use the reference full-logits loss."
            )
        self._fused_verified = True

    def _reference_loss(self, model, model_inputs, labels, num_items_in_batch):
        outputs = model(**model_inputs)
        cost = self._emo_cost if self._emo_cost is not None else self._output_weight(model).detach()
        result = emo_loss(outputs.logits, labels, cost, num_items_in_batch=num_items_in_batch, **self._loss_options())
        return result, outputs

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        inputs["use_cache"] = False
        if self.aux_loss_enabled:
            inputs["output_router_logits"] = True
        labels = inputs["labels"]
        # No labels to the model: it would compute its own cross-entropy over the full logits on top of ours.
        model_inputs = {k: v for k, v in inputs.items() if k != "labels"}

        # Callers that want the logits (compute_metrics) get them from the reference path.
        if self._fused_reason is None and not return_outputs:
            result, outputs = self._fused_loss(model, model_inputs, labels, num_items_in_batch)
        else:
            result, outputs = self._reference_loss(model, model_inputs, labels, num_items_in_batch)
        loss = result.loss

        # As SFTTrainer: num_items_in_batch counts the tokens of every rank while DDP averages gradients over ranks.
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        if self.aux_loss_enabled and getattr(outputs, "aux_loss", None) is not None:
            steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss / steps
            self._metrics[mode]["aux_loss"].append(
                self.accelerator.gather_for_metrics(outputs.aux_loss.detach()).mean().item()
            )

        self._log_token_metrics(mode, result, inputs)
        return (loss, outputs) if return_outputs else loss

    def _log_token_metrics(self, mode, result, inputs):
        # One gather for all metrics: token-weighted sums, so that means over ranks and micro-batches stay exact.
        count = result.num_tokens.float()
        sums = torch.stack([count] + [getattr(result, field).float() * count for field in _TOKEN_METRICS.values()])
        sums = self.accelerator.gather_for_metrics(sums[None]).reshape(-1, sums.numel()).sum(0)
        for (name, _), value in zip(_TOKEN_METRICS.items(), sums[1:]):
            self._metrics[mode][name].append((value / sums[0]).item() if sums[0] > 0 else 0.0)
        if mode == "train":
            if "attention_mask" in inputs:
                local = inputs["attention_mask"].sum()
            else:  # padding-free batches carry position_ids instead of an attention mask
                local = torch.tensor(inputs["position_ids"].size(1), device=inputs["position_ids"].device)
            self._total_train_tokens += self.accelerator.gather_for_metrics(local).sum().item() // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]

    # ---- reliability: exact resume, a checkpoint on SIGTERM / Ctrl-C, never a NaN update nor a NaN save ----

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        # What the Trainer's checkpoint lacks (the pre-training cost embedding, counters) is restored first.
        resume_from_checkpoint = restore_emo_state(self, resume_from_checkpoint)
        with self._stop.catch_signals():
            output = super().train(resume_from_checkpoint, *args, **kwargs)
        # A stopped run must not look finished to the caller.
        self._stop.raise_if_stopped(self.state, last_complete=latest_complete_checkpoint(self.args.output_dir)[0])
        return output

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._nonfinite_guard.observe_loss(loss)
        return loss

    def save_model(self, output_dir=None, _internal_call=False):
        assert_finite_weights(self.model)
        super().save_model(output_dir, _internal_call)
        # The training record next to the adapter (JSON: EMO settings, the base, how and where it was quantised, hashes
        # of its 4-bit codes): `emo-calibrate merge` merges into exactly this base (export/records.py).
        if self.args.should_save:
            model = self.accelerator.unwrap_model(self.model)
            save_training_record(model, output_dir or self.args.output_dir, self.args, self.state)

    def _save_checkpoint(self, model, trial):
        # Whole or absent: the folder is marked incomplete first and complete last, once every process has written
        # its files; older checkpoints are rotated away only then, so a kill mid-write always leaves a complete one.
        run_dir = self._get_output_dir(trial=trial)
        folder = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        if self.args.should_save:
            begin_checkpoint(folder)
        limit, self.args.save_total_limit = self.args.save_total_limit, None
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        save_emo_state(self, folder)
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            finish_checkpoint(folder, self.state.global_step)
            rotate_checkpoints(run_dir, limit, self.state.best_model_checkpoint, use_mtime=True)
        self.accelerator.wait_for_everyone()  # no process moves on (or exits) before the checkpoint is complete


def _as_emo_config(model, args) -> EMOConfig:
    if args is None:
        name = model if isinstance(model, str) else model.config._name_or_path
        return EMOConfig(output_dir=f"{str(name).rstrip('/').split('/')[-1]}-EMO")
    if isinstance(args, EMOConfig):
        return args
    # A plain SFTConfig / TrainingArguments: keep every field it sets, add the EMO defaults.
    # (not `to_dict()`: it masks token fields with placeholders)
    values = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(args)
        if f.init and f.name in EMOConfig.__dataclass_fields__
    }
    return EMOConfig(**values)
