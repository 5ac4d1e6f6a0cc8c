"""Checks that turn bad input into one clear error (what is wrong, and the fix) before any long work starts.

`EMOTrainer` calls `validate_trainer_inputs` before the model is loaded and `validate_prepared_trainer` once the model
is loaded and the datasets are tokenized, before the first step. Each `check_*` function is usable on its own (the
`emo-calibrate` commands call them before building a trainer). Every guarded case is listed in docs/troubleshooting.md.
"""

import inspect
import logging
import os

from .data_checks import check_dataset, check_tokenizer_padding, check_training_targets, count_targets
from .lora_presets import check_lora_targets
from .loss_options import SHIFT_LABELS_ERROR, check_config_loss_options, check_trainer_loss_options
from .output_space import check_disk_space, check_output_dir, estimate_output_bytes
from .sharding_checks import check_peft_method, check_sharding


logger = logging.getLogger(__name__)

__all__ = [
    "SHIFT_LABELS_ERROR",
    "check_causal_lm",
    "check_causal_lm_instance",
    "check_config_loss_options",
    "check_dataset",
    "check_device_precision",
    "check_disk_space",
    "check_mixed_precision_request",
    "check_model_path",
    "check_model_weights",
    "check_output_dir",
    "check_peft_method",
    "check_quantization",
    "check_sharding",
    "check_tokenizer_padding",
    "check_trainer_loss_options",
    "check_training_targets",
    "count_targets",
    "estimate_output_bytes",
    "validate_prepared_trainer",
    "trainer_arguments_by_name",
    "validate_trainer_inputs",
]


# ---- the model --------------------------------------------------------------------------------------------------


def _looks_like_path(name: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else (absolute, relative, nested) can only be a local path.
    return name.startswith(("/", "./", "../", "~", ".\\")) or "\\" in name or name.count("/") > 1


def check_model_path(name_or_path: str, *, revision: str | None = None, cache_dir: str | None = None) -> None:
    """Check that a model id / folder can be loaded: a local model folder, or a Hub id that is cached when offline."""
    path = os.path.expanduser(name_or_path)
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "config.json")):
            return
        if os.path.isfile(os.path.join(path, "adapter_config.json")):
            raise ValueError(
                f"{name_or_path} holds a PEFT adapter, not a model (no config.json). Pass the base model as the model "
                "and this folder as resume_from_checkpoint (to continue training) or as the adapter to merge."
            )
        raise ValueError(f"{name_or_path} is not a model folder: it has no config.json. Pass the folder of a model.")
    if os.path.exists(path):
        raise ValueError(f"{name_or_path} is a file; pass the model's folder (with config.json) or a Hub id.")
    if _looks_like_path(name_or_path):
        raise ValueError(f"The model path {name_or_path} does not exist. Check the path (relative to {os.getcwd()}).")
    from huggingface_hub import is_offline_mode, try_to_load_from_cache

    cached = try_to_load_from_cache(name_or_path, "config.json", cache_dir=cache_dir, revision=revision)
    if is_offline_mode() and not isinstance(cached, str):
        raise ValueError(
            f"{name_or_path} is neither a local folder nor in the Hugging Face cache, and offline mode "
            "(HF_HUB_OFFLINE=1) forbids downloading it. Download it first, or pass the path of a local model folder."
        )


def _causal_lm_class_names() -> set[str]:
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    return set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()) | set(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.values())


def _is_causal_lm_name(name: str, known: set[str]) -> bool:
    return name in known or name.endswith(("ForCausalLM", "LMHeadModel"))


def _not_causal_error(what: str, arch: str) -> ValueError:
    return ValueError(
        f"{what} is a {arch}, not a causal language model with an LM head. EMO trains next-token prediction: use a "
        "decoder-only checkpoint whose architecture is a `...ForCausalLM` (e.g. LlamaForCausalLM)."
    )


