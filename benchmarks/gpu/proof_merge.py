"""The merge check of the GPU proof: train a QLoRA adapter with EMOTrainer, merge it, and compare the merged model
with the adapter model it came from.

The base is written to disk first (random weights, unquantised) and loaded in 4-bit from there, as a user's
checkpoint is. The merge is `emo_calibrate.export.merge.merge_adapter` (dequantised base, codes checked against the
adapter's record) when the package has it, else PEFT's `merge_and_unload` on the dequantised base
(`model.dequantize()`), so the check runs on any version of the package. On CUDA the base is then quantised again on
CPU and its codes compared with the record training wrote on CUDA (`cpu_codes_check`): the open CPU-vs-CUDA question
of docs/merge.md.

What "parity" means (`parity_figures`): on 2 x 64 random tokens, the next-token distributions of the adapter model
as trained (4-bit base + LoRA, in memory), of the merged model (loaded from disk) and of the base (adapter disabled)
are compared. With V = 128k and random weights every probability is about 1e-5 to 1e-3, so an element-wise softmax
tolerance such as 1e-2 cannot fail; each criterion below is measured against the adapter's own effect instead, so a
merge that leaves the adapter out, or puts in a wrong share of it, fails:

1. every logit is finite;
2. mean KL(adapter || merged) <= 1 % of mean KL(adapter || base), and the adapter's own KL is at least 1e-3 nats
   (else the check would be vacuous);
3. the merged model's top-1 token differs from the adapter model's at most half as often as the base's does;
4. max |logit difference| (adapter vs merged) < 0.25 x max |logit change| the adapter makes.
"""

import os
import time
import traceback

from proof_setup import (
    build_tokenizer,
    device_map,
    free_memory,
    nf4_config,
    random_token_dataset,
    save_random_model,
)


__all__ = ["merge_check"]

# The parity criteria (module docstring), each relative to the adapter's own effect.
KL_SHARE_MAX = 0.01  # mean KL(adapter || merged) / mean KL(adapter || base)
MIN_ADAPTER_KL = 1e-3  # nats: an adapter that moves the model less leaves nothing to check
TOP1_SHARE_MAX = 0.5  # top-1 disagreement with the adapter model: merged / base
LOGIT_SHARE_MAX = 0.25  # max |logit diff|: merged vs adapter / base vs adapter


def merge_check(shape: str, *, device: str, dtype, work_dir: str, args, log, save=None) -> dict:
    """Returns a dict with the method, the parity figures and `status` ("ok", "parity failed" or an error line).

    `save(result)` is called after each stage (so a proof stopped mid-check keeps what was measured); the parity is
    measured before the side question of the CPU-vs-CUDA codes.
    """
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    from emo_calibrate import EMOConfig, EMOTrainer

    save = save or (lambda result: None)

    result = {"model": shape, "status": "running", "seconds": {}}
    base_dir, adapter_dir, merged_dir = (os.path.join(work_dir, name) for name in ("base", "adapter", "merged"))
    try:
        t = time.perf_counter()
        result["seconds"]["save_base"] = save_random_model(shape, base_dir, device=device, dtype=dtype)
        log(f"merge: wrote the random {shape} base in {result['seconds']['save_base']:.1f}s")

        t = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(
            base_dir, quantization_config=nf4_config(dtype), dtype=dtype, device_map=device_map(device)
        )
        config = EMOConfig(
            output_dir=os.path.join(work_dir, "train"),
            max_steps=args.merge_steps,
            per_device_train_batch_size=2,
            learning_rate=1e-3,
            logging_steps=1,
            max_length=args.merge_seq_len,
            report_to="none",
            save_strategy="no",
            activation_checkpointing=True,
            bf16=device == "cuda",
            use_cpu=device == "cpu",
            dataset_kwargs={"skip_prepare_dataset": True},
            disable_tqdm=True,
            seed=0,
        )
        # init_lora_weights=False starts B non-zero, so the adapter changes the outputs clearly and parity means
        # something after only a few steps.
        peft_config = LoraConfig(
            r=args.lora_r, lora_alpha=2 * args.lora_r, target_modules="all-linear", lora_dropout=0.0,
            task_type="CAUSAL_LM", init_lora_weights=False,
        )  # fmt: skip
        dataset = random_token_dataset(8, args.merge_seq_len, model.config.vocab_size, seed=1)
        trainer = EMOTrainer(
            model, args=config, train_dataset=dataset, processing_class=build_tokenizer(), peft_config=peft_config
        )
        trainer.train()
        trainer.save_model(adapter_dir)
        result["seconds"]["train_adapter"] = time.perf_counter() - t
        log(f"merge: trained and saved the adapter in {result['seconds']['train_adapter']:.1f}s")

        t = time.perf_counter()
        result["method"], result["merge_report"] = _merge(adapter_dir, merged_dir, base_dir, device, dtype)
        result["seconds"]["merge"] = time.perf_counter() - t
        log(f"merge: {result['method']} in {result['seconds']['merge']:.1f}s")
        save(result)

        merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=dtype, device_map=device_map(device))
        ids = torch.randint(4, model.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(2))
        result["parity"] = parity(trainer.model, merged, ids.to(device))
        result["status"] = "ok" if result["parity"]["passed"] else "parity failed"
        save(result)
        if device == "cuda":  # a side question: its failure is recorded, the parity verdict stands
            t = time.perf_counter()
            try:
                result["nf4_codes_cpu_vs_cuda_record"] = cpu_codes_check(adapter_dir, base_dir)
            except Exception as error:  # noqa: BLE001
                result["nf4_codes_cpu_vs_cuda_record"] = {"status": f"error: {type(error).__name__}: {error}"}
            result["seconds"]["cpu_codes_check"] = time.perf_counter() - t
            log(f"merge: the base quantised on CPU vs the CUDA record: {result['nf4_codes_cpu_vs_cuda_record']}")
        del trainer, model, merged
    except Exception as error:  # noqa: BLE001 - record it, the rest of the proof goes on
        result["status"] = f"error: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        result["traceback"] = traceback.format_exc()
        log(result["traceback"])
    free_memory()
    return result


