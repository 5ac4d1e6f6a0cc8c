"""One measured training run of the GPU proof: TRL's `SFTTrainer` (MLE) or `EMOTrainer` on a bare (4-bit) model.

Both trainers get the same arguments, the same LoRA configuration and the same batches; only the loss differs. The
adapters are taken out again afterwards, so the next run starts from the same bare model.
"""

import os
import statistics
import time
import traceback


__all__ = ["run_one", "step_timer"]


def step_timer(device: str):
    """A `TrainerCallback` recording the wall time of every optimizer step (forward, backward, optimizer), with the
    GPU synchronised at both ends so that queued kernels are counted in their own step."""
    import torch
    from transformers import TrainerCallback

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times = []
            self._t0 = None

        def on_step_begin(self, args, state, control, **kwargs):
            sync()
            self._t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            sync()
            self.times.append(time.perf_counter() - self._t0)

    return StepTimer()


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
    return EMOConfig(**values, emo_chunk_size=args.emo_chunk_size)


def run_one(kind, model, tokenizer, dataset, batch_size, args, device, dtype, log) -> dict:
    """Train `warmup + steps` steps of `kind` ("mle" or "emo") and measure them.

    Returns:
        `dict`: status ("ok", "OOM", "error: ..."), the step times and their median after the warm-up, tokens/s, the
        first and last logged metrics and, on CUDA, the peak allocated / reserved memory of the whole run (weights,
        adapters, optimizer states, activations) and whether it fits 24 / 40 / 80 GB.
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
    timer = step_timer(device)
    trainer = None
    free_memory()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        record["start_allocated_gib"] = torch.cuda.memory_allocated() / 2**30
    try:
        trainer = (SFTTrainer if kind == "mle" else EMOTrainer)(
            model, args=config, train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config,
            callbacks=[timer],
        )  # fmt: skip
        if kind == "emo":
            reason = getattr(trainer, "_fused_reason", "unknown")
            record["emo_fused_head"], record["emo_fallback_reason"] = reason is None, reason
        trainer.train()
        record["step_times_s"] = timer.times
        record["median_step_s"] = statistics.median(timer.times[args.warmup :])
        record["tokens_per_s"] = batch_size * args.seq_len / record["median_step_s"]
        logs = [h for h in trainer.state.log_history if "loss" in h]
        record["first_log"], record["last_log"] = (logs[0], logs[-1]) if logs else (None, None)
        finite = bool(logs) and all(torch.isfinite(torch.tensor(float(h["loss"]))) for h in logs)
        if len(timer.times) != config.max_steps:
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
    if device == "cuda":
        record["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        record["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
        record["fits"] = fits(record["peak_reserved_gib"]) if record["status"] == "ok" else None
    wrapped = trainer.model if trainer is not None else None
    del trainer
    if wrapped is not None and hasattr(wrapped, "unload"):
        wrapped.unload()  # LoRA layers out, the bare base model back in place
    del wrapped
    free_memory()
    return record
