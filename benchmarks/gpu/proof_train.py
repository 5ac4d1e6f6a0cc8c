"""One measured training run of the GPU proof: TRL's `SFTTrainer` (MLE) or `EMOTrainer` on a bare (4-bit) model.

Both trainers get the same arguments, the same LoRA configuration and the same batches; only the loss differs. The
adapters are taken out again afterwards, so the next run starts from the same bare model.

Memory, on CUDA, per run (the peak counters are reset before each run and the allocator's cache emptied):

- `resident_gib`: allocated when the first step begins: the 4-bit weights, the LoRA adapters and what the trainer
  built before training. `peak_above_resident_gib` is the peak minus that: activations, the loss head, gradients and
  optimizer state, i.e. what the training step itself costs.
- `peak_allocated_gib` / `peak_reserved_gib`: the whole run's peaks (live tensors / the caching allocator's footprint).
- `start_allocated_gib` / `end_allocated_gib`: before the trainer is built and after it is taken apart, so that a run
  that inherits memory from the one before shows it.
- `emo_workspace_gib` (EMO runs): the fused head's two fp32 (chunk, V) buffers at this shape, part of EMO's peak.
"""

import os
import statistics
import time
import traceback


__all__ = ["emo_head_record", "emo_workspace_bytes", "run_one", "step_callback"]

GIB = 2**30


def _allocated(device: str) -> float | None:
    import torch

    return torch.cuda.memory_allocated() / GIB if device == "cuda" else None


def step_callback(device: str, stop_now=None):
    """A `TrainerCallback` recording the wall time of every optimizer step (forward, backward, optimizer), with the
    GPU synchronised at both ends so that queued kernels are counted in their own step, and the memory allocated
    when the first step begins. `stop_now()` returning True stops training at the end of the current step."""
    import torch
    from transformers import TrainerCallback

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.resident_gib, self.stopped = [], None, False
            self._t0 = None

        def on_step_begin(self, args, state, control, **kwargs):
            sync()
            if not self.times and self._t0 is None:
                self.resident_gib = _allocated(device)
            self._t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            sync()
            self.times.append(time.perf_counter() - self._t0)
            if stop_now is not None and stop_now() and state.global_step < state.max_steps:
                control.should_training_stop = self.stopped = True

    return StepTimer()


def emo_workspace_bytes(num_tokens: int, vocab_size: int, hidden_bytes: int, device: str, chunk_size=None) -> int:
    """Bytes of the fused EMO head's two fp32 (chunk, V) buffers, with the chunk `EMOTrainer` uses at this shape."""
    from emo_calibrate.losses.fused import FP32_BUFFERS_PER_TOKEN, auto_chunk_size

    chunk = chunk_size or auto_chunk_size(num_tokens, vocab_size, hidden_bytes, device)
    return FP32_BUFFERS_PER_TOKEN * 4 * min(chunk, num_tokens) * vocab_size


def emo_head_record(trainer) -> dict:
    """Which loss head an `EMOTrainer` actually ran, read after training: the check at step 1
    (`_verify_fused_head`) can switch a run to the full-logits reference path, so the state before `train()` says
    nothing. `emo_fused_head` is True (fused head, verified), False (reference path) or None (no step ran)."""
    reason = getattr(trainer, "_fused_reason", "EMOTrainer has no _fused_reason attribute")
    if reason is not None:
        return {"emo_fused_head": False, "emo_fallback_reason": reason}
    if getattr(trainer, "_fused_verified", False):
        return {"emo_fused_head": True, "emo_fallback_reason": None}
    return {"emo_fused_head": None, "emo_fallback_reason": "no training step ran: the head was never checked"}


def _training_arguments(kind: str, batch_size: int, args, device: str, dtype):
    import torch
    from trl import SFTConfig

    from emo_calibrate import EMOConfig

    values = dict(
        output_dir=os.path.join(args.work_dir, f"run-{kind}"),
        max_steps=args.warmup + args.steps,
        per_device_train_batch_size=batch_size,
        learning_rate=1e-4,
        lr_scheduler_type="constant",
        logging_steps=1,
        max_length=args.seq_len,
        report_to="none",
        save_strategy="no",
        activation_checkpointing=True,
        bf16=dtype == torch.bfloat16,
        use_cpu=device == "cpu",
        dataset_kwargs={"skip_prepare_dataset": True},  # the dataset is already token ids of exactly seq_len
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
        data_seed=0,
    )
    if kind == "mle":
        return SFTConfig(**values)
    # no perplexity budget: the EMO run must train exactly like its SFTTrainer twin (no hold-out, no evaluations)
    return EMOConfig(**values, emo_chunk_size=args.emo_chunk_size, emo_guard_max_ppl_ratio=None)