def _merge(adapter_dir, merged_dir, base_dir, device, dtype):
    import torch

    dtype_name = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}[dtype]
    try:
        from emo_calibrate.export.merge import merge_adapter
    except ImportError:
        merge_adapter = None
    if merge_adapter is not None:
        report = merge_adapter(
            adapter_dir, merged_dir, model_name_or_path=base_dir, dtype=dtype_name, device=device, overwrite=True
        )
        report = report.to_dict() if hasattr(report, "to_dict") else str(report)
        return "emo_calibrate.merge_adapter", report

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(
        base_dir, quantization_config=nf4_config(dtype), dtype=dtype, device_map=device_map(device)
    )
    base = base.dequantize()
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    merged.save_pretrained(merged_dir)
    build_tokenizer().save_pretrained(merged_dir)
    del base, merged
    free_memory()
    return "peft merge_and_unload on the dequantized base (emo_calibrate.export.merge not available)", None


def cpu_codes_check(adapter_dir, base_dir) -> dict:
    """The open question of docs/merge.md, asked through the merge's own check: quantise the base on CPU with the
    adapter's recorded settings and compare its 4-bit codes with the hashes training recorded on CUDA. A "mismatch"
    means a CUDA-trained QLoRA adapter must be merged with `--device cuda`."""
    try:
        import torch
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        from emo_calibrate.export.records import check_codes, read_training_record
    except ImportError as error:  # an older checkout without the training record
        return {"status": f"not available: {error}"}
    quantization = (read_training_record(adapter_dir) or {}).get("quantization")
    if not quantization or not quantization.get("block_sha256"):
        return {"status": "not available: the adapter records no hashes"}
    model = AutoModelForCausalLM.from_pretrained(
        base_dir,
        quantization_config=BitsAndBytesConfig.from_dict(quantization["config"]),
        dtype=getattr(torch, quantization["load_dtype"]),
        device_map={"": "cpu"},
    )
    check = check_codes(model, quantization)
    del model
    free_memory()
    return check


def parity(adapter_model, merged_model, input_ids) -> dict:
    """The next-token logits of the adapter model (4-bit base + LoRA), of its base (adapter disabled) and of the
    merged model on `input_ids`, compared by `parity_figures`."""
    import torch

    adapter_model.eval()
    merged_model.eval()
    with torch.no_grad():
        with_adapter = adapter_model(input_ids=input_ids).logits.float()
        with adapter_model.disable_adapter():
            base = adapter_model(input_ids=input_ids).logits.float()
        merged = merged_model(input_ids=input_ids).logits.float()
    return parity_figures(with_adapter, merged, base)


def parity_figures(with_adapter, merged, base) -> dict:
    """The merge's parity figures and verdict (`passed`) from three (..., V) logit tensors; see the module docstring.

    Args:
        with_adapter (`torch.Tensor`): logits of the adapter model as trained (the reference).
        merged (`torch.Tensor`): logits of the merged model.
        base (`torch.Tensor`): logits of the base model (the adapter disabled): the adapter's own effect is measured
            against it.
    """
    import torch

    with_adapter, merged, base = (x.float().reshape(-1, x.shape[-1]) for x in (with_adapter, merged, base))
    log_p = with_adapter.log_softmax(-1)

    def mean_kl(other):  # KL(adapter || other), per position, averaged
        return (log_p.exp() * (log_p - other.log_softmax(-1))).sum(-1).mean().item()

    top1 = with_adapter.argmax(-1)
    figures = {
        "mean_kl": mean_kl(merged),
        "adapter_kl": mean_kl(base),
        "top1_agreement": (top1 == merged.argmax(-1)).float().mean().item(),
        "adapter_top1_agreement": (top1 == base.argmax(-1)).float().mean().item(),
        "max_abs_logit_diff": (with_adapter - merged).abs().max().item(),
        "adapter_effect_logits": (with_adapter - base).abs().max().item(),
        # Shown, not judged: with a large vocabulary this is tiny whatever the merge did.
        "max_abs_prob_diff": (with_adapter.softmax(-1) - merged.softmax(-1)).abs().max().item(),
    }
    checks = {
        "finite": bool(torch.isfinite(with_adapter).all() and torch.isfinite(merged).all()),
        "adapter_moves_model": figures["adapter_kl"] >= MIN_ADAPTER_KL,
        "kl": figures["mean_kl"] <= KL_SHARE_MAX * figures["adapter_kl"],
        "top1": 1 - figures["top1_agreement"] <= TOP1_SHARE_MAX * (1 - figures["adapter_top1_agreement"]),
        "logits": figures["max_abs_logit_diff"] < LOGIT_SHARE_MAX * figures["adapter_effect_logits"],
    }
    figures["kl_share"] = figures["mean_kl"] / figures["adapter_kl"] if figures["adapter_kl"] > 0 else None
    figures["checks"] = checks
    figures["passed"] = all(checks.values())
    return figures
