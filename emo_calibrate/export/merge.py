"""Merge a (Q)LoRA adapter into the base it was trained on: one plain model folder, verified, written atomically.

The output loads with `AutoModelForCausalLM.from_pretrained`, vLLM, TGI or llama.cpp's converter: safetensors shards,
a config without `quantization_config`, the generation config, the tokenizer, a model card (`README.md`) and the
machine-readable `merge_report.json`. No PEFT and no bitsandbytes are needed to load it.

Two merge bases; by default the one training used, read from the adapter's record (`records.py`, docs/merge.md):

- `"original"`: the unquantised checkpoint; the merged model computes `W + s·BA`. The default for an adapter trained
  on an unquantised base (then it is the model as trained), and for an adapter without a record.
- `"dequantized"`: the base re-quantised exactly as in training (settings, load dtype, device), its 4-bit codes
  checked against the record, then dequantised; the merged model computes `deq(W_nf4) + s·BA`, the function a QLoRA
  adapter was trained with. The default for an adapter trained on a 4-bit base.

Nothing is ever merged into a quantised model (PEFT would re-quantise `W + s·BA`, which is lossy). The merge itself is
PEFT's `merge_and_unload(safe_merge=True)`, the dequantisation transformers' `model.dequantize()`.
"""

import gc
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field

from ..utils.quantization import disable_cpu_4bit_repacking, is_quantized
from .parity import PARITY_PROMPTS, ParityResult, compare_logits, prompt_logits
from .plan import MergePlan, make_merge_plan
from .records import check_codes, describe_code_check


__all__ = ["MergeReport", "ParityError", "merge_adapter"]

logger = logging.getLogger(__name__)

REPORT_NAME = "merge_report.json"


