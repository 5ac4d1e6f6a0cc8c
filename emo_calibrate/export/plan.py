"""Everything `merge_adapter` decides before loading weights: inputs checked, the trained base resolved, refusals.

All refusals are `ValueError`s that name the input and the fix, raised in seconds (configs, tokenizers, the adapter's
JSON record and tensor headers only), before any weights are loaded. The one check that needs weights, the 4-bit codes
against the record, runs in `merge.py` before merging.
"""

import os
from dataclasses import dataclass, field
from typing import Any

from .parity import PARITY_TOLERANCES
from .records import RECORD_NAME, read_training_record


__all__ = ["DTYPES", "MERGE_BASES", "MergePlan", "make_merge_plan"]

MERGE_BASES = ("dequantized", "original")
DTYPES = ("bfloat16", "float16", "float32")
DEVICES = ("cpu", "cuda")
# Assumed only when merge_base="dequantized" is asked for an adapter without a record (the QLoRA paper's setting).
DEFAULT_4BIT = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True}


@dataclass
class MergePlan:
    """The resolved inputs of a merge.

    `trained` says what the adapter was trained on: `"4-bit"`, `"unquantised"`, `"unknown"` (no record) or
    `"other quantisation"`; `trained_dtype` is the dtype the base weights were loaded in for training (when known).
    `quantization_config` is the `BitsAndBytesConfig` that rebuilds the trained 4-bit base (None when the checkpoint
    is itself saved in 4-bit, or when no 4-bit base is involved).
    """

    adapter_path: str
    output_dir: str
    base_model: str
    merge_base: str
    merge_base_reason: str
    dtype: str
    device: str
    trained: str
    trained_dtype: str | None
    quantization_config: Any
    quantization_source: str
    tokenizer_source: str
    record: dict | None = None
    resize_embeddings_to: int | None = None
    emo_settings: dict = field(default_factory=dict)

    @property
    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype)

    @property
    def quantization(self) -> dict | None:
        """The recorded 4-bit quantisation (config, device, versions, hashes), or None."""
        return (self.record or {}).get("quantization")

    def tolerance(self, max_abs_logit_diff: float | None, mean_kl: float | None) -> dict:
        default_abs, default_kl = PARITY_TOLERANCES[self.dtype]
        return {
            "max_abs_logit_diff": default_abs if max_abs_logit_diff is None else float(max_abs_logit_diff),
            "mean_kl": default_kl if mean_kl is None else float(mean_kl),
        }

    def quantization_dict(self) -> dict | None:
        if self.quantization_config is None:
            return None
        keys = ("bnb_4bit_quant_type", "bnb_4bit_use_double_quant", "bnb_4bit_compute_dtype", "bnb_4bit_quant_storage")
        out = {k: getattr(self.quantization_config, k) for k in keys}
        out = {k: str(v).removeprefix("torch.") if not isinstance(v, bool | str) else v for k, v in out.items()}
        return {**out, "load_dtype": self.trained_dtype}

    def load_tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.tokenizer_source)


def make_merge_plan(
    adapter_path,
    output_dir,
    *,
    model_name_or_path=None,
    merge_base=None,
    dtype="bfloat16",
    device=None,
    overwrite=False,
    bnb_4bit_quant_type=None,
    bnb_4bit_use_double_quant=None,
) -> MergePlan:
    """Check every input of `merge_adapter` and resolve its settings; raises `ValueError` on bad input."""
    import torch
    from peft import PeftConfig
    from transformers import AutoConfig, BitsAndBytesConfig

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
    overrides = {"bnb_4bit_quant_type": bnb_4bit_quant_type, "bnb_4bit_use_double_quant": bnb_4bit_use_double_quant}
    overrides = {key: value for key, value in overrides.items() if value is not None}
    if overrides:
        if settings is None:
            raise ValueError(
                f"{', '.join(overrides)} set, but no 4-bit base is involved ({trained} training base, merge_base="
                f"{merge_base!r}); drop them, or pass merge_base='dequantized' for an adapter trained on 4-bit."
            )
        settings, source = {**settings, **overrides}, source + " + overrides"
    if device is None:  # where training quantised the base, so that the codes are the same (docs/merge.md)
        recorded = ((record or {}).get("quantization") or {}).get("device")
        device = "cuda" if recorded == "cuda" and torch.cuda.is_available() else "cpu"
    tokenizer_source = adapter_path if _has_tokenizer(adapter_path) else base_model
    return MergePlan(
        adapter_path=adapter_path,
        output_dir=output_dir,
        base_model=base_model,
        merge_base=merge_base,
        merge_base_reason=reason,
        dtype=dtype,
        device=device,
        trained=trained,
        trained_dtype=trained_dtype if trained_dtype in DTYPES else dtype,
        quantization_config=None if settings is None else BitsAndBytesConfig.from_dict(settings),
        quantization_source=source,
        tokenizer_source=tokenizer_source,
        record=record,
        resize_embeddings_to=_check_vocabulary(adapter_path, peft_config, base_model, base_config, tokenizer_source),
        emo_settings=(record or {}).get("settings") or {},
    )


def _choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(map(repr, choices))}.")


