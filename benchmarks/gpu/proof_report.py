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
    """EMO/MLE ratios of step time, peak memory and tokens/s for each (model, batch) measured with both trainers."""
    done = {(r["model"], r["batch_size"], r["trainer"]): r for r in runs if r.get("status") == "ok"}
    rows = []
    for (model, batch, trainer), emo in done.items():
        mle = done.get((model, batch, "mle"))
        if trainer != "emo" or mle is None:
            continue
        row = {"model": model, "batch_size": batch}
        for key in ("median_step_s", "peak_allocated_gib", "peak_reserved_gib"):
            a, b = emo.get(key), mle.get(key)
            row[f"{key}_ratio"] = a / b if a is not None and b else None
        a, b = emo.get("peak_allocated_gib"), mle.get("peak_allocated_gib")
        row["peak_allocated_extra_gib"] = a - b if a is not None and b is not None else None
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


def markdown(results: dict) -> str:
    """One table row per run (model, batch, trainer), then the EMO/MLE ratios and the merge check."""
    lines = [
        f"### GPU proof: {results.get('device', '?')}",
        "",
        f"torch {results.get('versions', {}).get('torch', '?')}, transformers "
        f"{results.get('versions', {}).get('transformers', '?')}, trl {results.get('versions', {}).get('trl', '?')}, "
        f"peft {results.get('versions', {}).get('peft', '?')}, bitsandbytes "
        f"{results.get('versions', {}).get('bitsandbytes', '?')}. Base: {results.get('base', '?')} "
        f"({results['settings'].get('dtype', '?')} compute), "
        f"LoRA r={results['settings']['lora_r']} on all linear layers, sequence {results['settings']['seq_len']}, "
        f"gradient checkpointing, {results['settings']['steps']} timed steps after {results['settings']['warmup']} "
        "warm-up steps. Fits X GB: peak reserved + 0.5 GiB CUDA context <= X GiB.",
        "",
        "| model | batch | trainer | status | peak alloc GiB | peak reserved GiB | median step s | tokens/s "
        "| fits 24 / 40 / 80 GB |",
        "|---|---:|---|---|---:|---:|---:|---:|---|",
    ]
    for r in results["runs"]:
        fit = r.get("fits") or {}
        fit_text = " / ".join(_fmt(fit.get(str(size))) for size in FIT_SIZES_GB) if fit else "-"
        lines.append(
            f"| {r['model']} | {r['batch_size']} | {r['trainer']} | {r['status']} | "
            f"{_fmt(r.get('peak_allocated_gib'))} | {_fmt(r.get('peak_reserved_gib'))} | "
            f"{_fmt(r.get('median_step_s'), '.3f')} | {_fmt(r.get('tokens_per_s'), '.0f')} | {fit_text} |"
        )
    if results.get("comparisons"):
        lines += [
            "",
            f"EMO / MLE (target <= {TARGET_RATIO}):",
            "",
            "| model | batch | step time | peak alloc | peak reserved | EMO - MLE peak alloc GiB | time ok | memory ok |",
            "|---|---:|---:|---:|---:|---:|---|---|",
        ]
        for c in results["comparisons"]:
            lines.append(
                f"| {c['model']} | {c['batch_size']} | {_fmt(c['median_step_s_ratio'], '.3f')} | "
                f"{_fmt(c['peak_allocated_gib_ratio'], '.3f')} | {_fmt(c['peak_reserved_gib_ratio'], '.3f')} | "
                f"{_fmt(c['peak_allocated_extra_gib'], '+.2f')} | "
                f"{_fmt(c['time_within_target'])} | {_fmt(c['memory_within_target'])} |"
            )
    merge = results.get("merge")
    if merge:
        lines += ["", f"Merge check ({merge.get('model')}, {merge.get('method', '?')}): {merge.get('status')}"]
        if merge.get("parity"):
            p = merge["parity"]
            lines.append(
                f"max |softmax diff| {_fmt(p.get('max_abs_prob_diff'), '.2e')}, max |logit diff| "
                f"{_fmt(p.get('max_abs_logit_diff'), '.2e')}, top-1 agreement {_fmt(p.get('top1_agreement'), '.4f')}, "
                f"adapter effect (max |softmax change| vs the base) {_fmt(p.get('adapter_effect'), '.2e')}"
            )
    if results.get("nf4_cpu_vs_cuda"):
        lines += ["", f"NF4 codes of one bf16 weight quantised on CPU vs CUDA: {results['nf4_cpu_vs_cuda']}"]
    skipped = [r for r in results["runs"] if r["status"] != "ok"]
    if skipped:
        lines += ["", "Not measured: " + "; ".join(f"{r['model']} b{r['batch_size']} {r['trainer']}: "
                                                   f"{r['status']}" for r in skipped)]  # fmt: skip
    return "\n".join(lines) + "\n"


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
