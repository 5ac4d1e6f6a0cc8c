"""The model card (`README.md`) written next to a merged model."""

import json
import os


__all__ = ["model_card"]

_MODES = {
    "dequantized": (
        "the base was loaded in 4-bit exactly as in training, dequantised, and the adapter merged into it: the "
        "weights are `deq(W_4bit) + s·BA`, the function the adapter was trained with"
    ),
    "original": (
        "the adapter was merged into the original, unquantised base weights: `W + s·BA`. The adapter was trained "
        "against the 4-bit weights, so this differs from the trained function by the base's quantisation error "
        "(see the KL against the 4-bit model below)"
    ),
}


def _fmt(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def model_card(report) -> str:
    """Markdown card for a `MergeReport`: base, adapter, EMO settings, merge mode and parity figures."""
    emo = report.emo_settings
    lines = [
        "---",
        f"base_model: {report.base_model}",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags: [emo_calibrate, emo, merged-lora]",
        "---",
        "",
        f"# {os.path.basename(report.base_model.rstrip('/')) or report.base_model} + EMO adapter (merged)",
        "",
        "A plain `transformers` checkpoint: a LoRA adapter trained with emo_calibrate (EMO, Earth Mover Distance "
        "Optimization, Ren et al., ICLR 2024) merged into its base model. It needs neither PEFT nor bitsandbytes.",
        "",
        "| | |",
        "| --- | --- |",
        f"| base model | `{report.base_model}` |",
        f"| adapter | `{report.adapter_path}` |",
        f"| merge base | `{report.merge_base}`: {_MODES[report.merge_base]} |",
        f"| dtype | `{report.dtype}` |",
        f"| vocabulary | {report.vocab_size}"
        + (" (resized by the adapter)" if report.resized_embeddings else "")
        + " |",
    ]
    if report.quantization is not None:
        lines.append(f"| 4-bit settings ({report.quantization_source}) | `{json.dumps(report.quantization)}` |")
    lines += ["", "## EMO training settings", ""]
    if emo:
        lines += [f"- `{key}`: {_fmt(value)}" for key, value in emo.items()]
    else:
        lines.append("Not recorded in the adapter folder (no training_args.bin / trainer_state.json).")
    lines += ["", "## Parity check", ""]
    if report.parity is None:
        lines.append("**Skipped** at merge time: the merged weights were not verified against the adapter model.")
    else:
        lines += [
            "Fixed prompts, every position's next-token distribution; merged model reloaded from this folder.",
            "",
            "| compared with | max abs logit diff | mean KL (nats) | max KL | positions |",
            "| --- | --- | --- | --- | --- |",
        ]
        rows = [(f"unmerged adapter on the {report.merge_base} base (gated)", report.parity)]
        if report.parity_vs_trained is not None:
            rows.append(("adapter on the 4-bit base, as trained", report.parity_vs_trained))
        for name, p in rows:
            lines.append(
                f"| {name} | {p.max_abs_logit_diff:.3g} | {p.mean_kl:.3g} | {p.max_kl:.3g} | {p.num_positions} |"
            )
        lines += [
            "",
            f"Tolerance: max abs logit diff ≤ {report.tolerance['max_abs_logit_diff']:.3g}, "
            f"mean KL ≤ {report.tolerance['mean_kl']:.3g}.",
        ]
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")',
        'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")',
        "```",
        "",
    ]
    return "\n".join(lines)