def _check_output_dir(output_dir, adapter_path: str, overwrite: bool) -> str:
    output_dir = os.path.abspath(os.fspath(output_dir))
    if output_dir == adapter_path or adapter_path.startswith(output_dir + os.sep):
        raise ValueError(f"output_dir {output_dir!r} would replace the adapter folder; choose another output_dir.")
    if os.path.exists(output_dir):
        if not os.path.isdir(output_dir):
            raise ValueError(f"output_dir {output_dir!r} exists and is not a folder.")
        if os.listdir(output_dir) and not overwrite:
            raise ValueError(
                f"output_dir {output_dir!r} exists and is not empty; pass overwrite=True (--overwrite) to replace it."
            )
    return output_dir


def _is_bnb_4bit(settings: dict) -> bool:
    method = str(settings.get("quant_method", "bitsandbytes"))
    return method in ("bitsandbytes", "QuantizationMethod.BITS_AND_BYTES") and bool(
        settings.get("load_in_4bit") or settings.get("_load_in_4bit")
    )


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
    name = RECORD_NAME if record.get("format") else "quantization_config.json, a legacy record"
    quantization = record.get("quantization")
    if quantization is None:
        return "unquantised", record.get("base_dtype"), None, f"adapter record ({name})"
    if not _is_bnb_4bit(quantization["config"]):
        if merge_base != "original":
            raise ValueError(
                f"the adapter was trained on a base quantised as {quantization['config']} (not bitsandbytes 4-bit), "
                "which cannot be rebuilt for merging; pass merge_base='original'."
            )
        return "other quantisation", None, None, f"adapter record ({name})"
    return "4-bit", quantization.get("load_dtype"), dict(quantization["config"]), f"adapter record ({name})"


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


def _embedding_names(base_config) -> tuple[str | None, str | None]:
    """Module names of the input and output embeddings, read off a weightless (meta) copy of the model."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(base_config)
    except Exception:  # an architecture we cannot build: fall back to the usual names
        return "model.embed_tokens", "lm_head"
    names = {id(module): name for name, module in skeleton.named_modules()}
    output = skeleton.get_output_embeddings()
    return names.get(id(skeleton.get_input_embeddings())), names.get(id(output)) if output is not None else None


def _saved_embedding_rows(adapter_path: str, module_names) -> dict[str, int]:
    """Rows of the full embedding matrices the adapter saved (resized vocabularies), keyed by module name."""
    from safetensors import safe_open

    path = os.path.join(adapter_path, "adapter_model.safetensors")
    if not os.path.isfile(path):
        return {}
    wanted = {f"{name}.weight": name for name in module_names if name}
    rows = {}
    with safe_open(path, framework="pt") as f:
        for key in f.keys():
            plain = key.removeprefix("base_model.model.").replace(".modules_to_save", "").replace(".default", "")
            if plain in wanted:
                rows[wanted[plain]] = f.get_slice(key).get_shape()[0]
    return rows


def _check_vocabulary(adapter_path, peft_config, base_model, base_config, tokenizer_source) -> int | None:
    """Refuse adapters whose vocabulary differs from the base model's; return the size to resize to, if any."""
    from transformers import AutoConfig, AutoTokenizer

    text_config = base_config.get_text_config()
    model_rows = text_config.vocab_size
    in_name, out_name = _embedding_names(base_config)
    tied = bool(getattr(text_config, "tie_word_embeddings", False))
    saved = _saved_embedding_rows(adapter_path, (in_name, out_name))
    resize_to = None
    if saved:
        sizes = set(saved.values())
        if len(sizes) > 1:
            raise ValueError(f"the adapter in {adapter_path!r} saved embeddings of different sizes: {saved}.")
        size = sizes.pop()
        if size != model_rows:
            if not tied and out_name is not None and len(saved) < 2:
                raise ValueError(
                    f"the adapter resized the vocabulary to {size} but saved only {list(saved)}; the other "
                    f"embedding of this untied model cannot be rebuilt. Retrain with modules_to_save=[{in_name!r}, "
                    f"{out_name!r}] (or save_embedding_layers=True)."
                )
            resize_to = size

    recorded = peft_config.base_model_name_or_path
    if not saved and recorded and recorded != base_model and os.path.isdir(recorded):
        recorded_rows = AutoConfig.from_pretrained(recorded).get_text_config().vocab_size
        if recorded_rows != model_rows:
            raise ValueError(
                f"vocabulary mismatch: the adapter was trained on {recorded!r} ({recorded_rows} tokens) but "
                f"{base_model!r} has {model_rows}. Pass the model the adapter was trained on."
            )
    if tokenizer_source == adapter_path:
        tokenizer = AutoTokenizer.from_pretrained(adapter_path)
        rows = resize_to or model_rows
        if len(tokenizer) > rows:
            raise ValueError(
                f"vocabulary mismatch: the adapter's tokenizer has {len(tokenizer)} tokens but the embedding of "
                f"{base_model!r} has {rows} rows and the adapter saved no resized embeddings. Pass the base model "
                "the adapter was trained on, or retrain saving the embeddings (save_embedding_layers=True)."
            )
        if not saved and _has_tokenizer(base_model):
            if tokenizer.get_vocab() != AutoTokenizer.from_pretrained(base_model).get_vocab():
                raise ValueError(
                    f"vocabulary mismatch: the adapter's tokenizer differs from the tokenizer of {base_model!r}. "
                    "Pass the base model the adapter was trained on."
                )
    return resize_to
