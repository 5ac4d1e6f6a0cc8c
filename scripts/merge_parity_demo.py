"""Measure merge parity on a real model: train a small QLoRA adapter, merge it every way, print a Markdown table.

    PYTHONPATH=. python scripts/merge_parity_demo.py --workdir /tmp/merge-demo   # SmolLM2-135M
    PYTHONPATH=.:tests python scripts/merge_parity_demo.py --tiny --workdir /tmp/merge-tiny --init random \
        --train_dtype float32

`--base` is a plain transformers folder (config, safetensors, tokenizer), by default SmolLM2-135M from
`emo_calibrate.demo.assets.smollm2_path()`; `--tiny` builds the test suite's tiny Llama instead. The adapter is LoRA on all linear layers
of the NF4 + double-quant base loaded and computing in `--train_dtype` (bf16 by default, as a GPU QLoRA run would use):
`--init trained` trains it for `--steps` AdamW steps with a plain torch loop so that B != 0; `--init random` uses
PEFT's `init_lora_weights=False` instead. Nothing here goes into the package; the figures go to docs/merge.md.
"""

import argparse
import os
import time


TEXT = [
    "The river rises in the northern hills and flows south through farmland before it reaches the sea.",
    "In the winter of that year the council voted to build a new bridge across the harbour.",
    "Many early computers filled whole rooms and used vacuum tubes instead of transistors.",
    "The museum holds a large collection of paintings, maps and letters from the colonial period.",
    "She studied chemistry at the university and later worked on the structure of proteins.",
    "The festival takes place every summer and attracts musicians from all over the country.",
    "Most of the island is covered by forest, and its only town lies on the eastern coast.",
    "The novel follows two brothers who leave their village to look for work in the capital.",
]


def train_adapter(base: str, adapter_dir: str, args, seed: int = 0) -> float:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from emo_calibrate.export.records import save_training_record
    from emo_calibrate.utils.quantization import disable_cpu_4bit_repacking

    torch.manual_seed(seed)
    dtype = getattr(torch, args.train_dtype)
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
    )
    model = AutoModelForCausalLM.from_pretrained(base, quantization_config=quant, dtype=dtype, device_map="cpu")
    disable_cpu_4bit_repacking(model)
    tokenizer = AutoTokenizer.from_pretrained(base)
    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=args.init == "trained")
    model = get_peft_model(model, lora)
    for param in model.parameters():
        if param.requires_grad:  # as SFTTrainer does on quantised bases
            param.data = param.data.to(torch.bfloat16)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    batch = tokenizer(TEXT, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    model.train()
    start = time.perf_counter()
    for step in range(args.steps if args.init == "trained" else 0):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        print(f"step {step}: loss {loss.item():.4f}")
    model.save_pretrained(adapter_dir)
    tokenizer.save_pretrained(adapter_dir)
    save_training_record(model, adapter_dir)  # as EMOTrainer.save_model: how and where the base was quantised
    return time.perf_counter() - start


def context_figures(adapter_dir: str) -> None:
    """How strong the adapter is and how lossy 4-bit is here: the scale against which the parity figures read."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    from emo_calibrate.export.merge import _load_base
    from emo_calibrate.export.parity import compare_logits, prompt_logits
    from emo_calibrate.export.plan import make_merge_plan
    from emo_calibrate.utils.quantization import disable_cpu_4bit_repacking

    plan = make_merge_plan(adapter_dir, adapter_dir + "-unused", None, None, "float32", None, False, {})
    tokenizer = AutoTokenizer.from_pretrained(plan.tokenizer_source)
    original = prompt_logits(_load_base(plan, "float32"), tokenizer)
    base4 = _load_base(plan, plan.trained_dtype, quantized=True)
    quantized = prompt_logits(base4, tokenizer)
    adapted = PeftModel.from_pretrained(base4, adapter_dir)
    disable_cpu_4bit_repacking(adapted)
    trained = prompt_logits(adapted, tokenizer)
    for name, result in (
        ("original base vs 4-bit base (quantisation gap)", compare_logits(original, quantized)),
        ("4-bit base vs 4-bit base + adapter (adapter strength)", compare_logits(quantized, trained)),
    ):
        print(f"{name}: max|dlogit| {result.max_abs_logit_diff:.3g}, mean KL {result.mean_kl:.3g}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--base", help="plain transformers model folder (default: SmolLM2-135M, emo_calibrate.demo.assets)"
    )
    parser.add_argument("--tiny", action="store_true", help="build and use the tests' tiny Llama")
    parser.add_argument("--init", choices=["trained", "random"], default="trained")
    parser.add_argument("--train_dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the merges run")
    parser.add_argument("--dtypes", default="bfloat16,float32,float16")
    args = parser.parse_args()

    import torch

    from emo_calibrate.export.merge import merge_adapter

    torch.set_num_threads(args.threads)
    if args.tiny:
        from tiny_models import build_tiny_model_dir

        args.base = build_tiny_model_dir(os.path.join(args.workdir, "tiny-base"))
    elif args.base is None:
        from emo_calibrate.demo.assets import smollm2_path

        args.base = str(smollm2_path())
    adapter_dir = os.path.join(args.workdir, "adapter")
    if not os.path.isfile(os.path.join(adapter_dir, "adapter_config.json")):
        print(f"made the adapter in {train_adapter(args.base, adapter_dir, args):.0f}s")
    context_figures(adapter_dir)
    rows = []
    for merge_base in ("dequantized", "original"):
        for dtype in args.dtypes.split(","):
            out = os.path.join(args.workdir, f"merged-{merge_base}-{dtype}")
            # The adapter's base was quantised on CPU; with --device cuda the codes may differ (docs/merge.md, open
            # question): merge anyway and report the code check in the table.
            report = merge_adapter(
                adapter_dir, out, merge_base=merge_base, dtype=dtype, device=args.device, overwrite=True,
                allow_code_mismatch=True,
            )  # fmt: skip
            print(report.summary())
            p, t = report.parity, report.parity_vs_trained
            codes = report.code_check["status"] if report.code_check else "-"
            rows.append(
                f"| {merge_base} | {dtype} | {p.max_abs_logit_diff:.3g} | {p.mean_kl:.3g} | {t.max_abs_logit_diff:.3g} "
                f"| {t.mean_kl:.3g} | {codes} | {report.seconds['total']:.1f} (merge {report.seconds['merge']:.1f}) |"
            )
    print(
        "| merge base | dtype | max abs Δlogit vs unmerged | mean KL vs unmerged | max abs Δlogit vs 4-bit trained "
        "| mean KL vs 4-bit trained | 4-bit codes vs record | seconds |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
