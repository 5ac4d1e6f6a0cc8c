"""Everything `merge_adapter` decides before loading weights: inputs checked, the trained base resolved, refusals.

All refusals are `ValueError`s that name the input and the fix, raised in seconds (configs, tokenizers, the adapter's
JSON record and tensor headers only), before any weights load. The one check that needs weights, the 4-bit codes
against the record, runs in merge.py before merging.
"""

import os

from .records import RECORD_NAME, read_training_record
from .report import MergeReport


__all__ = ["DTYPES", "MERGE_BASES", "make_merge_plan"]

MERGE_BASES = ("dequantized", "original")
DTYPES = ("bfloat16", "float16", "float32")
DEVICES = ("cpu", "cuda")
# Assumed only when merge_base="dequantized" is asked for an adapter without a record (the QLoRA paper's setting).
DEFAULT_4BIT = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True}


def make_merge_plan(
    adapter_path, output_dir, model_name_or_path, merge_base, dtype, device, overwrite, overrides: dict
) -> MergeReport:
    """Check the inputs of `merge_adapter` (`overrides`: its `bnb_4bit_*` arguments, None when not given) and resolve
    them into a `MergeReport` without results. Raises `ValueError` on bad input."""
    import torch
    from peft import PeftConfig
    from transformers import AutoConfig

    _choice("merge_base", merge_base, (None, *MERGE_BASES))
    _choice("dtype", dtype, DTYPES)
    _choice("device", device, (None, *DEVICES))
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but no CUDA GPU is visible; use device='cpu'.")
    adapter_path = os.path.abspath(os.fspath(adapter_path))
    if not os.path.isfile(os.path.join(adapter_path, "adapter_config.json")):
        raise ValueError(
            f"adapter_path {adapter_path!r} is not a PEFT adapter folder (no adapter_config.json). "
            "Pass the folder written by EMOTrainer.save_model / PeftModel.save_pretrained."
        )
    peft_config = PeftConfig.from_pretrained(adapter_path)
    if peft_config.is_prompt_learning:
        raise ValueError(f"the adapter in {adapter_path!r} is a prompt-learning adapter, which cannot be merged.")
    output_dir = _check_output_dir(output_dir, adapter_path, overwrite)
    base_model = model_name_or_path or peft_config.base_model_name_or_path
    if not base_model:
        raise ValueError(f"{adapter_path}/adapter_config.json names no base model; pass model_name_or_path.")
    if os.path.isdir(base_model) and os.path.abspath(base_model) == output_dir:
        raise ValueError("output_dir is the base model folder; choose another output_dir.")
    try:
        base_config = AutoConfig.from_pretrained(base_model)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"cannot load the config of the base model {base_model!r} ({err}). Pass model_name_or_path: a local "
            "folder or a model id available offline."
        ) from err

    record = read_training_record(adapter_path)
    trained, trained_dtype, settings, source = _trained_base(record, base_config, merge_base)
    merge_base, reason = _choose_merge_base(merge_base, trained, source)
    if merge_base == "dequantized" and trained == "unknown":
        trained, settings = "4-bit", dict(DEFAULT_4BIT)
        source = "assumed: NF4 + double quantisation (the adapter records no quantisation)"
    if overrides := {key: value for key, value in overrides.items() if value is not None}:
        if settings is None:
            raise ValueError(
                f"{', '.join(overrides)} set, but no 4-bit base is involved ({trained} training base, merge_base="
                f"{merge_base!r}); drop them, or pass merge_base='dequantized' for an adapter trained on 4-bit."
            )
        settings, source = {**settings, **overrides}, source + " + overrides"
    if device is None:  # where training quantised the base, so that the codes are the same (docs/merge.md)
        recorded = ((record or {}).get("quantization") or {}).get("device")
        device = "cuda" if recorded == "cuda" and torch.cuda.is_available() else "cpu"
    report = MergeReport(
        adapter_path=adapter_path,
        output_dir=output_dir,
        base_model=base_model,
        merge_base=merge_base,
        merge_base_reason=reason,
        dtype=dtype,
        device=device,
        trained_base=trained,
        trained_dtype=trained_dtype if trained_dtype in DTYPES else dtype,
        quantization=settings,
        quantization_source=source,
        tokenizer_source=adapter_path if _has_tokenizer(adapter_path) else base_model,
        training_record=record,
    )
    _check_vocabulary(report, peft_config, base_config)
    return report


def _choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(map(repr, choices))}.")


def _check_output_dir(output_dir, adapter_path: str, overwrite: bool) -> str:
    output_dir = os.path.abspath(os.fspath(output_dir))
    if output_dir == adapter_path or adapter_path.startswith(output_dir + os.sep):
        raise ValueError(f"output_dir {output_dir!r} would replace the adapter folder; choose another output_dir.")
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ValueError(f"output_dir {output_dir!r} exists and is not a folder.")
    if os.path.isdir(output_dir) and os.listdir(output_dir) and not overwrite:
        raise ValueError(
            f"output_dir {output_dir!r} exists and is not empty; pass overwrite=True (--overwrite) to replace it."
        )
    return output_dir


def _is_bnb_4bit(settings: dict) -> bool:
    method = str(settings.get("quant_method", "bitsandbytes"))
    loads_4bit = settings.get("load_in_4bit") or settings.get("_load_in_4bit")
    return bool(loads_4bit) and method in ("bitsandbytes", "QuantizationMethod.BITS_AND_BYTES")


