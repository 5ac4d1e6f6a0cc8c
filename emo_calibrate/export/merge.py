"""Merge a (Q)LoRA adapter into the base it was trained on: one plain model folder, verified, written atomically.

The base is the one training used (plan.py): the unquantised checkpoint (`"original"`, `W + s·BA`), or the 4-bit base
rebuilt exactly as in training, its codes checked against the adapter's record, then dequantised (`"dequantized"`,
`deq(W_nf4) + s·BA`). Nothing is ever merged into a quantised model (PEFT would re-quantise `W + s·BA`, which is
lossy). The dequantisation is transformers' `model.dequantize()`, the merge PEFT's `merge_and_unload(safe_merge=True)`.
"""

import gc
import json
import os
import shutil
import time
import uuid

from ..utils.quantization import disable_cpu_4bit_repacking
from .parity import PARITY_PROMPTS, PARITY_TOLERANCES, compare_logits, prompt_logits
from .plan import make_merge_plan
from .records import check_codes, code_mismatch_message
from .report import MergeReport, model_card


__all__ = ["MergeReport", "ParityError", "merge_adapter"]


class ParityError(RuntimeError):
    """The merged model does not reproduce the adapter model; `report` holds the figures. Nothing was written."""

    def __init__(self, message: str, report: MergeReport):
        super().__init__(message)
        self.report = report


