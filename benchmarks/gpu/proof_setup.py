"""Random-weight models of real shapes, a stand-in tokenizer and random token batches, all built offline.

The GPU proof measures memory and speed, which depend on the shapes only, so the weights are random (std 0.02, as
Llama's initialisation) and are quantised to 4-bit NF4 by transformers' own bitsandbytes quantizer while loading: the
bf16 state dict is created directly on the target device and handed to `from_pretrained(None, state_dict=...)`, which
quantises each linear weight as it loads it. That is the path a user's checkpoint takes, without writing a 13 GB
checkpoint to disk first.
"""

import gc
import logging
import time


logger = logging.getLogger(__name__)

__all__ = [
    "SHAPES",
    "build_random_model",
    "build_tokenizer",
    "device_map",
    "free_memory",
    "random_token_dataset",
    "save_random_model",
]

_COMMON = dict(pad_token_id=0, bos_token_id=2, eos_token_id=3, rms_norm_eps=1e-5, tie_word_embeddings=False)

# Llama shapes. The parameter counts are those of the real models; rope settings do not change the cost and are left
# at the library defaults.
SHAPES = {
    "llama2-7b": dict(  # meta-llama/Llama-2-7b-hf: 6.74e9 parameters
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
    ),
    "llama3-8b": dict(  # meta-llama/Meta-Llama-3-8B: 8.03e9 parameters
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
    ),
    "llama3.2-1b": dict(  # meta-llama/Llama-3.2-1B: 1.24e9 parameters, tied embeddings (used by the merge check)
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, tie_word_embeddings=True,
    ),
    "tiny": dict(  # the CPU dry run
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
    ),
    "tiny-tied": dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
    ),
}  # fmt: skip


def llama_config(shape: str, layers: int | None = None):
    from transformers import LlamaConfig

    if shape not in SHAPES:
        raise ValueError(f"unknown model shape {shape!r}; choose from {sorted(SHAPES)}")
    overrides = {"num_hidden_layers": layers} if layers else {}
    return LlamaConfig(**{**_COMMON, **SHAPES[shape], **overrides})


def nf4_config(compute_dtype):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_use_double_quant=True,
    )


def _random_state_dict(config, device, dtype, seed: int) -> dict:
    import torch
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        skeleton = LlamaForCausalLM(config)
    generator = torch.Generator(device=device).manual_seed(seed)
    state = {}
    for name, tensor in skeleton.state_dict().items():
        if config.tie_word_embeddings and name == "lm_head.weight":
            continue  # the same tensor as embed_tokens.weight
        if tensor.dim() >= 2:
            state[name] = torch.randn(tensor.shape, generator=generator, device=device, dtype=dtype).mul_(0.02)
        else:  # RMSNorm scales
            state[name] = torch.ones(tensor.shape, device=device, dtype=dtype)
    return state


def build_random_model(shape: str, *, device: str, dtype, quantize: bool, seed: int = 0, layers: int | None = None):
    """A `LlamaForCausalLM` of the given shape with random weights, loaded (and quantised) by `from_pretrained`.

    Args:
        shape (`str`): a key of `SHAPES`.
        device (`str`): `"cuda"` or `"cpu"`; the weights are created there.
        dtype (`torch.dtype`): dtype of the unquantised weights and the 4-bit compute dtype.
        quantize (`bool`): load the linear layers of the decoder in 4-bit NF4 (double quantisation).
        layers (`int`, *optional*): fewer decoder layers than the real model (quick checks only).

    Returns:
        `(model, seconds)`.
    """
    from transformers import LlamaForCausalLM

    start = time.perf_counter()
    config = llama_config(shape, layers)
    kwargs = dict(config=config, dtype=dtype, device_map=device_map(device))
    if quantize:
        kwargs["quantization_config"] = nf4_config(dtype)
    state = _random_state_dict(config, device, dtype, seed)
    try:
        model = LlamaForCausalLM.from_pretrained(None, state_dict=state, **kwargs)
    except Exception as error:  # noqa: BLE001 - one retry with host tensors, the most common loading path
        if device == "cpu":
            raise
        logger.warning("loading from a %s state dict failed (%s); retrying from host memory", device, error)
        state = {name: tensor.cpu() for name, tensor in state.items()}
        free_memory()
        model = LlamaForCausalLM.from_pretrained(None, state_dict=state, **kwargs)
    del state
    free_memory()
    model.config.use_cache = False
    return model, time.perf_counter() - start


def save_random_model(shape: str, path: str, *, device: str, dtype, seed: int = 0) -> float:
    """Write an unquantised random model folder (config, safetensors, tokenizer), as a user's base checkpoint."""
    start = time.perf_counter()
    model, _ = build_random_model(shape, device=device, dtype=dtype, quantize=False, seed=seed)
    model.save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    del model
    free_memory()
    return time.perf_counter() - start


def device_map(device: str) -> dict:
    """`{"": 0}` for the current CUDA device (the form transformers' docs use), `{"": "cpu"}` otherwise."""
    import torch

    return {"": torch.cuda.current_device()} if device == "cuda" else {"": device}


def build_tokenizer():
    """A small word-level tokenizer (pad 0, unk 1, bos 2, eos 3): the proof feeds token ids, not text."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "the a of and to in is was for on that with as by at from it an were are this be or".split()
    vocab = {token: i for i, token in enumerate(["<pad>", "<unk>", "<s>", "</s>", *words])}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def random_token_dataset(num_rows: int, seq_len: int, vocab_size: int, seed: int = 0):
    """`num_rows` sequences of exactly `seq_len` uniform random token ids (no padding, every token a target)."""
    import torch
    from datasets import Dataset

    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab_size, (num_rows, seq_len), generator=generator)
    return Dataset.from_dict({"input_ids": ids.tolist()})


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
