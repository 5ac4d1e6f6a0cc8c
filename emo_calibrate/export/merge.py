"""Merge a (Q)LoRA adapter into its base model for deployment: one plain model folder, verified, written atomically.

The output loads with `AutoModelForCausalLM.from_pretrained`, vLLM, TGI or llama.cpp's converter: safetensors shards,
a config without `quantization_config`, the generation config, the tokenizer, a model card (`README.md`) and the
machine-readable `merge_report.json`. No PEFT and no bitsandbytes are needed to load it.

Two merge bases (see docs/merge.md for the measurements behind the default):

- `"dequantized"` (default): load the base in 4-bit exactly as in training, dequantise it, merge. The merged model
  computes `deq(W_nf4) + s·BA`, the very function the adapter was trained with.
- `"original"`: reload the unquantised checkpoint and merge. The merged model computes `W + s·BA`: the adapter was
  learned against `deq(W_nf4)`, so this differs from the trained function by the quantisation error of the base.

Nothing is ever merged into a quantised model (PEFT would re-quantise `W + s·BA`, which is lossy).
"""

import gc
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field

from ..utils.quantization import disable_cpu_4bit_repacking, is_quantized
from .parity import PARITY_PROMPTS, ParityResult, compare_logits, prompt_logits
from .plan import DEFAULT_MERGE_BASE, MergePlan, make_merge_plan


__all__ = ["DEFAULT_MERGE_BASE", "MergeReport", "ParityError", "merge_adapter"]

logger = logging.getLogger(__name__)

REPORT_NAME = "merge_report.json"