def merge_adapter(
    adapter_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    model_name_or_path: str | None = None,
    merge_base: str | None = None,
    dtype: str = "bfloat16",
    device: str | None = None,
    overwrite: bool = False,
    check_parity: bool = True,
    allow_code_mismatch: bool = False,
    parity_max_abs_logit_diff: float | None = None,
    parity_mean_kl: float | None = None,
    parity_prompts: tuple[str, ...] = PARITY_PROMPTS,
    bnb_4bit_quant_type: str | None = None,
    bnb_4bit_use_double_quant: bool | None = None,
    max_shard_size: str = "5GB",
) -> MergeReport:
    """Merge a LoRA adapter into its base model and write a plain model folder, atomically and verified.

    The folder (safetensors shards, config without `quantization_config`, generation config, tokenizer, model card
    `README.md`, `merge_report.json`) loads without PEFT or bitsandbytes.

    Args:
        adapter_path (`str`): folder written by `EMOTrainer.save_model` / `save_pretrained` (adapter_config.json,
            adapter weights, usually a tokenizer and the training record `emo_training.json`).
        output_dir (`str`): where the merged model goes. Must not exist or be empty, unless `overwrite`.
        model_name_or_path (`str`, *optional*): the base model; defaults to the adapter's `base_model_name_or_path`.
        merge_base (`str`, *optional*): `"original"` (the unquantised checkpoint) or `"dequantized"` (the 4-bit base
            as trained, dequantised). Default: the base training used, from the adapter's record; `"original"`
            without a record.
        dtype (`str`, *optional*, defaults to `"bfloat16"`): of the merged weights: `bfloat16`, `float16`, `float32`.
        device (`str`, *optional*): `"cpu"` or `"cuda"`. Default: where the record says the 4-bit base was quantised,
            when available here; else `"cpu"`.
        overwrite (`bool`, *optional*, defaults to `False`): replace a non-empty `output_dir`.
        check_parity (`bool`, *optional*, defaults to `True`): compare merged and unmerged models on fixed prompts
            and refuse to write when they disagree beyond the tolerance. Only skip it knowingly.
        allow_code_mismatch (`bool`, *optional*, defaults to `False`): merge even when the rebuilt 4-bit codes differ
            from the adapter's record; the report and card record the difference.
        parity_max_abs_logit_diff / parity_mean_kl (`float`, *optional*): override the dtype's tolerance
            (`parity.PARITY_TOLERANCES`).
        parity_prompts (`tuple[str]`, *optional*): prompts of the check.
        bnb_4bit_quant_type / bnb_4bit_use_double_quant (*optional*): override the recorded (or assumed) settings.
        max_shard_size (`str`, *optional*, defaults to `"5GB"`): safetensors shard size.

    Returns:
        [`MergeReport`]: settings, parity figures and timings (also written to `output_dir/merge_report.json`).

    Raises:
        `ValueError`: bad input (the refusals of docs/merge.md), before any model is loaded; 4-bit codes that differ
            from the record, before merging. Nothing is written.
        [`ParityError`]: the merged model disagrees with the adapter model; nothing is written.
    """
    start = time.perf_counter()
    overrides = {"bnb_4bit_quant_type": bnb_4bit_quant_type, "bnb_4bit_use_double_quant": bnb_4bit_use_double_quant}
    report = make_merge_plan(
        adapter_path, output_dir, model_name_or_path, merge_base, dtype, device, overwrite, overrides
    )
    given = {"max_abs_logit_diff": parity_max_abs_logit_diff, "mean_kl": parity_mean_kl}
    report.tolerance = {**PARITY_TOLERANCES[report.dtype], **{k: float(v) for k, v in given.items() if v is not None}}
    parent, name = os.path.split(report.output_dir)
    os.makedirs(parent, exist_ok=True)
    # Not mkdtemp: its folders are private (0o700); a model folder is read by servers, like any checkpoint.
    tmp = os.path.join(parent, f".{name}.merging-{uuid.uuid4().hex[:8]}")
    os.mkdir(tmp)
    try:
        _merge_into(report, tmp, check_parity, allow_code_mismatch, parity_prompts, max_shard_size)
        report.seconds["total"] = time.perf_counter() - start
        if not report.passed:
            raise ParityError(
                f"parity check failed, nothing written to {report.output_dir}:\n{report.summary()}\n"
                "The merged model does not reproduce the adapter model. Check the base model and the adapter, or "
                "merge in float32 to rule out rounding.",
                report,
            )
        with open(os.path.join(tmp, "merge_report.json"), "w") as f:
            json.dump(report.to_dict(), f, indent=2, default=str)
        model_card(report).save(os.path.join(tmp, "README.md"))
        _make_readable(tmp)
        _replace_dir(tmp, report.output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def _merge_into(report: MergeReport, folder, check_parity, allow_code_mismatch, prompts, max_shard_size) -> None:
    """Load the base, check its codes, merge, save into `folder` and check parity, filling in `report`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    seconds, trained_logits, dtype = report.seconds, None, getattr(torch, report.dtype)
    tokenizer = AutoTokenizer.from_pretrained(report.tokenizer_source)
    t = time.perf_counter()
    # First the base exactly as trained: the reference of the function the adapter learnt, and the codes to check.
    base = None
    if report.trained_base == "4-bit" and (report.merge_base == "dequantized" or check_parity):
        base = _load_base(report, report.trained_dtype, quantized=True)
        report.code_check = check_codes(base, (report.training_record or {}).get("quantization"))
        stops = report.merge_base == "dequantized" and not allow_code_mismatch  # original: reported only
        if stops and report.code_check["status"] == "mismatch":
            raise ValueError(code_mismatch_message(report.code_check, report.base_model, report.adapter_path))
    elif report.trained_base == "unquantised":
        base = _load_base(report, report.trained_dtype)
    if base is not None and check_parity:
        adapter_model = _attach_adapter(base, report)
        trained_logits = prompt_logits(adapter_model, tokenizer, prompts)
        base = adapter_model.unload()  # the base again, LoRA layers removed, nothing merged
    if report.merge_base == "dequantized":
        base = base.dequantize(dtype=dtype).to(dtype)  # .to: embeddings and norms kept the 4-bit load dtype
        base.is_loaded_in_4bit = False  # transformers leaves it True after dequantize()
    elif report.trained_base == "unquantised":
        base.to(dtype)  # the very weights trained on, cast as from_pretrained(dtype=...) would
    else:
        del base
        gc.collect()
        base = _load_base(report, report.dtype)
    seconds["load"] = time.perf_counter() - t

    t = time.perf_counter()
    adapter_model = _attach_adapter(base, report)
    reference_logits = prompt_logits(adapter_model, tokenizer, prompts) if check_parity else None
    merged = adapter_model.merge_and_unload(safe_merge=True, progressbar=True)  # safe_merge: checks for NaNs
    seconds["merge"] = time.perf_counter() - t

    t = time.perf_counter()
    merged.save_pretrained(folder, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(folder)
    report.vocab_size = merged.get_input_embeddings().weight.shape[0]
    del merged, adapter_model, base
    gc.collect()
    seconds["save"] = time.perf_counter() - t

    if check_parity:
        t = time.perf_counter()
        # Check what is on disk, not the object in memory: this also catches saving bugs (ties, dtypes, shards).
        reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, device_map={"": report.device})
        candidate = prompt_logits(reloaded, tokenizer, prompts)
        del reloaded
        report.parity = compare_logits(reference_logits, candidate)
        if trained_logits is not None:
            report.parity_vs_trained = compare_logits(trained_logits, candidate)
        seconds["parity"] = time.perf_counter() - t


def _load_base(report: MergeReport, dtype: str, quantized: bool = False):
    """The base model, loaded in `dtype`: unquantised, or (`quantized`) in 4-bit exactly as in training (the same
    codes) but computing in float32, unquantised parameters upcast (exact): a reference of the trained function whose
    comparisons show the merged model's error, not bf16 noise of the reference."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs = {"device_map": {"": report.device}, "dtype": getattr(torch, dtype)}
    if quantized and report.quantization is not None:  # None: the checkpoint is itself saved in 4-bit
        settings = {**report.quantization, "bnb_4bit_compute_dtype": "float32"}
        kwargs["quantization_config"] = BitsAndBytesConfig.from_dict(settings)
    model = AutoModelForCausalLM.from_pretrained(report.base_model, **kwargs)
    if report.resize_embeddings_to is not None:
        # The adapter saved embeddings of this size; PEFT copies them in when the adapter is attached.
        model.resize_token_embeddings(report.resize_embeddings_to, mean_resizing=False)
    if quantized:
        for param in model.parameters():
            if param.is_floating_point() and type(param).__name__ != "Params4bit":
                param.data = param.data.float()
    disable_cpu_4bit_repacking(model)
    return model


def _attach_adapter(model, report: MergeReport):
    from peft import PeftModel

    adapter_model = PeftModel.from_pretrained(model, report.adapter_path)
    disable_cpu_4bit_repacking(adapter_model)  # from_pretrained returns eval mode: the next forward would repack
    return adapter_model


def _make_readable(folder: str) -> None:
    """Give every file the mode of `config.json`: the safetensors shards are written private (0o600)."""
    mode = os.stat(os.path.join(folder, "config.json")).st_mode & 0o777
    for name in os.listdir(folder):
        if os.path.isfile(path := os.path.join(folder, name)):
            os.chmod(path, mode)


def _replace_dir(tmp: str, output_dir: str) -> None:
    """Move the finished `tmp` folder to `output_dir`, replacing an old (empty or `overwrite`n) one."""
    if not os.path.exists(output_dir):
        os.rename(tmp, output_dir)
        return
    old = f"{tmp}.old"
    os.rename(output_dir, old)
    try:
        os.rename(tmp, output_dir)
    except BaseException:
        os.rename(old, output_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)
