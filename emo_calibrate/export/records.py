"""The training record written next to an adapter, and the check of a re-derived 4-bit base against it.

`EMOTrainer.save_model` writes `emo_training.json` (plain JSON, fields in docs/merge.md): the EMO settings and run
facts, the base and its load dtype, and for a 4-bit base its settings, where and with which versions it was
quantised, and SHA-256 hashes of three layers' 4-bit codes. `merge_adapter` reads it to merge into the base that was
trained, and compares the hashes with the 4-bit base it re-derives (`check_codes`). Nothing is unpickled:
`training_args.bin`, the pickle `Trainer.save_model` writes, is never opened.
"""

import dataclasses
import hashlib
import json
import os
from typing import Any


__all__ = [
    "RECORD_NAME",
    "block_hashes",
    "check_codes",
    "code_mismatch_message",
    "describe_code_check",
    "read_training_record",
    "save_training_record",
]

RECORD_NAME = "emo_training.json"
# Written by emo_calibrate 0.1 before the training record: a BitsAndBytesConfig dict plus "_load_dtype".
LEGACY_QUANTIZATION_RECORD = "quantization_config.json"
_RUN_FIELDS = (
    "learning_rate", "lr_scheduler_type", "max_steps", "num_train_epochs", "per_device_train_batch_size",
    "gradient_accumulation_steps", "max_length", "packing", "bf16", "fp16", "seed",
)  # fmt: skip


def save_training_record(model, output_dir: str | os.PathLike, args=None, state=None, budget=None) -> str:
    """Write `output_dir/emo_training.json` for `model` (a `PeftModel` or a plain model, unwrapped from any accelerator
    wrapper) trained with `args` (an `EMOConfig`: its `emo_*` fields and `_RUN_FIELDS`) up to `state` (`TrainerState`:
    the global step and the last logged loss). `budget` is what the perplexity budget recorded (`PerplexityBudget.
    record()`: the budget, how its held-out split was made, the start perplexity, the kept step). Returns the path
    written."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    dtype = str(base.dtype).removeprefix("torch.")
    names = [f.name for f in dataclasses.fields(args) if f.name.startswith("emo_")] if args is not None else []
    settings = {name: getattr(args, name) for name in names + list(_RUN_FIELDS) if hasattr(args, name)}
    if state is not None:
        losses = [entry["loss"] for entry in state.log_history if "loss" in entry]
        settings.update(global_step=state.global_step, last_logged_loss=losses[-1] if losses else None)
    config, quantization = getattr(base.config, "quantization_config", None), None
    if config is not None:
        config = json.loads(config.to_json_string(use_diff=False)) if hasattr(config, "to_json_string") else config
        quantization = {"config": dict(config), "load_dtype": dtype}
        if _linear4bit_layers(base):  # bitsandbytes 4-bit: where it was quantised, and hashes of its codes
            quantization.update(_environment(base), block_sha256=block_hashes(base))
    record = {
        "format": 1,
        "base_model": base.config._name_or_path,
        "base_dtype": dtype,
        "quantization": quantization,
        "settings": settings,
        "perplexity_budget": budget,
    }
    path = os.path.join(output_dir, RECORD_NAME)
    with open(path, "w") as f:
        json.dump(record, f, indent=2, default=str)
    return path


def read_training_record(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The record of `folder` (a legacy `quantization_config.json` is read as one), or None when it has none."""
    for name in (RECORD_NAME, LEGACY_QUANTIZATION_RECORD):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            try:
                with open(path) as f:
                    record = json.load(f)
            except (OSError, json.JSONDecodeError) as err:
                raise ValueError(f"cannot read {path} ({err}); restore it or delete it to merge without it.") from err
            if name == RECORD_NAME:
                return record
            return {"format": 0, "quantization": {"config": record, "load_dtype": record.pop("_load_dtype", None)}}
    return None


