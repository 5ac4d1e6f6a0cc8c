"""Tiny causal LMs and a word-level tokenizer built in-process, so tests never touch a model hub.

`build_tiny_model_dir(path, arch)` writes a model folder (config, safetensors weights, tokenizer) that every code
path loads with `from_pretrained(path)`, exactly as a user's model id or folder would be loaded. `make_args`, `lora`,
`nf4` and `nf4_config` are the training settings the tests share (one place for all of them).
"""

import os

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, PreTrainedTokenizerFast


WORDS = (
    "the a of and to in is was for on that with as by at from his her it an were are which this be or has had "
    "not but also its their first one two new after city year river music film war team king world people time "
    "school state game album song church book may he she they we you who when there been more most other such"
).split()
SPECIAL = ["<pad>", "<unk>", "<s>", "</s>"]
VOCAB_SIZE = 128  # tokenizer vocabulary (4 specials + words) padded by unused ids up to this size


def build_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(SPECIAL + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def tiny_config(arch: str = "llama", vocab_size: int = VOCAB_SIZE):
    common = dict(
        vocab_size=vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    if arch == "llama":
        return LlamaConfig(**common, tie_word_embeddings=False)
    if arch == "llama_tied":  # lm_head.weight IS embed_tokens.weight, as in SmolLM2 (the demo model) and Gemma
        return LlamaConfig(**common, tie_word_embeddings=True)
    # Heads that transform their logits (the fused EMO head applies the same transform), with values that matter
    # at the tiny model's logit scale.
    if arch == "gemma2":  # logits = cap * tanh(x / cap)
        from transformers import Gemma2Config

        return Gemma2Config(**common, head_dim=4, final_logit_softcapping=2.0, tie_word_embeddings=False)
    if arch == "cohere":  # logits = x * logit_scale
        from transformers import CohereConfig

        return CohereConfig(**common, logit_scale=0.5, tie_word_embeddings=False)
    if arch == "granite":  # logits = x / logits_scaling
        from transformers import GraniteConfig

        return GraniteConfig(**common, logits_scaling=4.0, tie_word_embeddings=False)
    raise ValueError(f"unknown tiny architecture {arch!r}")


def build_tiny_model(arch: str = "llama", seed: int = 0, vocab_size: int = VOCAB_SIZE):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, vocab_size), dtype=torch.float32)
    # Larger-than-default init so the tiny model has a non-trivial next-token distribution and a cost embedding
    # whose cosines are spread out (the default 0.02 std gives near-uniform softmax outputs).
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2:
                torch.nn.init.normal_(param, std=0.3 if "embed" in name or "lm_head" in name else 0.1)
    return model


def build_tiny_model_dir(path: str | os.PathLike, arch: str = "llama", seed: int = 0) -> str:
    path = os.fspath(path)
    build_tiny_model(arch, seed).save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    return path


SENTENCES = [
    "the king of the city was a new king",
    "the river is in the state and the city is on the river",
    "she had a song on the album and the album was a film song",
    "the team was first in the world and the team had a new school",
    "he was the first king of the state after the war",
    "the church in the city has a book of music",
    "they were at the game when the team was in the city",
    "it is the most new film of the year and it was not a song",
]


def tiny_text_dataset(n: int = 32):
    from datasets import Dataset

    return Dataset.from_dict({"text": [SENTENCES[i % len(SENTENCES)] for i in range(n)]})


# ---- shared training settings -------------------------------------------------------------------------------------


def make_args(tmp_path, **overrides):
    """A short, deterministic `EMOConfig` for tiny models: 3 steps of 4 x 32 tokens, fp32, no checkpoints, no
    perplexity budget (its held-out rows and evaluations are tested on their own, in tests/training/test_guard.py),
    and `emo_anchored`, the weighting with the strongest EMO gradient (the default, `mle_anchored`, is checked in
    tests/training/test_config.py and by the tests that parametrize the weighting)."""
    from emo_calibrate import EMOConfig

    values = dict(
        output_dir=str(tmp_path / "out"),
        emo_guard_max_ppl_ratio=None,
        emo_weighting="emo_anchored",
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=5e-2,
        logging_steps=1,
        max_length=32,
        report_to="none",
        save_strategy="no",
        activation_checkpointing=False,
        seed=0,
        data_seed=0,
    )
    values.update(overrides)
    return EMOConfig(**values)


def lora(**overrides):
    """LoRA r=4 on every linear layer of the blocks (the head stays frozen: it is the EMO cost embedding)."""
    from peft import LoraConfig

    values = dict(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM", lora_dropout=0.0)
    values.update(overrides)
    return LoraConfig(**values)


def nf4():
    """NF4 without double quantisation, float32 compute."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)


def nf4_config():
    """NF4 + double quantisation, float32 compute: the 4-bit setting of the merge tests."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