@dataclass
class MergeReport:
    """What `merge_adapter` did, and how faithful the result is.

    Attributes:
        output_dir (`str`) / adapter_path (`str`) / base_model (`str`): the merged model folder and the inputs.
        merge_base (`str`): `"dequantized"` or `"original"`; `merge_base_reason` says why (default rule or request).
        trained_base (`str`): what the adapter was trained on: `"4-bit"`, `"unquantised"`, `"unknown"`, ...
        dtype (`str`) / device (`str`): dtype of the merged weights; device the merge ran on.
        quantization (`dict | None`): the 4-bit settings of the rebuilt base; `quantization_source` says where they
            came from (adapter record, base checkpoint, assumed).
        code_check (`dict | None`): the rebuilt 4-bit codes against the record (`records.check_codes`).
        vocab_size (`int`) / resized_embeddings (`bool`): rows of the merged embedding; whether they were resized to
            the adapter's saved embeddings.
        emo_settings (`dict`): EMO settings and run facts of the adapter's record (empty when it has none).
        parity (`ParityResult | None`): merged model (reloaded from disk) vs the unmerged adapter model on the same
            merge base and dtype. This is the gated check. None when skipped.
        parity_vs_trained (`ParityResult | None`): merged model vs the adapter on the base as trained (4-bit with
            float32 compute, or the unquantised base in its training dtype). Reported, not gated; None when unknown.
        tolerance (`dict`) / seconds (`dict`): the bounds `parity` had to meet; wall time per phase.
    """

    output_dir: str
    adapter_path: str
    base_model: str
    merge_base: str
    merge_base_reason: str
    trained_base: str
    dtype: str
    device: str
    quantization: dict | None
    quantization_source: str
    code_check: dict | None
    vocab_size: int
    resized_embeddings: bool
    emo_settings: dict = field(default_factory=dict)
    parity: ParityResult | None = None
    parity_vs_trained: ParityResult | None = None
    tolerance: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.parity is None or self.parity.within(**self.tolerance)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        lines = [
            f"merge_base={self.merge_base} ({self.merge_base_reason}) dtype={self.dtype} device={self.device} "
            f"base={self.base_model} trained on: {self.trained_base} base"
        ]
        if self.code_check is not None:
            lines.append(f"4-bit codes vs the adapter record: {describe_code_check(self.code_check)}")
        if self.parity is None:
            lines.append("parity check: SKIPPED")
        else:
            p, t = self.parity, self.tolerance
            lines.append(
                f"parity vs unmerged adapter ({self.merge_base} base): max|dlogit|={p.max_abs_logit_diff:.3g} "
                f"mean KL={p.mean_kl:.3g} (tolerance {t['max_abs_logit_diff']:.3g} / {t['mean_kl']:.3g}) over "
                f"{p.num_positions} positions: " + ("PASSED" if self.passed else "FAILED")
            )
        if self.parity_vs_trained is not None:
            t = self.parity_vs_trained
            lines.append(
                f"vs the model as trained ({self.trained_base} base): max|dlogit|={t.max_abs_logit_diff:.3g} "
                f"mean KL={t.mean_kl:.3g}"
            )
        lines.append("time: " + ", ".join(f"{k} {v:.1f}s" for k, v in self.seconds.items()))
        return "\n".join(lines)


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

    Args:
        adapter_path (`str`): folder written by `EMOTrainer.save_model` / `save_pretrained` (adapter_config.json,
            adapter weights, usually a tokenizer and the training record `emo_training.json`).
        output_dir (`str`): where the merged model goes. Must not exist or be empty, unless `overwrite`.
        model_name_or_path (`str`, *optional*): the base model; defaults to the adapter's `base_model_name_or_path`.
        merge_base (`str`, *optional*): `"original"` (the unquantised checkpoint) or `"dequantized"` (the 4-bit base
            as trained, dequantised). Default: the base training used, from the adapter's record; `"original"`
            without a record.
        dtype (`str`, *optional*, defaults to `"bfloat16"`): dtype of the merged weights (`bfloat16`, `float16`,
            `float32`).
        device (`str`, *optional*): `"cpu"` or `"cuda"`. Default: the device the record says the 4-bit base was
            quantised on, when it is available here; else `"cpu"`.
        overwrite (`bool`, *optional*, defaults to `False`): replace a non-empty `output_dir`.
        check_parity (`bool`, *optional*, defaults to `True`): compare merged and unmerged models on fixed prompts
            and refuse to write when they disagree beyond the tolerance. Only skip it knowingly.
        allow_code_mismatch (`bool`, *optional*, defaults to `False`): merge even when the rebuilt 4-bit codes differ
            from the adapter's record (they are then not the base the adapter was trained on); the report and card
            record the difference.
        parity_max_abs_logit_diff / parity_mean_kl (`float`, *optional*): override the dtype's tolerance
            (`parity.PARITY_TOLERANCES`).
        parity_prompts (`tuple[str]`, *optional*): prompts of the check.
        bnb_4bit_quant_type / bnb_4bit_use_double_quant (*optional*): override the recorded (or assumed) 4-bit
            settings.
        max_shard_size (`str`, *optional*, defaults to `"5GB"`): safetensors shard size.

    Returns:
        [`MergeReport`]: settings, parity figures and timings (also written to `output_dir/merge_report.json`).

    Raises:
        `ValueError`: bad input (missing adapter, existing output, vocabulary mismatch, quantised base checkpoint,
            a 4-bit rebuild asked for an adapter trained unquantised, ...), raised before any model is loaded; and
            4-bit codes that differ from the record, raised before merging. Nothing is written.
        [`ParityError`]: the merged model disagrees with the adapter model; nothing is written.
    """
    start = time.perf_counter()
    plan = make_merge_plan(
        adapter_path,
        output_dir,
        model_name_or_path=model_name_or_path,
        merge_base=merge_base,
        dtype=dtype,
        device=device,
        overwrite=overwrite,
        bnb_4bit_quant_type=bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=bnb_4bit_use_double_quant,
    )
    tolerance = plan.tolerance(parity_max_abs_logit_diff, parity_mean_kl)
    parent, name = os.path.split(plan.output_dir)
    os.makedirs(parent, exist_ok=True)
    # Not mkdtemp: its folders are private (0o700); a model folder is read by servers, like any checkpoint.
    tmp = os.path.join(parent, f".{name}.merging-{uuid.uuid4().hex[:8]}")
    os.mkdir(tmp)
    try:
        report = _merge_into(plan, tmp, check_parity, allow_code_mismatch, tolerance, parity_prompts, max_shard_size)
        report.seconds["total"] = time.perf_counter() - start
        if not report.passed:
            raise ParityError(
                f"parity check failed, nothing written to {plan.output_dir}:\n{report.summary()}\n"
                "The merged model does not reproduce the adapter model. Check the base model and the adapter, or "
                "merge in float32 to rule out rounding.",
                report,
            )
        _write_card_and_report(tmp, report)
        _make_readable(tmp)
        _replace_dir(tmp, plan.output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("merged %s into %s\n%s", plan.adapter_path, plan.output_dir, report.summary())
    return report


def _merge_into(plan: MergePlan, tmp, check_parity, allow_code_mismatch, tolerance, prompts, max_shard_size):
    import torch
    from transformers import AutoModelForCausalLM

    seconds, trained_logits, code_check = {}, None, None
    tokenizer = plan.load_tokenizer()
    t = time.perf_counter()
    # First the base exactly as trained: the reference of the function the adapter learnt, and the codes to check.
    base = None
    if plan.trained == "4-bit" and (plan.merge_base == "dequantized" or check_parity):
        base = _load_base(plan, quantized=True)
        code_check = check_codes(base, plan.quantization)
        if code_check["status"] == "mismatch" and plan.merge_base == "dequantized" and not allow_code_mismatch:
            raise ValueError(_code_mismatch_message(plan, code_check))
    elif plan.trained == "unquantised":
        base = _load_base(plan, quantized=False, dtype=plan.trained_dtype)
    if base is not None and check_parity:
        adapter_model = _attach_adapter(base, plan)
        trained_logits = prompt_logits(adapter_model, tokenizer, prompts)
        base = adapter_model.unload()  # the base again, LoRA layers removed, nothing merged
        del adapter_model
    if plan.merge_base == "dequantized":
        base = base.dequantize(dtype=plan.torch_dtype)
        base.is_loaded_in_4bit = False  # transformers leaves it True after dequantize()
        base.to(plan.torch_dtype)  # unquantised modules (embeddings, norms) were loaded in the 4-bit load dtype
    elif plan.trained == "unquantised":
        base.to(plan.torch_dtype)  # the very weights trained on, cast as from_pretrained(dtype=...) would
    else:
        del base
        gc.collect()
        base = _load_base(plan, quantized=False)
    seconds["load"] = time.perf_counter() - t

    if is_quantized(base):  # the contract of this module; should be unreachable
        raise RuntimeError("refusing to merge into a quantised model: PEFT would re-quantise the merged weights")
    t = time.perf_counter()
    adapter_model = _attach_adapter(base, plan)
    reference_logits = prompt_logits(adapter_model, tokenizer, prompts) if check_parity else None
    merged = _merge_and_unload(adapter_model)
    seconds["merge"] = time.perf_counter() - t

    t = time.perf_counter()
    merged.save_pretrained(tmp, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(tmp)
    vocab_size = merged.get_input_embeddings().weight.shape[0]
    del merged, adapter_model, base
    gc.collect()
    seconds["save"] = time.perf_counter() - t

    parity = parity_vs_trained = None
    if check_parity:
        t = time.perf_counter()
        # Check what is on disk, not the object in memory: this also catches saving bugs (ties, dtypes, shards).
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=plan.torch_dtype, device_map={"": plan.device})
        candidate = prompt_logits(reloaded, tokenizer, prompts)
        del reloaded
        if plan.device == "cuda":
            torch.cuda.empty_cache()
        parity = compare_logits(reference_logits, candidate)
        parity_vs_trained = compare_logits(trained_logits, candidate) if trained_logits is not None else None
        seconds["parity"] = time.perf_counter() - t
    return MergeReport(
        output_dir=plan.output_dir,
        adapter_path=plan.adapter_path,
        base_model=plan.base_model,
        merge_base=plan.merge_base,
        merge_base_reason=plan.merge_base_reason,
        trained_base=plan.trained,
        dtype=plan.dtype,
        device=plan.device,
        quantization=plan.quantization_dict(),
        quantization_source=plan.quantization_source,
        code_check=code_check,
        vocab_size=vocab_size,
        resized_embeddings=plan.resize_embeddings_to is not None,
        emo_settings=plan.emo_settings,
        parity=parity,
        parity_vs_trained=parity_vs_trained,
        tolerance=tolerance,
        seconds=seconds,
    )


def _load_base(plan: MergePlan, *, quantized: bool, dtype: str | None = None):
    """The base model: unquantised in `dtype` (default: the merge dtype), or 4-bit exactly as in training.

    The 4-bit model keeps the training's quantisation (settings and load dtype decide the 4-bit codes) but computes in
    float32 with its unquantised parameters upcast (exact), so that it serves as a clean reference of the trained
    function: comparisons against it then show the merged model's error, not bf16 noise of the reference.
    """
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    kwargs = {"device_map": {"": plan.device}, "dtype": getattr(torch, dtype or plan.dtype)}
    if quantized:
        kwargs["dtype"] = getattr(torch, plan.trained_dtype)
        if plan.quantization_config is not None:  # None: the checkpoint is itself saved in 4-bit
            kwargs["quantization_config"] = copy.deepcopy(plan.quantization_config)
            kwargs["quantization_config"].bnb_4bit_compute_dtype = torch.float32
    model = AutoModelForCausalLM.from_pretrained(plan.base_model, **kwargs)
    if plan.resize_embeddings_to is not None:
        # The adapter saved embeddings of this size; PEFT copies them in when the adapter is attached.
        model.resize_token_embeddings(plan.resize_embeddings_to, mean_resizing=False)
    if quantized:
        for param in model.parameters():
            if param.is_floating_point() and type(param).__name__ != "Params4bit":
                param.data = param.data.float()
    disable_cpu_4bit_repacking(model)
    return model


def _attach_adapter(model, plan: MergePlan):
    from peft import PeftModel

    adapter_model = PeftModel.from_pretrained(model, plan.adapter_path)
    disable_cpu_4bit_repacking(adapter_model)  # from_pretrained returns eval mode: the next forward would repack
    return adapter_model


def _merge_and_unload(adapter_model):
    """PEFT's merge with its NaN check; a separate function so tests can simulate a corrupted merge."""
    return adapter_model.merge_and_unload(safe_merge=True, progressbar=True)