def _linear4bit_layers(model) -> dict:
    """The `bnb.nn.Linear4bit` modules of `model` by their name in the plain (non-PEFT) model, in module order."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return {}
    model = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {
        name.removesuffix(".base_layer"): module  # PEFT wraps each target layer as `<name>.base_layer`
        for name, module in model.named_modules()
        if isinstance(module, bnb.nn.Linear4bit)
    }


def _environment(model) -> dict:
    """Where and with what the 4-bit layers of `model` were quantised."""
    import bitsandbytes
    import torch

    device = next(iter(_linear4bit_layers(model).values())).weight.device  # where the 4-bit codes live
    return {
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "bitsandbytes": bitsandbytes.__version__,
        "torch": torch.__version__,
    }


def block_hashes(model, names: list[str] | None = None) -> dict[str, str | None]:
    """SHA-256 of the 4-bit codes and quantisation state of the `bnb.nn.Linear4bit` layers `names` of `model` (a 4-bit
    model or a `PeftModel` around one; default: the first, middle and last 4-bit layer). None for a layer that is
    absent or was repacked by bitsandbytes' CPU kernels (its bytes are then no longer the codes)."""
    import torch

    layers = _linear4bit_layers(model)
    if names is None:
        ordered = list(layers)
        names = list(dict.fromkeys(ordered[i] for i in (0, len(ordered) // 2, -1))) if ordered else []
    hashes = {}
    for name in names:
        module = layers.get(name)
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is None or getattr(state, "packing_format_for_cpu", False):
            hashes[name] = None
            continue
        digest = hashlib.sha256()
        # The packed uint8 codes, absmax (quantised itself under double quantisation), code tables, shape, dtype.
        for key, value in sorted({"codes": module.weight.data, **state.as_dict()}.items()):
            digest.update(key.encode())
            if torch.is_tensor(value):
                value = value.detach().reshape(-1).contiguous().cpu()
                digest.update(
                    f"{value.dtype}{tuple(value.shape)}".encode() + value.view(torch.uint8).numpy().tobytes()
                )
            else:
                digest.update(repr(value).encode())
        hashes[name] = digest.hexdigest()
    return hashes


def check_codes(model, quantization: dict | None) -> dict:
    """Compare the 4-bit layers of `model` with the hashes of a quantisation record: `status` (`"match"`, `"mismatch"`
    or `"not recorded"`), `blocks` compared, `differing` names, and where and with what each side was quantised
    (`recorded` / `merge`: device, device name, versions)."""
    quantization = quantization or {}
    recorded = {name: digest for name, digest in (quantization.get("block_sha256") or {}).items() if digest}
    found, here = block_hashes(model, list(recorded)), _environment(model)
    differing = [name for name, digest in recorded.items() if found[name] != digest]
    status = "mismatch" if differing else "match" if recorded else "not recorded"
    trained = {key: quantization.get(key) for key in here}
    return {"status": status, "blocks": len(recorded), "differing": differing, "recorded": trained, "merge": here}


def describe_code_check(check: dict) -> str:
    """One line for the summary and the card, e.g. `match: 3 of 3 blocks (training: cpu, bitsandbytes 0.50.2)`."""
    if check["status"] == "not recorded":
        return "not checked: the adapter records no hashes of its 4-bit base"
    recorded, here = check["recorded"], check["merge"]
    where = (
        f"training quantised on {recorded['device']} with bitsandbytes {recorded['bitsandbytes']}, this merge on "
        f"{here['device']} with bitsandbytes {here['bitsandbytes']}"
    )
    if check["status"] == "match":
        return f"match: {check['blocks']} of {check['blocks']} blocks ({where})"
    differing = ", ".join(check["differing"])
    return f"MISMATCH: {len(check['differing'])} of {check['blocks']} blocks differ ({differing}; {where})"


def code_mismatch_message(check: dict, base_model: str, adapter_path: str) -> str:
    """Why a merge stops on a code mismatch, and how to merge into the trained base instead."""
    recorded, here = check["recorded"], check["merge"]
    fixes = []
    if recorded["device"] and recorded["device"] != here["device"]:
        fixes.append(f"merge where training quantised, with --device {recorded['device']}")
    if recorded["bitsandbytes"] and recorded["bitsandbytes"] != here["bitsandbytes"]:
        fixes.append(f"install bitsandbytes=={recorded['bitsandbytes']}")
    fixes = fixes or ["pass the checkpoint the adapter was trained on as --model_name_or_path"]
    return (
        f"the 4-bit base rebuilt from {base_model!r} is not the one the adapter {adapter_path!r} was trained on: "
        f"{describe_code_check(check)}. To merge into the trained base: {'; '.join(fixes)}. Or pass "
        "allow_code_mismatch=True (--allow_code_mismatch) to merge anyway; the card and report then record the "
        "difference. Nothing was written."
    )
