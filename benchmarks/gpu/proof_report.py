"""Results of the GPU proof: EMO/MLE comparisons, memory fit, and the JSON and markdown files (written atomically)."""

import json
import os
import tempfile


__all__ = ["CONTEXT_GIB", "FIT_SIZES_GB", "TARGET_RATIO", "compare_runs", "fits", "markdown", "write_results"]

# A configuration "fits" a card of X GB when its peak reserved memory (the caching allocator's whole footprint, more
# than the peak of live tensors) plus the CUDA context stays within X GiB. Conservative: a smaller card's allocator
# would release its cache and retry before running out.
FIT_SIZES_GB = (24, 40, 80)
CONTEXT_GIB = 0.5
TARGET_RATIO = 1.05  # issue 8: EMOTrainer step time and peak memory at most 1.05x TRL's SFTTrainer


def fits(peak_reserved_gib: float | None) -> dict[str, bool] | None:
    if peak_reserved_gib is None:
        return None
    return {str(size): peak_reserved_gib + CONTEXT_GIB <= size for size in FIT_SIZES_GB}


def compare_runs(runs: list[dict]) -> list[dict]:
    """EMO/MLE ratios of step time and memory for each (model, batch) measured with both trainers, in run order."""
    done = {(r["model"], r["batch_size"], r["trainer"]): r for r in runs if r.get("status") == "ok"}
    rows = []
    for (model, batch, trainer), emo in done.items():
        mle = done.get((model, batch, "mle"))
        if trainer != "emo" or mle is None:
            continue
        row = {"model": model, "batch_size": batch, "first": "emo" if emo.get("order") == 1 else "mle"}
        for key in ("median_step_s", "peak_allocated_gib", "peak_above_resident_gib", "peak_reserved_gib"):
            a, b = emo.get(key), mle.get(key)
            row[f"{key}_ratio"] = a / b if a is not None and b else None
        for key in ("peak_allocated_gib", "peak_above_resident_gib"):
            a, b = emo.get(key), mle.get(key)
            row[f"{key}_extra"] = a - b if a is not None and b is not None else None
        row["emo_workspace_gib"] = emo.get("emo_workspace_gib")
        row["time_within_target"] = _within(row["median_step_s_ratio"])
        row["memory_within_target"] = _within(row["peak_allocated_gib_ratio"])
        rows.append(row)
    return rows


def _within(ratio):
    return None if ratio is None else ratio <= TARGET_RATIO


def _fmt(value, spec=".2f"):
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return format(value, spec)