def _code_mismatch_message(plan: MergePlan, check: dict) -> str:
    recorded, here = check["recorded"], check["merge"]
    fixes = []
    if recorded["device"] and recorded["device"] != here["device"]:
        fixes.append(f"merge where training quantised, with --device {recorded['device']}")
    if recorded["bitsandbytes"] and recorded["bitsandbytes"] != here["bitsandbytes"]:
        fixes.append(f"install bitsandbytes=={recorded['bitsandbytes']}")
    if not fixes:
        fixes.append("pass the checkpoint the adapter was trained on as --model_name_or_path")
    return (
        f"the 4-bit base rebuilt from {plan.base_model!r} is not the one the adapter {plan.adapter_path!r} was trained "
        f"on: {describe_code_check(check)}. To merge into the trained base: {'; '.join(fixes)}. Or pass "
        "allow_code_mismatch=True (--allow_code_mismatch) to merge anyway; the card and report then record the "
        "difference. Nothing was written."
    )


def _write_card_and_report(folder: str, report: MergeReport) -> None:
    from .card import model_card

    with open(os.path.join(folder, REPORT_NAME), "w") as f:
        json.dump(report.to_dict(), f, indent=2, default=str)
    model_card(report).save(os.path.join(folder, "README.md"))


def _make_readable(folder: str) -> None:
    """Some writers (the safetensors shards) create private files; a model folder is read by servers."""
    umask = os.umask(0)
    os.umask(umask)
    for name in os.listdir(folder):
        if os.path.isfile(path := os.path.join(folder, name)):
            os.chmod(path, 0o666 & ~umask)


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