@dataclass
class MergeReport:
    """What `merge_adapter` did, and how faithful the result is.

    Attributes:
        output_dir (`str`): the merged model folder.
        adapter_path (`str`) / base_model (`str`): inputs.
        merge_base (`str`): `"dequantized"` or `"original"`.
        dtype (`str`) / device (`str`): dtype of the merged weights; device the merge ran on.
        quantization (`dict | None`): the 4-bit settings used for the dequantised base and the trained reference.
        quantization_source (`str`): where they came from (adapter record, training arguments, base checkpoint,
            defaults).
        vocab_size (`int`) / resized_embeddings (`bool`): rows of the merged embedding; whether they were resized to
            the adapter's saved embeddings.
        emo_settings (`dict`): EMO settings and run facts found in the adapter folder.
        parity (`ParityResult | None`): merged model (reloaded from disk) vs the unmerged adapter model on the same
            merge base and dtype. This is the gated check. None when skipped.
        parity_vs_trained (`ParityResult | None`): merged model vs the adapter on the 4-bit base, i.e. the function as
            trained (reported, not gated).
        tolerance (`dict`): the bounds `parity` had to meet.
        seconds (`dict`): wall time per phase.
    """

    output_dir: str
    adapter_path: str
    base_model: str
    merge_base: str
    dtype: str
    device: str
    quantization: dict | None
    quantization_source: str
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
        lines = [f"merge_base={self.merge_base} dtype={self.dtype} device={self.device} base={self.base_model}"]
        if self.parity is None:
            lines.append("parity check: SKIPPED")
        else:
            p = self.parity
            lines.append(
                f"parity vs unmerged adapter ({self.merge_base} base): max|dlogit|={p.max_abs_logit_diff:.3g} "
                f"mean KL={p.mean_kl:.3g} (tolerance {self.tolerance['max_abs_logit_diff']:.3g} / "
                f"{self.tolerance['mean_kl']:.3g}) over {p.num_positions} positions: "
                + ("PASSED" if self.passed else "FAILED")
            )
        if self.parity_vs_trained is not None:
            t = self.parity_vs_trained
            lines.append(
                f"vs the 4-bit model as trained: max|dlogit|={t.max_abs_logit_diff:.3g} mean KL={t.mean_kl:.3g}"
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
    merge_base: str = DEFAULT_MERGE_BASE,
    dtype: str = "bfloat16",
    device: str = "cpu",
    overwrite: bool = False,
    check_parity: bool = True,
    parity_max_abs_logit_diff: float | None = None,
    parity_mean_kl: float | None = None,
    parity_prompts: tuple[str, ...] = PARITY_PROMPTS,
    bnb_4bit_quant_type: str | None = None,
    bnb_4bit_use_double_quant: bool | None = None,
    max_shard_size: str = "5GB",
) -> MergeReport:
    """Merge a LoRA adapter into its base model and write a plain model folder, atomically and verified.

    Args:
        adapter_path (`str`): folder written by `save_pretrained` / `EMOTrainer.save_model` (adapter_config.json,
            adapter weights, usually a tokenizer and training_args.bin).
        output_dir (`str`): where the merged model goes. Must not exist or be empty, unless `overwrite`.
        model_name_or_path (`str`, *optional*): the base model; defaults to the adapter's `base_model_name_or_path`.
        merge_base (`str`, *optional*, defaults to `"dequantized"`): `"dequantized"` (4-bit base as trained,
            dequantised) or `"original"` (the unquantised checkpoint).
        dtype (`str`, *optional*, defaults to `"bfloat16"`): dtype of the merged weights (`bfloat16`, `float16`,
            `float32`).
        device (`str`, *optional*, defaults to `"cpu"`): `"cpu"` or `"cuda"`.
        overwrite (`bool`, *optional*, defaults to `False`): replace a non-empty `output_dir`.
        check_parity (`bool`, *optional*, defaults to `True`): compare merged and unmerged models on fixed prompts
            and refuse to write when they disagree beyond the tolerance. Only skip it knowingly.
        parity_max_abs_logit_diff / parity_mean_kl (`float`, *optional*): override the dtype's tolerance
            (`parity.PARITY_TOLERANCES`).
        parity_prompts (`tuple[str]`, *optional*): prompts of the check.
        bnb_4bit_quant_type / bnb_4bit_use_double_quant (*optional*): override the recorded 4-bit settings.
        max_shard_size (`str`, *optional*, defaults to `"5GB"`): safetensors shard size.

    Returns:
        [`MergeReport`]: settings, parity figures and timings (also written to `output_dir/merge_report.json`).

    Raises:
        `ValueError`: bad input (missing adapter, existing output, vocabulary mismatch, quantised base for
            `"original"`, ...), raised before any model is loaded.
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
    parent = os.path.dirname(plan.output_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(plan.output_dir)}.merging-", dir=parent)
    try:
        report = _merge_into(plan, tmp, check_parity, tolerance, parity_prompts, max_shard_size, start)
        if not report.passed:
            raise ParityError(
                f"parity check failed, nothing written to {plan.output_dir}:\n{report.summary()}\n"
                "The merged model does not reproduce the adapter model. Check the base model and the adapter; "
                "use merge_base='dequantized' for QLoRA adapters, or float32 to rule out rounding.",
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


def _merge_into(plan: MergePlan, tmp: str, check_parity, tolerance, prompts, max_shard_size, start) -> MergeReport:
    import torch
    from transformers import AutoModelForCausalLM

    seconds = {}
    tokenizer = plan.load_tokenizer()
    t = time.perf_counter()
    trained_logits = reference_logits = None
    if plan.merge_base == "dequantized":
        adapter4 = _attach_adapter(_load_base(plan, quantized=True), plan)
        if check_parity:
            trained_logits = prompt_logits(adapter4, tokenizer, prompts)
        base = adapter4.unload()  # the 4-bit base again, LoRA layers removed, nothing merged
        del adapter4
        base = base.dequantize(dtype=plan.torch_dtype)
        base.is_loaded_in_4bit = False  # transformers leaves it True after dequantize()
        base.to(plan.torch_dtype)  # unquantised modules (embeddings, norms) were loaded in the 4-bit load dtype
    else:
        if check_parity:
            adapter4 = _attach_adapter(_load_base(plan, quantized=True), plan)
            trained_logits = prompt_logits(adapter4, tokenizer, prompts)
            del adapter4
            gc.collect()
        base = _load_base(plan, quantized=False)
    seconds["load"] = time.perf_counter() - t

    if is_quantized(base):  # the contract of this module; should be unreachable
        raise RuntimeError("refusing to merge into a quantised model: PEFT would re-quantise the merged weights")
    t = time.perf_counter()
    adapter_model = _attach_adapter(base, plan)
    if check_parity:
        reference_logits = prompt_logits(adapter_model, tokenizer, prompts)
    merged = _merge_and_unload(adapter_model)
    _check_plain(merged)
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
        parity_vs_trained = compare_logits(trained_logits, candidate)
        seconds["parity"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - start
    return MergeReport(
        output_dir=plan.output_dir,
        adapter_path=plan.adapter_path,
        base_model=plan.base_model,
        merge_base=plan.merge_base,
        dtype=plan.dtype,
        device=plan.device,
        quantization=plan.quantization_dict(),
        quantization_source=plan.quantization_source,
        vocab_size=vocab_size,
        resized_embeddings=plan.resize_embeddings_to is not None,
        emo_settings=plan.emo_settings,
        parity=parity,
        parity_vs_trained=parity_vs_trained,
        tolerance=tolerance,
        seconds=seconds,
    )


def _load_base(plan: MergePlan, *, quantized: bool):
    """The base model: unquantised in the merge dtype, or 4-bit exactly as in training.

    The 4-bit model keeps the training's quantisation (settings and load dtype decide the 4-bit codes) but computes in
    float32 with its unquantised parameters upcast (exact), so that it serves as a clean reference of the trained
    function: comparisons against it then show the merged model's error, not bf16 noise of the reference.
    """
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    kwargs = {"device_map": {"": plan.device}}
    if quantized:
        kwargs["dtype"] = plan.quantized_load_dtype
        if plan.quantization_config is not None:  # None: the checkpoint is itself saved in 4-bit
            kwargs["quantization_config"] = copy.deepcopy(plan.quantization_config)
            kwargs["quantization_config"].bnb_4bit_compute_dtype = torch.float32
    else:
        kwargs["dtype"] = plan.torch_dtype
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


def _check_plain(model) -> None:
    from peft.tuners.tuners_utils import BaseTunerLayer

    leftovers = [name for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)]
    if leftovers:
        raise RuntimeError(f"merge left adapter layers behind: {leftovers[:5]}")
    if is_quantized(model):
        raise RuntimeError("the merged model is quantised; refusing to save it")


def _write_card_and_report(folder: str, report: MergeReport) -> None:
    from .card import model_card

    with open(os.path.join(folder, REPORT_NAME), "w") as f:
        json.dump(report.to_dict(), f, indent=2, default=str)
    with open(os.path.join(folder, "README.md"), "w") as f:
        f.write(model_card(report))


def _make_readable(folder: str) -> None:
    """mkdtemp (and some writers) create private files; a model folder is read by servers, like any checkpoint."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            os.chmod(path, 0o666 & ~umask)


def _replace_dir(tmp: str, output_dir: str) -> None:
    """Move the finished `tmp` folder to `output_dir`, replacing an old (empty or `overwrite`n) one."""
    if not os.path.exists(output_dir):
        os.rename(tmp, output_dir)
        return
    old = tempfile.mkdtemp(prefix=f".{os.path.basename(output_dir)}.old-", dir=os.path.dirname(output_dir))
    os.rmdir(old)
    os.rename(output_dir, old)
    try:
        os.rename(tmp, output_dir)
    except BaseException:
        os.rename(old, output_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)
