"""The EMO method: the reference loss, the fused memory-efficient head, and the cost embeddings they read.

- `reference.py`: `emo_loss` from full logits, the readable definition every other path is tested against;
- `fused.py` + `fused_chunks.py`: `fused_linear_emo_loss` from hidden states, token chunk by token chunk, never
  building the (N, V) logits, and the check of whether a model's head can be fused;
- `cost_embedding.py`: loading an external cost embedding (a `.safetensors` file or a model folder).
"""

from .cost_embedding import load_cost_embedding
from .fused import auto_chunk_size, fused_head_unsupported_reason, fused_linear_emo_loss
from .reference import EMOLoss, EMOLossOutput, emo_loss, normalize_cost_embedding


__all__ = [
    "EMOLoss",
    "EMOLossOutput",
    "auto_chunk_size",
    "emo_loss",
    "fused_head_unsupported_reason",
    "fused_linear_emo_loss",
    "load_cost_embedding",
    "normalize_cost_embedding",
]
