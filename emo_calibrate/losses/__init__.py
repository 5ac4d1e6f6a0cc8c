"""The EMO method: the reference loss, the fused memory-efficient head, and the cost embeddings they read.

- `reference.py`: `emo_loss` from full logits, the readable definition every other path is tested against;
- `fused.py` + `fused_chunks.py`: `fused_linear_emo_loss` from hidden states, token chunk by token chunk, never
  building the (N, V) logits, in the training dtype;
- `output_head.py`: what a model's output layer does (its logit soft cap or scale) and whether the fused head can
  stand in for it;
- `cost_embedding.py`: loading an external cost embedding (a `.safetensors` file or a model folder).
"""

from .cost_embedding import load_cost_embedding
from .fused import auto_chunk_size, fused_linear_emo_loss
from .output_head import fused_head_unsupported_reason, output_logit_transform
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
    "output_logit_transform",
]
