"""The merge check of the GPU proof: train a QLoRA adapter with EMOTrainer, merge it, and compare the merged model
with the adapter model it came from.

The base is written to disk first (random weights, unquantised) and loaded in 4-bit from there, as a user's
checkpoint is. The merge is `emo_calibrate.export.merge.merge_adapter` (dequantised base, codes checked against the
adapter's record) when the package has it, else PEFT's `merge_and_unload` on the dequantised base
(`model.dequantize()`), so the check runs on any version of the package. On CUDA the base is then quantised again on
CPU and its codes compared with the record training wrote on CUDA (`cpu_codes_check`): the open CPU-vs-CUDA question
of docs/merge.md.
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

# The merged model must give the adapter model's next-token distribution (softmax) to within this, element-wise.
PROB_ATOL = 1e-2


def merge_check(shape: str, *, device: str, dtype, work_dir: str, args, log) -> dict:
    """Returns a dict with the method, the parity figures and `status` ("ok", "parity failed" or an error line)."""
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    from emo_calibrate import EMOConfig, EMOTrainer

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
        if device == "cuda":
            t = time.perf_counter()
            result["nf4_codes_cpu_vs_cuda_record"] = cpu_codes_check(adapter_dir, base_dir)
            result["seconds"]["cpu_codes_check"] = time.perf_counter() - t
            log(f"merge: the base quantised on CPU vs the CUDA record: {result['nf4_codes_cpu_vs_cuda_record']}")

        merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=dtype, device_map=device_map(device))
        ids = torch.randint(4, model.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(2))
        result["parity"] = parity(trainer.model, merged, ids.to(device))
        result["status"] = "ok" if result["parity"]["passed"] else "parity failed"
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
    """Compare next-token distributions of the adapter model (4-bit base + LoRA) and the merged model.

    Also measures how far the adapter moves the base (adapter disabled), so a vacuous merge (an adapter that changes
    nothing) cannot pass: the merge error must be well under the adapter's own effect.
    """
    import torch

    adapter_model.eval()
    merged_model.eval()
    with torch.no_grad():
        with_adapter = adapter_model(input_ids=input_ids).logits.float()
        with adapter_model.disable_adapter():
            base = adapter_model(input_ids=input_ids).logits.float()
        merged = merged_model(input_ids=input_ids).logits.float()
    probs, merged_probs, base_probs = (x.softmax(-1) for x in (with_adapter, merged, base))
    log_ratio = with_adapter.log_softmax(-1) - merged.log_softmax(-1)
    figures = {
        "max_abs_prob_diff": (probs - merged_probs).abs().max().item(),
        "max_abs_logit_diff": (with_adapter - merged).abs().max().item(),
        "mean_kl": (probs * log_ratio).sum(-1).mean().item(),
        "top1_agreement": (with_adapter.argmax(-1) == merged.argmax(-1)).float().mean().item(),
        "adapter_effect": (probs - base_probs).abs().max().item(),
        "adapter_effect_logits": (with_adapter - base).abs().max().item(),
        "prob_atol": PROB_ATOL,
    }
    figures["passed"] = bool(
        torch.isfinite(with_adapter).all()
        and figures["max_abs_prob_diff"] <= PROB_ATOL
        and figures["max_abs_logit_diff"] < 0.25 * figures["adapter_effect_logits"]
    )
    return figures
