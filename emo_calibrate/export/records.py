"""The training record written next to an adapter, and the check of a re-derived 4-bit base against it.

`EMOTrainer.save_model` writes `emo_training.json` (plain JSON) with:

- `settings`: the `emo_*` fields of the config and a few run facts (learning rate, steps, precision, last loss);
- `base_model` and `base_dtype`: the checkpoint trained on and the dtype its weights were loaded in;
- `quantization`: None for an unquantised base; for a quantised one its `BitsAndBytesConfig` (`config`), the
  `load_dtype`, where it was quantised (`device`, `device_name`), the `bitsandbytes` and `torch` versions, and
  `block_sha256`: SHA-256 hashes of the 4-bit codes and quantisation state (absmax, ...) of three fixed layers.

`merge_adapter` reads it to merge into the base that was trained, and compares the hashes with the 4-bit base it
re-derives before merging (`check_codes`). Nothing in an adapter folder is unpickled: `training_args.bin`, the pickle
`Trainer.save_model` writes, is never opened.
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


def save_training_record(model, output_dir: str | os.PathLike, args=None, state=None) -> str:
    """Write `output_dir/emo_training.json` for `model` (a `PeftModel` or a plain model) trained with `args`.

    Args:
        model (`torch.nn.Module`): the trained model, unwrapped from any accelerator wrapper.
        output_dir (`str`): the adapter folder.
        args (`EMOConfig`, *optional*): training arguments; their `emo_*` fields and `_RUN_FIELDS` are recorded.
        state (`TrainerState`, *optional*): for the global step and the last logged loss.

    Returns:
        `str`: the path written.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    settings = {}
    if args is not None:
        settings = {f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.name.startswith("emo_")}
        settings.update({name: getattr(args, name) for name in _RUN_FIELDS if hasattr(args, name)})
    if state is not None:
        settings["global_step"] = state.global_step
        losses = [entry["loss"] for entry in state.log_history if "loss" in entry]
        if losses:
            settings["last_logged_loss"] = losses[-1]
    record = {
        "format": 1,
        "base_model": base.config._name_or_path,
        "base_dtype": _dtype_name(base.dtype),
        "quantization": _quantization_record(base),
        "settings": settings,
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


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


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


def _quantization_record(model) -> dict | None:
    config = getattr(model.config, "quantization_config", None)
    if config is None:
        return None
    config = json.loads(config.to_json_string(use_diff=False)) if hasattr(config, "to_json_string") else dict(config)
    record = {"config": config, "load_dtype": _dtype_name(model.dtype)}
    if _linear4bit_layers(model):
        record.update(_environment(model), block_sha256=block_hashes(model))
    return record


def _environment(model) -> dict:
    """Where and with what the 4-bit layers of `model` were quantised."""
    import torch

    layers = _linear4bit_layers(model)
    device = next(iter(layers.values())).weight.device if layers else torch.device("cpu")
    try:
        from importlib.metadata import version

        bitsandbytes = version("bitsandbytes")
    except ImportError:  # PackageNotFoundError is an ImportError
        bitsandbytes = None
    return {
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "bitsandbytes": bitsandbytes,
        "torch": torch.__version__,
    }


def block_hashes(model, names: list[str] | None = None) -> dict[str, str | None]:
    """SHA-256 of the 4-bit codes and quantisation state of some `bnb.nn.Linear4bit` layers of `model`.

    Args:
        model (`torch.nn.Module`): a model loaded in 4-bit, or a `PeftModel` around one.
        names (`list[str]`, *optional*): layer names; defaults to the first, middle and last 4-bit layer.

    Returns:
        `dict[str, str | None]`: hex digest per name; None for a layer that is absent or was repacked by
        bitsandbytes' CPU kernels (its bytes are then no longer the codes).
    """
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
    """Compare the 4-bit layers of `model` with the hashes of a quantisation record.

    Returns:
        `dict`: `status` (`"match"`, `"mismatch"` or `"not recorded"`), `blocks` compared, `differing` names, and
        where and with what each side was quantised (`recorded` / `merge`: device, device name, versions).
    """
    quantization = quantization or {}
    recorded = {name: digest for name, digest in (quantization.get("block_sha256") or {}).items() if digest}
    here = _environment(model)
    check = {"recorded": {key: quantization.get(key) for key in here}, "merge": here}
    if not recorded:
        return {"status": "not recorded", "blocks": 0, "differing": [], **check}
    found = block_hashes(model, list(recorded))
    differing = [name for name, digest in recorded.items() if found[name] != digest]
    return {"status": "mismatch" if differing else "match", "blocks": len(recorded), "differing": differing, **check}


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
