"""The records next to an adapter: how its base was quantised (written at save time), and what a training run left.

The quantisation record (`quantization_config.json`) tells `merge_adapter` how the base was quantised during
training, so the merge can rebuild exactly the weights the adapter was trained against.

`Trainer.save_model` writes `training_args.bin`, a *pickle* of the training arguments (an `EMOConfig` for our
trainer). Unpickling it normally imports and calls whatever the file names, so a downloaded adapter could run code.
`read_training_args` instead unpickles with a restricted unpickler that turns every class the file names into an inert
stub and keeps only plain data (numbers, strings, lists, dicts). `trainer_state.json` is plain JSON.
"""

import builtins
import copyreg
import io
import json
import os
import pickle
import zipfile
from typing import Any


__all__ = [
    "QUANTIZATION_RECORD_NAME",
    "load_quantization_record",
    "read_trainer_state",
    "read_training_args",
    "save_quantization_record",
    "summarize_training_run",
]

QUANTIZATION_RECORD_NAME = "quantization_config.json"

# Built-in constructors a pickle of a dataclass may legitimately call; none of them can run code.
_SAFE_BUILTINS = {"dict", "list", "tuple", "set", "frozenset", "object", "bytearray", "complex", "int", "float", "str"}


class _Opaque:
    """Stands in for any class named by the pickle: records constructor arguments and state, runs nothing."""

    def __init__(self, *args, **kwargs):
        self._args = args

    def __setstate__(self, state):
        self._state = state


class _InspectingUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) == ("copyreg", "_reconstructor"):
            return copyreg._reconstructor  # only calls object.__new__ on the (stub) class
        if module == "builtins" and name in _SAFE_BUILTINS:
            return getattr(builtins, name)
        return type(name, (_Opaque,), {"__module__": module})

    def persistent_load(self, pid):  # tensor storages: not needed for arguments
        return None


def _to_plain(obj: Any, depth: int = 0) -> Any:
    """Turn stubs into dicts / values: dataclass-like objects become their field dict, enums their value."""
    if depth > 20:
        return None
    if isinstance(obj, dict):
        return {str(k): _to_plain(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set | frozenset):
        return [_to_plain(v, depth + 1) for v in obj]
    if isinstance(obj, type) and issubclass(obj, _Opaque):  # a class object, e.g. `torch.bfloat16`
        return obj.__name__
    if isinstance(obj, _Opaque):
        state = getattr(obj, "_state", None)
        if state is None and obj.__dict__.keys() - {"_args"}:
            state = {k: v for k, v in obj.__dict__.items() if k != "_args"}
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):  # (dict, slots) state
            state = {**(state[0] or {}), **state[1]}
        if state is not None:
            return _to_plain(state, depth + 1)
        args = getattr(obj, "_args", ())
        return _to_plain(args[0] if len(args) == 1 else list(args), depth + 1)  # enums: their value
    if isinstance(obj, bool | int | float | str) or obj is None:
        return obj
    return repr(obj)


def read_training_args(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The training arguments saved in `folder/training_args.bin`, as a plain dict (None if absent or unreadable).

    Nothing from the file is imported or executed (see the module docstring).
    """
    path = os.path.join(folder, "training_args.bin")
    if not os.path.isfile(path):
        return None
    try:
        with zipfile.ZipFile(path) as archive:  # the torch.save format: a zip holding `<name>/data.pkl`
            name = next(n for n in archive.namelist() if n.endswith("data.pkl"))
            data = archive.read(name)
        args = _to_plain(_InspectingUnpickler(io.BytesIO(data)).load())
    except (zipfile.BadZipFile, StopIteration, pickle.UnpicklingError, EOFError, ValueError, TypeError):
        return None
    return args if isinstance(args, dict) else None


def read_trainer_state(folder: str | os.PathLike) -> dict[str, Any] | None:
    """`folder/trainer_state.json` (written by `Trainer.save_state` and in checkpoints), or None."""
    path = os.path.join(folder, "trainer_state.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def summarize_training_run(folder: str | os.PathLike) -> dict[str, Any]:
    """The EMO settings and a few run facts found in an adapter folder (empty when it holds no record).

    Returns:
        `dict`: `emo_*` fields and basic hyper-parameters from the training arguments, plus `global_step` and the
        last logged training loss from the trainer state, when present.
    """
    summary: dict[str, Any] = {}
    args = read_training_args(folder) or {}
    for key in sorted(args):
        if key.startswith("emo_"):
            summary[key] = args[key]
    for key in ("learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size", "max_length"):
        if key in args:
            summary[key] = args[key]
    state = read_trainer_state(folder) or {}
    if "global_step" in state:
        summary["global_step"] = state["global_step"]
    losses = [entry["loss"] for entry in state.get("log_history", []) if "loss" in entry]
    if losses:
        summary["last_logged_loss"] = losses[-1]
    return summary


def save_quantization_record(model, output_dir: str | os.PathLike) -> str | None:
    """Write how `model` was quantised (its `BitsAndBytesConfig` and load dtype) next to a saved adapter.

    Trainers call this after `save_model`; `merge_adapter(merge_base="dequantized")` reads it back to rebuild the exact
    4-bit weights the adapter was trained against. Does nothing (returns None) for an unquantised model.

    Returns:
        `str | None`: the path written.
    """
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    if config is None:
        return None
    record = json.loads(config.to_json_string(use_diff=False)) if hasattr(config, "to_json_string") else dict(config)
    dtype = getattr(model, "dtype", None)
    record["_load_dtype"] = str(dtype).removeprefix("torch.") if dtype is not None else None
    path = os.path.join(output_dir, QUANTIZATION_RECORD_NAME)
    with open(path, "w") as f:
        json.dump(record, f, indent=2, sort_keys=True, default=str)
    return path


def load_quantization_record(folder: str | os.PathLike) -> dict[str, Any] | None:
    """Read the record written by `save_quantization_record`, or None when the folder has none."""
    path = os.path.join(folder, QUANTIZATION_RECORD_NAME)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)
