"""Estimate a 7B recipe's peak GPU memory from the model's shapes and the recipe's settings (no GPU, no download).

An ESTIMATE, term by term, for the training path as it now is (bf16 autocast, 4-bit NF4 base, LoRA, activation
checkpointing, the fused EMO head in bf16 reading only the backbone's last hidden state), next to what the path before
the bf16 fix added on top: an fp32 copy of every layer's hidden states (accelerate's `convert_outputs_to_fp32` upcasts
all `output_hidden_states`) and an fp32 copy of the (V, d) head per step. The terms:

- 4-bit body: every linear layer of the blocks in NF4 (0.5 byte/parameter) + double-quantised absmax (8-bit per
  64-weight block, fp32 per 256 blocks: ~0.016 byte/parameter);
- embeddings and head in bf16 (untied);
- LoRA: parameters, gradients and both AdamW moments in bf16 (SFTTrainer casts trainable parameters of a quantised
  model to bf16), 8 bytes per LoRA parameter;
- checkpointed activations: one bf16 (B, T, d) hidden state per block;
- one block recomputed in backward: about B x T x (12 d + 4 ffn) bf16 values (q/k/v/o, norms, the three MLP
  projections and the SiLU product, LoRA inputs), a rough figure;
- the fused EMO head: its two fp32 (chunk, V) buffers (chunk from `auto_chunk_size` on CUDA), the last hidden state and
  dH (bf16), per-token fp32 statistics;
- not counted: the CUDA context (~0.5-1 GB outside `max_memory_allocated`) and allocator fragmentation.

    python scripts/estimate_recipe_memory.py            # every 7B recipe, in GiB
"""

import os
import sys

import yaml


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from measure_recipe_memory import SHAPES  # noqa: E402  the published shapes of each model

from emo_calibrate.losses.fused import FP32_BUFFERS_PER_TOKEN, auto_chunk_size  # noqa: E402
from emo_calibrate.training.lora_presets import LORA_PRESETS, resolve_target_modules  # noqa: E402


GIB = 2**30
RECIPES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes")


def estimate(name: str) -> dict:
    """Bytes per term for recipes/<name>_qlora_emo.yaml (its LoRA preset or explicit LoRA options)."""
    with open(os.path.join(RECIPES, f"{name}_qlora_emo.yaml")) as f:
        recipe = yaml.safe_load(f)
    shape = SHAPES[name][1]
    d, ffn, layers, vocab = (
        shape["hidden_size"],
        shape["intermediate_size"],
        shape["num_hidden_layers"],
        shape["vocab_size"],
    )
    kv = d * shape["num_key_value_heads"] // shape["num_attention_heads"]
    preset = LORA_PRESETS[recipe["lora_preset"]] if "lora_preset" in recipe else None
    rank = recipe.get("lora_r", preset.r if preset else 16)
    targets = recipe.get("lora_target_modules", preset.target_modules if preset else None)
    batch, length = recipe["per_device_train_batch_size"], recipe["max_length"]
    tokens = batch * length
    # (in, out) of the seven linear layers of a block: q, k, v, o, gate, up, down
    names = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    linears = [(d, d), (d, kv), (d, kv), (d, d), (d, ffn), (d, ffn), (ffn, d)]
    body = layers * sum(i * o for i, o in linears)
    adapted = names if targets == "all-linear" else resolve_target_modules(targets, "llama")  # PEFT: q_proj, v_proj
    lora = layers * sum(rank * (i + o) for n, (i, o) in zip(names, linears) if n in adapted)
    chunk = auto_chunk_size(tokens, vocab, tokens * d * 2, "cuda")
    terms = {
        "4-bit body": body * (0.5 + 1 / 64 + 4 / (64 * 256)),
        "bf16 embeddings + head": 2 * vocab * d * 2,
        "LoRA + grads + AdamW": lora * 8,
        "checkpointed activations": layers * tokens * d * 2,
        "one block recomputed": tokens * (12 * d + 4 * ffn) * 2,
        "fused EMO head": FP32_BUFFERS_PER_TOKEN * chunk * vocab * 4 + 2 * tokens * d * 2 + 6 * tokens * 4,
    }
    before_fix = {
        "fp32 copies of all hidden states": (layers + 1) * tokens * d * 4,
        "fp32 copy of the head": vocab * d * 4,
    }
    return {"batch": batch, "length": length, "chunk": chunk, "terms": terms, "before_fix": before_fix}


def main() -> int:
    print("command: python scripts/estimate_recipe_memory.py (an estimate from shapes; not a measurement)\n")
    names = list(SHAPES)
    rows = {name: estimate(name) for name in names}
    header = ["term"] + [f"{n} ({rows[n]['batch']}x{rows[n]['length']})" for n in names]
    print("| " + " | ".join(header) + " |")
    print("|---|" + "---:|" * len(names))
    for term in rows[names[0]]["terms"]:
        print(f"| {term} | " + " | ".join(f"{rows[n]['terms'][term] / GIB:.2f}" for n in names) + " |")
    totals = {n: sum(rows[n]["terms"].values()) for n in names}
    print("| **peak allocated, this path** | " + " | ".join(f"**{totals[n] / GIB:.1f}**" for n in names) + " |")
    for term in rows[names[0]]["before_fix"]:
        print(
            f"| before the bf16 fix, + {term} | "
            + " | ".join(f"{rows[n]['before_fix'][term] / GIB:.2f}" for n in names)
            + " |"
        )
    before = {n: totals[n] + sum(rows[n]["before_fix"].values()) for n in names}
    print("| peak allocated, before the bf16 fix | " + " | ".join(f"{before[n] / GIB:.1f}" for n in names) + " |")
    print("\nfused-head chunk (tokens): " + ", ".join(f"{n} {rows[n]['chunk']}" for n in names))
    print("Add the CUDA context (~0.5-1 GB) for what nvidia-smi shows.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