def _trained_base(record, base_config, merge_base):
    """What the adapter was trained on: (kind, dtype of the base weights, 4-bit settings or None, source)."""
    saved = getattr(base_config, "quantization_config", None)
    if saved is not None:
        saved = saved if isinstance(saved, dict) else saved.to_dict()
        if _is_bnb_4bit(saved) and merge_base != "original":
            return "4-bit", None, None, "base checkpoint (saved in 4-bit)"
        raise ValueError(
            f"the base checkpoint is quantised ({saved.get('quant_method')}); merge_base={merge_base!r} needs an "
            "unquantised checkpoint (or a bitsandbytes 4-bit one with merge_base='dequantized'). Pass the original "
            "model as model_name_or_path."
        )
    if record is None:
        return "unknown", None, None, f"unknown: the adapter folder has no {RECORD_NAME}"
    source = f"adapter record ({RECORD_NAME if record.get('format') else 'quantization_config.json, a legacy record'})"
    quantization = record.get("quantization")
    if quantization is None:
        return "unquantised", record.get("base_dtype"), None, source
    if _is_bnb_4bit(quantization["config"]):
        return "4-bit", quantization.get("load_dtype"), dict(quantization["config"]), source
    if merge_base != "original":
        raise ValueError(
            f"the adapter was trained on a base quantised as {quantization['config']} (not bitsandbytes 4-bit), "
            "which cannot be rebuilt for merging; pass merge_base='original'."
        )
    return "other quantisation", None, None, source


def _choose_merge_base(merge_base, trained: str, source: str) -> tuple[str, str]:
    if merge_base == "dequantized" and trained == "unquantised":
        raise ValueError(
            f"merge_base='dequantized' rebuilds a 4-bit base, but the adapter was trained on an unquantised base "
            f"({source}): the merged model would carry a quantisation error training never saw. Use the default "
            "(merge_base='original'), which merges into the very base that was trained."
        )
    if merge_base is not None:
        return merge_base, "requested"
    if trained == "4-bit":
        return "dequantized", "the default for an adapter trained on a 4-bit base"
    if trained == "unknown":
        return "original", (
            "the default when the training base is unknown; if the adapter was trained on a 4-bit base, pass "
            "merge_base='dequantized'"
        )
    return "original", "the default for an adapter trained on an unquantised base"


def _has_tokenizer(folder: str) -> bool:
    return any(os.path.isfile(os.path.join(folder, n)) for n in ("tokenizer.json", "tokenizer_config.json"))


def _saved_embedding_rows(adapter_path: str, base_config) -> dict[str, int]:
    """Rows of the full embedding matrices the adapter saved (PEFT does when the vocabulary was resized), by module
    name (`"model.embed_tokens"` / `"lm_head"` for a Llama); empty when none."""
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    path = os.path.join(adapter_path, "adapter_model.safetensors")
    if not os.path.isfile(path):
        return {}
    with torch.device("meta"):  # weightless: only the names of the two embedding modules are read off it
        skeleton = AutoModelForCausalLM.from_config(base_config)
    embeddings = (skeleton.get_input_embeddings(), skeleton.get_output_embeddings())
    names = {f"{name}.weight": name for name, module in skeleton.named_modules() if module in embeddings}
    rows = {}
    with safe_open(path, framework="pt") as f:
        for key in f.keys():
            # PEFT's keys: `base_model.model.<name>.weight`, or `...<name>.modules_to_save(.default).weight`
            name = key.removeprefix("base_model.model.").replace(".modules_to_save", "").replace(".default", "")
            if name in names:
                rows[names[name]] = f.get_slice(key).get_shape()[0]
    return rows


def _check_vocabulary(report: MergeReport, peft_config, base_config) -> None:
    """Refuse an adapter whose vocabulary differs from the base's; note the size to resize the base to, if any."""
    from transformers import AutoConfig, AutoTokenizer

    text_config = base_config.get_text_config()
    rows = text_config.vocab_size
    saved = _saved_embedding_rows(report.adapter_path, base_config)
    if len(set(saved.values())) > 1:
        raise ValueError(f"the adapter in {report.adapter_path!r} saved embeddings of different sizes: {saved}.")
    if saved and (size := next(iter(saved.values()))) != rows:
        if len(saved) < 2 and not getattr(text_config, "tie_word_embeddings", False):
            raise ValueError(
                f"the adapter resized the vocabulary to {size} but saved only {list(saved)}; the other embedding of "
                "this untied model cannot be rebuilt. Retrain saving both (save_embedding_layers=True)."
            )
        report.resize_embeddings_to = rows = size

    recorded = peft_config.base_model_name_or_path
    if not saved and recorded and recorded != report.base_model and os.path.isdir(recorded):
        recorded_rows = AutoConfig.from_pretrained(recorded).get_text_config().vocab_size
        if recorded_rows != rows:
            raise ValueError(
                f"vocabulary mismatch: the adapter was trained on {recorded!r} ({recorded_rows} tokens) but "
                f"{report.base_model!r} has {rows}. Pass the model the adapter was trained on."
            )
    if report.tokenizer_source != report.adapter_path:
        return
    tokenizer = AutoTokenizer.from_pretrained(report.adapter_path)
    if len(tokenizer) > rows:
        raise ValueError(
            f"vocabulary mismatch: the adapter's tokenizer has {len(tokenizer)} tokens but the embedding of "
            f"{report.base_model!r} has {rows} rows and the adapter saved no resized embeddings. Pass the base model "
            "the adapter was trained on, or retrain saving the embeddings (save_embedding_layers=True)."
        )
    if not saved and _has_tokenizer(report.base_model):
        if tokenizer.get_vocab() != AutoTokenizer.from_pretrained(report.base_model).get_vocab():
            raise ValueError(
                f"vocabulary mismatch: the adapter's tokenizer differs from the tokenizer of {report.base_model!r}. "
                "Pass the base model the adapter was trained on."
            )