def check_causal_lm(
    name_or_path: str, *, revision: str | None = None, trust_remote_code: bool = False, cache_dir: str | None = None
):
    """Check from its config alone (no weights loaded) that `name_or_path` is a causal LM. Returns the config."""
    check_model_path(name_or_path, revision=revision, cache_dir=cache_dir)
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(
            name_or_path, revision=revision, trust_remote_code=trust_remote_code, cache_dir=cache_dir
        )
    except ValueError as error:
        if "trust_remote_code" in str(error):
            raise  # transformers' own message names the option
        raise ValueError(f"Cannot read the config of {name_or_path}: {error}") from error
    architectures = getattr(config, "architectures", None) or []
    if not architectures:
        raise ValueError(
            f"The config of {name_or_path} lists no `architectures`, so the model class is unknown. Load it yourself "
            "with AutoModelForCausalLM.from_pretrained(...) and pass the model object."
        )
    auto_map = getattr(config, "auto_map", None) or {}
    if not (_is_causal_lm_name(architectures[0], _causal_lm_class_names()) or "AutoModelForCausalLM" in auto_map):
        raise _not_causal_error(f"{name_or_path} ({config.model_type})", architectures[0])
    return config


def check_causal_lm_instance(model) -> None:
    """Check that a model object (possibly PEFT-wrapped) is a causal LM with an output embedding."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    known = _causal_lm_class_names()
    names = [cls.__name__ for cls in type(base).__mro__]
    if getattr(getattr(base, "config", None), "is_encoder_decoder", False) or not any(
        _is_causal_lm_name(name, known) for name in names
    ):
        raise _not_causal_error("The model", type(base).__name__)
    if base.get_output_embeddings() is None:
        raise _not_causal_error("The model", f"{type(base).__name__} without output embedding")


def check_model_weights(folder: str, *, allow_pickle: bool = False) -> None:
    """Refuse a local model folder whose weights exist only as pickle files (`.bin`, `.pt`), unless allowed."""
    if not os.path.isdir(folder):
        return  # a Hub id: `use_safetensors=True` makes transformers refuse pickles there
    names = os.listdir(folder)
    if any(n.endswith(".safetensors") for n in names) or allow_pickle:
        return
    pickles = sorted(n for n in names if n.endswith((".bin", ".pt", ".pth", ".ckpt")))
    if pickles:
        raise ValueError(
            f"{folder} holds its weights only as pickle files ({', '.join(pickles[:3])}); pickle can run code when "
            "loaded, so they are refused. Convert them once, in a trusted environment, with "
            "`AutoModelForCausalLM.from_pretrained(path).save_pretrained(path)` (writes safetensors), or, if you "
            "trust the file, allow it with model_init_kwargs={'use_safetensors': False} (read with weights_only=True)."
        )


# ---- hardware and precision ---------------------------------------------------------------------------------------


def check_mixed_precision_request(config) -> None:
    """Called by `EMOConfig` before `TrainingArguments` validates: bf16 where the hardware cannot do it."""
    import torch
    from transformers.utils import is_torch_bf16_gpu_available, is_torch_xla_available

    wants_bf16 = config.bf16 or (config.bf16 is None and not config.fp16) or config.bf16_full_eval
    if not wants_bf16 or config.use_cpu or is_torch_bf16_gpu_available() or is_torch_xla_available():
        return
    if torch.cuda.is_available():
        raise ValueError(
            f"bf16 was asked for, but this GPU ({torch.cuda.get_device_name()}) has no bfloat16 support (it needs an "
            "Ampere or newer GPU). Set fp16=True (with bf16=False) or bf16=False for float32."
        )
    raise ValueError(
        "bf16=True was asked for, but no GPU with bfloat16 support was found. Set bf16=False to train in float32, or "
        "use_cpu=True to train on the CPU with bfloat16 autocast."
    )


def check_device_precision(args) -> None:
    """fp16 mixed precision needs a GPU: on the CPU it would be silently ignored."""
    if args.fp16 and args.device.type == "cpu":
        raise ValueError(
            "fp16=True was asked for, but training runs on the CPU, where fp16 mixed precision is not available (it "
            "would silently train in float32). Set fp16=False, or bf16=True with use_cpu=True for CPU autocast."
        )


def _wants_bitsandbytes(quantization_config) -> bool:
    if quantization_config is None:
        return False
    get = (
        quantization_config.get
        if isinstance(quantization_config, dict)
        else lambda k: getattr(quantization_config, k, None)
    )
    return bool(get("load_in_4bit") or get("load_in_8bit"))


def check_quantization(quantization_config, device_type: str) -> None:
    """4-bit / 8-bit loading needs bitsandbytes with a backend for the device the model trains on."""
    if not _wants_bitsandbytes(quantization_config):
        return
    fix = "Install a bitsandbytes build for this machine (`pip install -U bitsandbytes`) or drop load_in_4bit/8bit."
    try:
        import bitsandbytes as bnb
    except Exception as error:  # ImportError, or a broken native library raising at import
        raise ValueError(
            f"4-bit/8-bit loading needs bitsandbytes, which cannot be imported ({error}). {fix}"
        ) from None
    supported = getattr(bnb, "supported_torch_devices", {"cuda"})
    if device_type not in supported:
        raise ValueError(
            f"bitsandbytes {bnb.__version__} has no backend for the {device_type!r} device that would train this model "
            f"(it supports {sorted(supported)}). {fix}"
        )
    if device_type == "cuda":
        from bitsandbytes.cextension import ErrorHandlerMockBNBNativeLibrary, lib

        if isinstance(lib, ErrorHandlerMockBNBNativeLibrary):
            raise ValueError(f"bitsandbytes' CUDA library failed to load, so 4-bit layers cannot run. {fix}")


# ---- what EMOTrainer calls ----------------------------------------------------------------------------------------


def trainer_arguments_by_name(model, args, pargs: tuple = (), kwargs: dict | None = None) -> dict:
    """The arguments of `SFTTrainer.__init__(model, args, *pargs, **kwargs)` other than `model` and `args`, by name
    (bound once, so that the checks and the perplexity budget read the same values)."""
    from trl import SFTTrainer

    bound = inspect.signature(SFTTrainer.__init__).bind(None, model, args, *pargs, **(kwargs or {})).arguments
    return {name: value for name, value in bound.items() if name not in ("self", "model", "args")}


def validate_trainer_inputs(model, args, kwargs: dict) -> dict:
    """Checks run by `EMOTrainer.__init__` before `SFTTrainer.__init__` loads anything heavy.

    Args:
        kwargs (`dict`): the trainer's other arguments by name (`trainer_arguments_by_name`).

    Returns a copy of `kwargs`, where a tokenizer that SFTTrainer would have loaded after the model
    (`processing_class=None` with a model path) is loaded now, so that a missing or unusable tokenizer fails before
    the weights are read.
    """
    kwargs = dict(kwargs)
    bound = kwargs
    check_output_dir(args.output_dir)
    check_device_precision(args)
    check_sharding(args)
    check_peft_method(model, bound.get("peft_config"))
    check_trainer_loss_options(model, args, bound)
    init_kwargs = args.model_init_kwargs if isinstance(args.model_init_kwargs, dict) else {}
    check_quantization(bound.get("quantization_config") or init_kwargs.get("quantization_config"), args.device.type)
    processing_class = bound.get("processing_class")
    if isinstance(model, str):
        revision, cache_dir = init_kwargs.get("revision"), init_kwargs.get("cache_dir")
        config = check_causal_lm(
            model, revision=revision, trust_remote_code=args.trust_remote_code, cache_dir=cache_dir
        )
        check_lora_targets(bound.get("peft_config"), config.model_type)
        check_model_weights(os.path.expanduser(model), allow_pickle=init_kwargs.get("use_safetensors") is False)
        # Safe by default: transformers must not fall back to pickle weights unless the user allowed it.
        args.model_init_kwargs = {"use_safetensors": True, **init_kwargs}
        if processing_class is None:
            from transformers import AutoProcessor

            try:
                processing_class = AutoProcessor.from_pretrained(
                    model, revision=revision, trust_remote_code=args.trust_remote_code, cache_dir=cache_dir
                )
            except (OSError, ValueError) as error:
                raise ValueError(
                    f"Cannot load a tokenizer from {model} ({error}). Save the model's tokenizer there "
                    "(tokenizer.save_pretrained(folder)) or pass it as processing_class."
                ) from None
            kwargs["processing_class"] = processing_class
    else:
        check_causal_lm_instance(model)
        check_lora_targets(bound.get("peft_config"), getattr(getattr(model, "config", None), "model_type", None))
    check_tokenizer_padding(processing_class)
    for name in ("train_dataset", "eval_dataset"):
        check_dataset(bound.get(name), args, name, bound.get("formatting_func"))
    return kwargs


def validate_prepared_trainer(trainer) -> None:
    """Checks run at the end of `EMOTrainer.__init__`: tokenized data and disk space, before the first step."""
    check_training_targets(trainer.train_dataset, "train_dataset")
    check_training_targets(trainer.eval_dataset, "eval_dataset")
    check_disk_space(trainer)