def _header(results: dict) -> list[str]:
    versions, settings = results.get("versions", {}), results["settings"]
    names = ("torch", "transformers", "trl", "peft", "bitsandbytes")
    floor = results.get("emo_workspace_floor_gib")
    return [
        f"### GPU proof: {results.get('device', '?')}",
        "",
        ", ".join(f"{name} {versions.get(name, '?')}" for name in names) + ". "
        f"Base: {results.get('base', '?')} ({settings.get('dtype', '?')} compute), LoRA r={settings['lora_r']} on all "
        f"linear layers, sequence {settings['seq_len']}, gradient checkpointing, {settings['steps']} timed steps after "
        f"{settings['warmup']} warm-up steps; the runs in the order made (#), the two trainers of a (model, batch) "
        "pair back to back, which one goes first alternating from pair to pair.",
        "",
        "Memory (GiB, CUDA): *resident* = allocated when the first step begins (4-bit weights, LoRA adapters); *peak* "
        "= peak allocated over the run; *above resident* = peak - resident (activations, loss head, gradients, "
        "optimizer state); *reserved* = the caching allocator's peak. *EMO workspace* = the fused EMO head's two fp32 "
        "(chunk, V) buffers at this shape, inside EMO's peak: the automatic chunk rule sizes them to the hidden "
        f"states' bytes within [{_fmt(floor, '.3g')}, 2] GiB on this device (the floor is 1 GiB on a GPU; rounding to "
        "whole 8-token chunks takes up to 1 % off it), less only when the whole batch needs less. "
        f"Fits X GB: peak reserved + {CONTEXT_GIB} GiB CUDA context <= X GiB.",
        "",
        "| # | model | batch | trainer | status | resident | peak | above resident | reserved | EMO workspace "
        "| median step s | tokens/s | fits 24 / 40 / 80 GB |",
        "|---:|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]


def markdown(results: dict) -> str:
    """One table row per run (in run order), then the EMO/MLE ratios, the merge check and what was not measured."""
    lines = _header(results)
    for number, r in enumerate(results["runs"], start=1):
        fit = r.get("fits") or {}
        fit_text = " / ".join(_fmt(fit.get(str(size))) for size in FIT_SIZES_GB) if fit else "-"
        lines.append(
            f"| {number} | {r['model']} | {r['batch_size']} | {r['trainer']} | {r['status']} | "
            f"{_fmt(r.get('resident_gib'))} | {_fmt(r.get('peak_allocated_gib'))} | "
            f"{_fmt(r.get('peak_above_resident_gib'))} | {_fmt(r.get('peak_reserved_gib'))} | "
            f"{_fmt(r.get('emo_workspace_gib'), '.3g')} | {_fmt(r.get('median_step_s'), '.3f')} | "
            f"{_fmt(r.get('tokens_per_s'), '.0f')} | {fit_text} |"
        )
    if results.get("comparisons"):
        lines += [
            "",
            f"EMO / MLE (targets: step time and peak <= {TARGET_RATIO}x):",
            "",
            "| model | batch | first | step time | peak | above resident | reserved | EMO - MLE peak GiB "
            "| EMO - MLE above resident GiB | time ok | memory ok |",
            "|---|---:|---|---:|---:|---:|---:|---:|---:|---|---|",
        ]
        for c in results["comparisons"]:
            lines.append(
                f"| {c['model']} | {c['batch_size']} | {c['first']} | {_fmt(c['median_step_s_ratio'], '.3f')} | "
                f"{_fmt(c['peak_allocated_gib_ratio'], '.3f')} | {_fmt(c['peak_above_resident_gib_ratio'], '.3f')} | "
                f"{_fmt(c['peak_reserved_gib_ratio'], '.3f')} | {_fmt(c['peak_allocated_gib_extra'], '+.2f')} | "
                f"{_fmt(c['peak_above_resident_gib_extra'], '+.2f')} | "
                f"{_fmt(c['time_within_target'])} | {_fmt(c['memory_within_target'])} |"
            )
    lines += _merge_lines(results.get("merge"))
    if results.get("nf4_cpu_vs_cuda"):
        lines += ["", f"NF4 codes of one bf16 weight quantised on CPU vs CUDA: {results['nf4_cpu_vs_cuda']}"]
    skipped = [r for r in results["runs"] if r["status"] != "ok"]
    if skipped:
        lines += ["", "Not measured: " + "; ".join(f"{r['model']} b{r['batch_size']} {r['trainer']}: "
                                                   f"{r['status']}" for r in skipped)]  # fmt: skip
    if results.get("verdict"):
        lines += ["", f"Verdict: {results['verdict']}"]
    return "\n".join(lines) + "\n"


def _merge_lines(merge: dict | None) -> list[str]:
    if not merge:
        return []
    lines = ["", f"Merge check ({merge.get('model')}, {merge.get('method', '?')}): {merge.get('status')}"]
    p = merge.get("parity")
    if p:
        checks = p.get("checks", {})
        failed = [name for name, ok in checks.items() if not ok]
        lines.append(
            f"mean KL(adapter || merged) {_fmt(p.get('mean_kl'), '.2e')} = {_fmt(p.get('kl_share'), '.2e')} x the "
            f"adapter's own mean KL(adapter || base) {_fmt(p.get('adapter_kl'), '.2e')}; top-1 agreement with the "
            f"adapter model: merged {_fmt(p.get('top1_agreement'), '.4f')}, base "
            f"{_fmt(p.get('adapter_top1_agreement'), '.4f')}; max |logit diff| {_fmt(p.get('max_abs_logit_diff'), '.2e')}"
            f" vs the adapter's max |logit change| {_fmt(p.get('adapter_effect_logits'), '.2e')}; max |softmax diff| "
            f"{_fmt(p.get('max_abs_prob_diff'), '.2e')} (shown, not judged). Failed criteria: "
            f"{', '.join(failed) or 'none'}."
        )
    return lines


def _write_atomic(path: str, text: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=folder)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)


def write_results(results: dict, out_dir: str) -> None:
    """Write `gpu_results.json` and `gpu_results.md` in `out_dir` (called after every configuration)."""
    os.makedirs(out_dir, exist_ok=True)
    results["comparisons"] = compare_runs(results["runs"])
    _write_atomic(os.path.join(out_dir, "gpu_results.json"), json.dumps(results, indent=2, default=str) + "\n")
    _write_atomic(os.path.join(out_dir, "gpu_results.md"), markdown(results))
