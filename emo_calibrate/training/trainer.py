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
from trl.models.utils import _ForwardRedirection

from ..export.records import save_training_record
from ..losses.cost_embedding import load_cost_embedding
from ..losses.fused import fused_linear_emo_loss
from ..losses.output_head import fused_head_unsupported_reason, output_logit_transform
from ..losses.reference import EMOLossOutput, emo_loss
from ..utils.quantization import disable_cpu_4bit_repacking
from .callbacks import NonFiniteGuard, StopController
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
from .loss_head import decoder_backbone, first_row, head_weight, reference_memory_note, router_aux_loss
from .perplexity_budget import prepare_perplexity_budget
from .validation import (
    SHIFT_LABELS_ERROR,
    trainer_arguments_by_name,
    validate_prepared_trainer,
    validate_trainer_inputs,
)


logger = logging.getLogger(__name__)

__all__ = ["EMOTrainer"]

# Metrics logged next to the loss; each is a mean over the valid target tokens of the logging window.
_TOKEN_METRICS = {
    "mle": "mle",
    "emo": "emo",
    "emd": "emd",
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
    # compute_loss returns sum / num_items_in_batch when the Trainer counted the target tokens of the accumulation
    # window (it always does for EMOTrainer, see __init__), else a per-batch mean: the Trainer's own rule (None) then
    # divides by the accumulation steps exactly when the loss was not normalized by that count.
    loss_is_scaled_for_ga = None

    def __init__(self, model, args=None, *pargs, **kwargs):
        args = _as_emo_config(model, args)
        # Bad input fails here, with one clear message, before the model is loaded (see validation.py).
        kwargs = validate_trainer_inputs(model, args, trainer_arguments_by_name(model, args, pargs, kwargs))
        # The perplexity budget: its held-out split (the user's, else held out of the training documents here, before
        # tokenization) and its evaluation schedule. The arguments come back by name.
        kwargs, self.perplexity_budget = prepare_perplexity_budget(args, kwargs)
        super().__init__(model, args, **kwargs)
        # The Trainer counts the target tokens of each accumulation window (num_items_in_batch) only when the model's
        # forward accepts loss kwargs, because it then passes the count to the model. The EMO loss is ours, not the
        # model's: the tokens are counted for every model (many *ForConditionalGeneration classes say False), so the
        # loss is sum / tokens of the window and gradient accumulation is exact. In transformers 5.24 the attribute
        # otherwise only decides what Trainer.compute_loss (overridden here) passes to the model, and the rule of
        # `loss_is_scaled_for_ga = None` above.
        self.model_accepts_loss_kwargs = True
        # bitsandbytes' CPU fast path breaks gradients and merges after any eval forward (see utils/quantization.py).
        disable_cpu_4bit_repacking(self.model)
        # DeepSpeed ZeRO-3 partitions every parameter, the head too: outside its module's forward the weight is an
        # empty placeholder. The fused head gathers it for the step (inside the model's forward), and a frozen cost
        # embedding is a copy gathered once.
        self._zero3 = is_deepspeed_zero3_enabled()
        self._check_vocabulary()
        self._emo_cost = self._resolve_cost_embedding()
        # Fixed now, before accelerate / FSDP wraps the head: checkpoints store it without any collective.
        self._cost_identity = cost_identity_before_training(self)
        self._logit_scale, self._logit_softcap = output_logit_transform(self.accelerator.unwrap_model(self.model))
        self._fused_reason = self._fused_head_check()
        self._fused_verified = False
        self._reference_noted = set()
        self._token_sums = {}
        # The fused loss calls the decoder backbone inside the wrapper's forward, so DDP/FSDP/DeepSpeed hooks fire.
        self._forward_redirection = _ForwardRedirection()
        # Reliability: tokenized data and disk space are checked before the first step; NaN/inf updates are skipped;
        # SIGTERM / Ctrl-C stop with a checkpoint.
        validate_prepared_trainer(self)
        self._stop = StopController()
        self._nonfinite_guard = NonFiniteGuard(self, self._stop, self.args.emo_max_nonfinite_steps)
        self.add_callback(self._stop)
        self.add_callback(self._nonfinite_guard)
        if self.perplexity_budget.active:
            self.add_callback(self.perplexity_budget)

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
        """Why the loss cannot take the fused path (said once, with its memory, at the first step), or None."""
        if not self.args.emo_fused_head:
            return "emo_fused_head=False"
        causal_lm, backbone = decoder_backbone(self.accelerator.unwrap_model(self.model))
        reason = fused_head_unsupported_reason(causal_lm)
        if reason is None and backbone is None:
            reason = f"{type(causal_lm).__name__} has no separate decoder backbone (`base_model` is the model itself)"
        return reason

    # ---- the loss -----------------------------------------------------------------------------------------------

    def _loss_options(self) -> dict:
        return dict(
            weighting=self.args.emo_weighting,
            ratio_clamp=self.args.emo_ratio_clamp,
            subtract_target_mass=self.args.emo_subtract_target_mass,
        )

    def _fused_loss(self, unwrapped, model_inputs, labels, num_items_in_batch):
        """The fused EMO loss; runs as the wrapped model's forward (`_forward_redirection`), so DDP/FSDP/ZeRO-3
        hooks fire. Only the LAST hidden state is asked for, in the training dtype: the backbone runs under the
        Trainer's autocast (the redirection bypasses accelerate's forward wrapper, which would also upcast every
        output to fp32), and the head's GEMMs run in the autocast dtype. Returns a tuple of tensors (what DDP
        expects from a forward): the fields of `EMOLossOutput`, then the MoE load-balancing loss or None."""
        causal_lm, backbone = decoder_backbone(unwrapped)
        with self.accelerator.autocast():
            outputs = backbone(**model_inputs)
            hidden, targets = outputs.last_hidden_state[:, :-1], labels[:, 1:]
            with head_weight(causal_lm, self._zero3) as weight:
                hidden, targets = hidden.to(weight.device), targets.to(weight.device)
                mask = targets != -100
                result = fused_linear_emo_loss(
                    hidden[mask],
                    weight,
                    targets[mask],
                    cost_embedding=self._emo_cost,
                    num_items_in_batch=num_items_in_batch,
                    chunk_size=self.args.emo_chunk_size,
                    logit_scale=self._logit_scale,
                    logit_softcap=self._logit_softcap,
                    **self._loss_options(),
                )
        aux_loss = router_aux_loss(causal_lm, outputs, model_inputs.get("attention_mask"))
        return (*(getattr(result, f.name) for f in dataclasses.fields(result)), aux_loss)

    def _fused_last_logits(self, unwrapped, row):
        """The fused head's logits at the last position of `row`, (1, V) fp32; runs as the wrapped model's forward."""
        causal_lm, backbone = decoder_backbone(unwrapped)
        with self.accelerator.autocast():
            hidden = backbone(**row).last_hidden_state[:, -1]
        with head_weight(causal_lm, self._zero3) as weight:
            logits = torch.mm(hidden.to(weight.device, weight.dtype), weight.t()).float() * self._logit_scale
        if self._logit_softcap is not None:
            logits = self._logit_softcap * torch.tanh(logits / self._logit_softcap)
        return logits

    @torch.no_grad()
    def _verify_fused_head(self, model, model_inputs) -> bool:
        """Once, on the first example of the first batch: the fused logits (the backbone's last hidden state through
        the head and its soft cap / scale) reproduce the model's own at the last position. A model whose forward
        does more (an unknown logit transform, a final norm outside the backbone) falls back to the reference.

        Both forwards run in eval mode: in training mode dropout (LoRA's `lora_dropout` once the adapters are no
        longer zero, as on a resume, or a model's own attention / hidden dropout) draws different masks for the two
        and would fail the check for nothing; eval mode also leaves the RNG stream of training untouched."""
        row = first_row(model_inputs)
        causal_lm, _ = decoder_backbone(self.accelerator.unwrap_model(model))
        keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(causal_lm.forward).parameters else {}
        unwrapped = self.accelerator.unwrap_model(model)
        was_training = model.training
        model.eval()
        try:
            expected = model(**row, **keep).logits[:, -1].float()
            got = self._forward_redirection(model, unwrapped, self._fused_last_logits, unwrapped, row)
        finally:
            model.train(was_training)
        got = got.to(expected.device)
        low_precision = got.dtype != torch.float32 or self.args.bf16 or self.args.fp16
        scale = max(1.0, expected.abs().max().item())
        difference = (got - expected).abs().max().item()
        if not difference <= (5e-2 if low_precision else 1e-3) * scale:
            self._fused_reason = (
                f"the decoder backbone's last hidden state, projected by the output embedding (logit scale "
                f"{self._logit_scale}, soft cap {self._logit_softcap}), does not reproduce the model's logits (max "
                f"difference {difference:.3g} for logits up to {scale:.3g}): its forward does more than that"
            )
            return False
        self._fused_verified = True
        return True

    def _reference_loss(self, model, model_inputs, labels, num_items_in_batch, reason):
        self._note_reference_path(reason, labels)
        outputs = model(**model_inputs)
        cost = self._emo_cost if self._emo_cost is not None else self._output_weight(model).detach()
        result = emo_loss(outputs.logits, labels, cost, num_items_in_batch=num_items_in_batch, **self._loss_options())
        return result, outputs

    def _note_reference_path(self, reason, labels):
        """Say once per reason that the loss takes the full-logits path, and what it costs at this batch."""
        if reason in self._reference_noted:
            return
        self._reference_noted.add(reason)
        rows = getattr(self._output_weight(), "ds_shape", self._output_weight().shape)[0]
        chosen = reason in ("emo_fused_head=False", "compute_metrics needs the full logits")
        (logger.info if chosen else logger.warning)(
            "EMO: the loss takes the reference full-logits path because %s. It holds %s.",
            reason,
            reference_memory_note(labels, rows),
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        if "shift_labels" in inputs:  # context / sequence parallelism, refused before the model loads as well
            raise ValueError(SHIFT_LABELS_ERROR)
        inputs["use_cache"] = False
        if self.aux_loss_enabled:
            inputs["output_router_logits"] = True
        labels = inputs["labels"]
        # No labels to the model: it would compute its own cross-entropy over the full logits on top of ours.
        model_inputs = {k: v for k, v in inputs.items() if k != "labels"}

        fused = self._fused_reason is None and not return_outputs
        if fused and not self._fused_verified:
            fused = self._verify_fused_head(model, model_inputs)
        if fused:
            unwrapped = self.accelerator.unwrap_model(model)
            *fields, aux_loss = self._forward_redirection(
                model, unwrapped, self._fused_loss, unwrapped, model_inputs, labels, num_items_in_batch
            )
            result = EMOLossOutput(*fields)
        else:
            # Callers that want the logits (compute_metrics) get them from the reference path.
            reason = self._fused_reason or "compute_metrics needs the full logits"
            result, outputs = self._reference_loss(model, model_inputs, labels, num_items_in_batch, reason)
            aux_loss = getattr(outputs, "aux_loss", None)
        loss = result.loss

        # As SFTTrainer: num_items_in_batch counts the tokens of every rank while DDP averages gradients over ranks.
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        if self.aux_loss_enabled and aux_loss is not None:
            steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
            loss = loss + self.router_aux_loss_coef * aux_loss / steps
            self._metrics[mode]["aux_loss"].append(
                self.accelerator.gather_for_metrics(aux_loss.detach()).mean().item()
            )

        self._log_token_metrics(mode, result, inputs)
        return (loss, outputs) if return_outputs else loss

    def _log_token_metrics(self, mode, result, inputs):
        # Token-weighted sums, gathered over ranks and accumulated over micro-batches until the next log: the logged
        # means are exact means over the tokens of the logging window, whatever the batch / accumulation split.
        count = result.num_tokens.float()
        sums = torch.stack([count] + [getattr(result, field).float() * count for field in _TOKEN_METRICS.values()])
        sums = self.accelerator.gather_for_metrics(sums[None]).reshape(-1, sums.numel()).sum(0).tolist()
        totals = self._token_sums.setdefault(mode, [0.0] * len(sums))
        self._token_sums[mode] = [a + b for a, b in zip(totals, sums)]
        if mode == "train":
            if "attention_mask" in inputs:
                local = inputs["attention_mask"].sum()
            else:  # padding-free batches carry position_ids instead of an attention mask
                local = torch.tensor(inputs["position_ids"].size(1), device=inputs["position_ids"].device)
            self._total_train_tokens += self.accelerator.gather_for_metrics(local).sum().item() // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]

    def log(self, logs, start_time=None):
        mode = "train" if self.model.training else "eval"
        sums = self._token_sums.pop(mode, None)
        if sums is not None:
            for name, value in zip(_TOKEN_METRICS, sums[1:]):
                self._metrics[mode][name] = [value / sums[0] if sums[0] > 0 else 0.0]
        super().log(logs, start_time)

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
            save_training_record(
                model, output_dir or self.args.output_dir, self.args, self.state, self.perplexity_budget.record()
            )

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
