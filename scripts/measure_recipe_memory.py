"""Measure a 7B recipe's peak GPU memory and step time without downloading the model.

Needs a CUDA GPU. Builds a randomly initialised model with the exact shapes of the recipe's model (hard-coded below, so no hub access is
needed) and a word-level tokenizer of the same vocabulary size, saves them, then runs `emo-calibrate train` with the
recipe for a few steps on random text (held-out perplexity before/after included) and prints the peak memory. Memory
and time depend on shapes, not on weight values, so the numbers hold for the real model.

    python scripts/measure_recipe_memory.py --models llama2-7b qwen2.5-7b --steps 4 --out results.jsonl
"""

import argparse
import json
import os
import random
import shutil
import tempfile
import time
import traceback


# The published configurations' shapes (config.json of each model on the hub).
SHAPES = {
    "llama2-7b": ("llama", dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)),
    "mistral-7b": ("mistral", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                   num_attention_heads=32, num_key_value_heads=8, vocab_size=32768)),
    "llama3.1-8b": ("llama", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                  num_attention_heads=32, num_key_value_heads=8, vocab_size=128256)),
    "qwen2.5-7b": ("qwen2", dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                 num_attention_heads=28, num_key_value_heads=4, vocab_size=152064)),
}  # fmt: skip


def build_model(name: str, folder: str):
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    model_type, shape = SHAPES[name]
    config = AutoConfig.for_model(model_type, **shape, tie_word_embeddings=False, max_position_embeddings=4096)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    del model
    torch.cuda.empty_cache()
    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    vocab = {tok: i for i, tok in enumerate(specials + [f"w{i}" for i in range(shape["vocab_size"] - len(specials))])}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    ).save_pretrained(folder)


def build_text(folder: str, vocab_size: int, train_rows: int = 400, test_rows: int = 40):
    from datasets import Dataset, DatasetDict

    rng = random.Random(0)

    def rows(n):
        return [" ".join(f"w{rng.randrange(vocab_size - 4)}" for _ in range(60)) for _ in range(n)]

    DatasetDict({"train": Dataset.from_dict({"text": rows(train_rows)}),
                 "test": Dataset.from_dict({"text": rows(test_rows)})}).save_to_disk(folder)  # fmt: skip


def measure(name: str, steps: int, work: str, extra: list[str]) -> dict:
    import torch

    from emo_calibrate.cli import train as cli_train

    model_dir, data_dir = os.path.join(work, "model"), os.path.join(work, "data")
    start = time.perf_counter()
    build_model(name, model_dir)
    build_text(data_dir, SHAPES[name][1]["vocab_size"])
    built = time.perf_counter()
    torch.cuda.reset_peak_memory_stats()
    recipe = os.path.join(os.path.dirname(__file__), "..", "recipes", f"{name}_qlora_emo.yaml")
    argv = ["--config", recipe, "--model_name_or_path", model_dir, "--dataset_name", data_dir,
            "--output_dir", os.path.join(work, "out"), "--max_steps", str(steps), "--save_strategy", "no",
            "--logging_steps", "1", "--warmup_steps", "0", *extra]  # fmt: skip
    summary = cli_train.main(*cli_train.parse(argv))
    trainer = summary["trainer"]
    train_log = next(h for h in trainer.state.log_history if "train_runtime" in h)
    return {
        "recipe": name,
        "gpu": torch.cuda.get_device_name(),
        "batch": trainer.args.per_device_train_batch_size,
        "max_length": trainer.args.max_length,
        "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
        "train_seconds_per_step": train_log["train_runtime"] / steps,
        "fused_head": trainer._fused_reason is None,
        "losses": [(h["mle"], h["emo"]) for h in trainer.state.log_history if "mle" in h and "loss" in h],
        "ppl_before_after": (summary["ppl_before"], summary["ppl_after"]),
        "build_seconds": built - start,
        "total_seconds": time.perf_counter() - start,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--out", default="recipe_memory.jsonl")
    parser.add_argument("--work_dir", default=None, help="Scratch folder for the random models (~16 GB each).")
    args, extra = parser.parse_known_args()  # the rest goes to `emo-calibrate train`
    for name in args.models:
        work = tempfile.mkdtemp(prefix=f"{name}-", dir=args.work_dir)
        try:
            result = measure(name, args.steps, work, extra)
        except Exception as err:  # keep measuring the other recipes
            traceback.print_exc()
            result = {"recipe": name, "error": f"{type(err).__name__}: {err}"}
        finally:
            shutil.rmtree(work, ignore_errors=True)
        print(json.dumps(result), flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