def run_one(kind, model, tokenizer, dataset, batch_size, args, device, dtype, log, stop_now=None) -> dict:
    """Train `warmup + steps` steps of `kind` ("mle" or "emo") and measure them.

    Returns:
        `dict`: status ("ok", "OOM", "stopped (time)", "bad: ...", "error: ..."), the step times and their median
        after the warm-up, tokens/s, the first and last logged metrics, for EMO the head that actually ran and its
        workspace, and on CUDA the memory figures of the module docstring and whether the run fits 24 / 40 / 80 GB.
        An EMO run that fell back to the full-logits head is "bad": it measured something else than EMOTrainer's.
    """
    import torch
    from peft import LoraConfig
    from proof_report import fits
    from proof_setup import free_memory
    from trl import SFTTrainer

    from emo_calibrate import EMOTrainer

    record = {"trainer": kind, "batch_size": batch_size, "seq_len": args.seq_len, "status": "running"}
    if any("lora_" in name for name, _ in model.named_parameters()):
        record["status"] = "skipped: an earlier failed run left adapters in the model"
        return record
    config = _training_arguments(kind, batch_size, args, device, dtype)
    peft_config = LoraConfig(
        r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    if kind == "emo":
        tokens = batch_size * (args.seq_len - 1)  # every position but the first is a target
        hidden_bytes = tokens * model.config.hidden_size * torch.empty((), dtype=dtype).element_size()
        workspace = emo_workspace_bytes(tokens, model.config.vocab_size, hidden_bytes, device, args.emo_chunk_size)
        record["emo_workspace_gib"] = workspace / GIB
    timer = step_callback(device, stop_now)
    trainer = None
    free_memory()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        record["start_allocated_gib"] = torch.cuda.memory_allocated() / GIB
        record["start_reserved_gib"] = torch.cuda.memory_reserved() / GIB
    try:
        trainer = (SFTTrainer if kind == "mle" else EMOTrainer)(
            model, args=config, train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config,
            callbacks=[timer],
        )  # fmt: skip
        trainer.train()
        record["step_times_s"] = timer.times
        timed = timer.times[args.warmup :]
        record["median_step_s"] = statistics.median(timed) if timed else None
        record["tokens_per_s"] = batch_size * args.seq_len / record["median_step_s"] if timed else None
        logs = [h for h in trainer.state.log_history if "loss" in h]
        record["first_log"], record["last_log"] = (logs[0], logs[-1]) if logs else (None, None)
        finite = bool(logs) and all(torch.isfinite(torch.tensor(float(h["loss"]))) for h in logs)
        if timer.stopped:
            record["status"] = f"stopped (time): {len(timer.times)} of {config.max_steps} steps"
        elif len(timer.times) != config.max_steps:
            record["status"] = f"bad: {len(timer.times)} steps timed, {config.max_steps} expected"
        else:
            record["status"] = "ok" if finite else "bad: non-finite loss"
    except torch.cuda.OutOfMemoryError as error:
        record["status"] = "OOM"
        record["error"] = str(error).splitlines()[0]
    except Exception as error:  # noqa: BLE001 - record it, the other configurations still run
        record["status"] = f"error: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        record["traceback"] = traceback.format_exc()
        log(record["traceback"])
    if kind == "emo" and trainer is not None:
        record.update(emo_head_record(trainer))
        if record["emo_fused_head"] is False and not record["status"].startswith(("error", "bad")):
            ran = record["status"]
            record["status"] = f"bad: EMO ran the full-logits reference head, not the fused one (run: {ran})"
    if device == "cuda":
        record["resident_gib"] = timer.resident_gib
        record["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / GIB
        record["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / GIB
        if timer.resident_gib is not None:
            record["peak_above_resident_gib"] = record["peak_allocated_gib"] - timer.resident_gib
        record["fits"] = fits(record["peak_reserved_gib"]) if record["status"] == "ok" else None
    wrapped = trainer.model if trainer is not None else None
    del trainer
    if wrapped is not None and hasattr(wrapped, "unload"):
        wrapped.unload()  # LoRA layers out, the bare base model back in place
    del wrapped
    free_memory()
    if device == "cuda":
        record["end_allocated_gib"] = torch.cuda.memory_allocated() / GIB
    return record
