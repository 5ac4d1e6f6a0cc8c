"""The models `emo-calibrate eval` compares: `[label=]path` specs (a model folder or hub id, a PEFT adapter on its
base, a GGUF file), checked before any evaluation starts, and loaded one at a time for evaluation.
"""

import json
import os
import re
from dataclasses import dataclass

import torch


__all__ = ["ModelSpec", "check_loadable", "find_trainer_state", "load_model", "parse_model_spec"]


@dataclass
class ModelSpec:
    """What to load: `kind` is `"model"` (hub id or folder), `"adapter"` (PEFT folder on `base`) or `"gguf"`."""

    label: str
    path: str
    kind: str
    base: str | None = None


def parse_model_spec(text: str, base_model: str | None = None) -> ModelSpec:
    """Parse `[label=]path` and find out what `path` is; raise a clear error for what cannot be loaded."""
    label, path = None, text
    if "=" in text and not os.path.exists(text):
        label, path = text.split("=", 1)
    label = label or os.path.basename(os.path.normpath(path)) or path
    if os.path.isfile(path) and path.endswith(".gguf"):
        return ModelSpec(label, path, "gguf")
    if os.path.isdir(path):
        adapter_cfg = os.path.join(path, "adapter_config.json")
        if os.path.exists(adapter_cfg):
            with open(adapter_cfg, encoding="utf-8") as f:
                base = base_model or json.load(f).get("base_model_name_or_path")
            if not base:
                raise ValueError(f"Adapter {path} does not name its base model: pass --base_model.")
            parse_model_spec(base)  # the base must be loadable too
            return ModelSpec(label, path, "adapter", base)
        if not os.path.exists(os.path.join(path, "config.json")):
            raise ValueError(f"{path} is neither a model folder (config.json) nor an adapter (adapter_config.json).")
        return ModelSpec(label, path, "model")
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", path):
        raise FileNotFoundError(f"Model {path!r} is not an existing file or folder, nor a model hub id.")
    return ModelSpec(label, path, "model")  # a hub id: `check_loadable` resolves its config


def check_loadable(spec: ModelSpec) -> None:
    """Fail fast (before any evaluation) when a hub id cannot be resolved, e.g. offline and not cached."""
    for path in (spec.path, spec.base):
        if path and not os.path.exists(path):
            from transformers import AutoConfig

            try:
                AutoConfig.from_pretrained(path)
            except Exception as err:
                raise FileNotFoundError(
                    f"Model {path!r} is not a local file or folder and cannot be fetched from the hub ({err}). "
                    "Check the id, or pass a local path."
                ) from err


def _torch_dtype(dtype: str):
    return "auto" if dtype == "auto" else getattr(torch, dtype)


def _load_plain(spec: ModelSpec, dtype: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if spec.kind == "gguf":
        folder, name = os.path.split(os.path.abspath(spec.path))
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=_torch_dtype(dtype))
    else:
        tokenizer = AutoTokenizer.from_pretrained(spec.path)
        model = AutoModelForCausalLM.from_pretrained(spec.path, dtype=_torch_dtype(dtype))
    return model, tokenizer


def load_model(spec: ModelSpec, *, dtype: str = "float32", device: str = "cpu"):
    """Load `spec` for evaluation: `(model, tokenizer)`, the model in eval mode on `device`.

    An adapter is attached to its base with `peft.PeftModel.from_pretrained` (not merged: the evaluated function is
    exactly base + adapter); its own tokenizer files win over the base's when present.
    """
    if spec.kind == "adapter":
        from peft import PeftModel
        from transformers import AutoTokenizer

        model, tokenizer = _load_plain(parse_model_spec(spec.base), dtype)
        if os.path.exists(os.path.join(spec.path, "tokenizer_config.json")):
            tokenizer = AutoTokenizer.from_pretrained(spec.path)
        model = PeftModel.from_pretrained(model, spec.path)
    else:
        model, tokenizer = _load_plain(spec, dtype)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device).eval(), tokenizer


def find_trainer_state(path: str) -> str | None:
    """The `trainer_state.json` of the run that produced `path`: in it, its last `checkpoint-N`, or its parent."""
    if not os.path.isdir(path):
        return None
    here = os.path.join(path, "trainer_state.json")
    if os.path.exists(here):
        return here
    steps = [(int(m.group(1)), d) for d in os.listdir(path) if (m := re.fullmatch(r"checkpoint-(\d+)", d))]
    for _, d in sorted(steps, reverse=True):
        candidate = os.path.join(path, d, "trainer_state.json")
        if os.path.exists(candidate):
            return candidate
    parent = os.path.join(os.path.dirname(os.path.normpath(path)), "trainer_state.json")
    return parent if os.path.exists(parent) else None
