"""Where the EMO transport cost comes from: the model's own output embedding, or one read from disk.

The cost between tokens i and j is 1 - cos(e_i, e_j) in a *fixed* embedding E (V x d'). The paper uses the pretrained
LM head; the official LoRA script even used a larger model's head (Llama-2-13B's for a 7B model), which works because
only the vocabulary has to match, not the width.
"""

import json
import logging
import os
from pathlib import Path

import torch


logger = logging.getLogger(__name__)

__all__ = ["load_cost_embedding", "OUTPUT_EMBEDDING_KEYS"]

# Tensor names of an output embedding in common checkpoints, most specific first. Tied models store only the input
# embedding, so those names come after the heads.
OUTPUT_EMBEDDING_KEYS = (
    "lm_head.weight",
    "output.weight",
    "embed_out.weight",
    "model.embed_tokens.weight",
    "transformer.wte.weight",
    "model.decoder.embed_tokens.weight",
    "gpt_neox.embed_in.weight",
    "transformer.word_embeddings.weight",
)


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [folder / name for name in sorted(set(weight_map.values()))]
    return sorted(folder.glob("*.safetensors"))


def _find_tensor(files: list[Path], tied: bool) -> tuple[torch.Tensor, str]:
    from safetensors import safe_open

    keys_in = {}
    for file in files:
        with safe_open(file, framework="pt") as handle:
            for key in handle.keys():
                keys_in[key] = file
    # An untied model's input embedding is not its output embedding: only heads qualify there.
    candidates = OUTPUT_EMBEDDING_KEYS if tied else OUTPUT_EMBEDDING_KEYS[:3]
    if len(keys_in) == 1:
        candidates = tuple(keys_in)
    for key in candidates:
        if key in keys_in:
            with safe_open(keys_in[key], framework="pt") as handle:
                return handle.get_tensor(key), key
    raise ValueError(
        f"No output embedding found in {[str(f) for f in files]}: looked for {list(OUTPUT_EMBEDDING_KEYS)}. "
        "Save the (vocab, dim) matrix alone in a .safetensors file and pass its path as emo_cost_embedding."
    )


def load_cost_embedding(path: str | os.PathLike, vocab_size: int) -> torch.Tensor:
    """Read a (V, d') cost embedding from a `.safetensors` file or a model folder with safetensors weights.

    Args:
        path (`str` or `os.PathLike`):
            A `.safetensors` file holding one (V, d') tensor (or an `lm_head.weight`), or a model folder (config.json +
            safetensors shards) whose output embedding is used.
        vocab_size (`int`):
            Rows the cost embedding must have: the rows of the trained model's output embedding.

    Returns:
        `torch.Tensor` of shape `(vocab_size, d')`, as stored (not normalised).
    """
    path = Path(path)
    if path.is_dir():
        files = _safetensors_files(path)
        if not files:
            raise ValueError(
                f"{path} holds no .safetensors weights. Pickle checkpoints (.bin) are not read; convert the model with "
                "`save_pretrained(..., safe_serialization=True)` or pass a .safetensors file."
            )
        tied = False
        config_file = path / "config.json"
        if config_file.is_file():
            tied = bool(json.loads(config_file.read_text()).get("tie_word_embeddings", False))
        tensor, key = _find_tensor(files, tied)
    elif path.is_file() and path.suffix == ".safetensors":
        tensor, key = _find_tensor([path], tied=True)
    else:
        raise ValueError(f"emo_cost_embedding={str(path)!r} is not a .safetensors file nor a model folder.")
    if tensor.dim() != 2 or not tensor.is_floating_point():
        raise ValueError(
            f"{path} [{key}] is {tuple(tensor.shape)} {tensor.dtype}; a floating (vocab, dim) matrix is needed."
        )
    if tensor.shape[0] != vocab_size:
        raise ValueError(
            f"The cost embedding {path} [{key}] has {tensor.shape[0]} rows but the model's vocabulary has {vocab_size}. "
            "EMO needs one cost row per token: use an embedding from a model with the same tokenizer and vocabulary."
        )
    logger.info("EMO cost embedding: %s [%s], shape %s", path, key, tuple(tensor.shape))
    return tensor
