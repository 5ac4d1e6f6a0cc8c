"""The side-by-side report: `report.md` (one table row per model) and PNG plots, from the `results.json` content.

Plots: overlaid reliability diagrams, perplexity bars (document-bootstrap error bars), MAUVE bars (std over seeds),
degeneration bars (rep-n of sampled and greedy text against human text), in-context-learning accuracy per task
(bootstrap 95 % intervals), and the training curves of adapters whose `trainer_state.json` was found.
"""

import json
import logging
import math
import os

from .arguments import TEXT_METRICS
from .paired import paired_statistics


__all__ = ["write_report", "dumps_results", "paired_section", "plot_training_curves", "TRAINING_CURVE_KEYS"]

logger = logging.getLogger(__name__)

# log_history keys plotted as training curves, when present. EMOTrainer logs them for every weighting, `mle` included,
# so runs compare on the same quantities: emd (the transport cost itself) and entropy show how EMO lowers its cost.
TRAINING_CURVE_KEYS = ("loss", "mle", "emo", "emd", "entropy", "eval_loss", "eval_mle", "eval_emd")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def dumps_results(value, indent: int = 2, level: int = 0) -> str:
    """JSON of `value` with objects indented and every list of plain values on one line, so that the per-document
    and per-prompt lists of results.json take a line each (`json.loads` reads it back unchanged)."""
    pad, inner = " " * (indent * level), " " * (indent * (level + 1))
    if isinstance(value, dict) and value:
        keys = [json.dumps(k if isinstance(k, str) else json.dumps(k), ensure_ascii=False) for k in value]
        rows = [f"{inner}{k}: {dumps_results(v, indent, level + 1)}" for k, v in zip(keys, value.values())]
    elif isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
        rows = [inner + dumps_results(v, indent, level + 1) for v in value]
    else:
        return json.dumps(value, ensure_ascii=False)
    first, last = ("{", "}") if isinstance(value, dict) else ("[", "]")
    return first + "\n" + ",\n".join(rows) + "\n" + pad + last


def _fmt(value, std=None, digits=3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    text = f"{value:.{digits}f}"
    return text if std is None else f"{text} ± {std:.{digits}f}"


def _primary_metric(metrics: dict) -> tuple[str, float] | None:
    """`acc,none` when the task has it, else its first metric that is not a standard error."""
    names = [k for k in metrics if "_stderr" not in k]
    if not names:
        return None
    name = "acc,none" if "acc,none" in metrics else names[0]
    return name, metrics[name]


def _get(d: dict, *keys):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _bar(ax, labels, values, errors, ylabel, title):
    xs = range(len(labels))
    ax.bar(xs, [v if v is not None else 0 for v in values], yerr=[e or 0 for e in errors], capsize=4, color="C0")
    ax.set_xticks(list(xs), labels, rotation=20, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)


def plot_training_curves(states: dict[str, str], path: str) -> str | None:
    """Plot `TRAINING_CURVE_KEYS` of each model's `trainer_state.json` (label -> file) against the step."""
    histories = {}
    for label, file in states.items():
        with open(file, encoding="utf-8") as f:
            histories[label] = json.load(f).get("log_history", [])
    keys = [k for k in TRAINING_CURVE_KEYS if any(k in row for h in histories.values() for row in h)]
    if not keys:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.5), squeeze=False, constrained_layout=True)
    for ax, key in zip(axes[0], keys):
        for label, history in histories.items():
            rows = [r for r in history if key in r and "step" in r]
            if rows:
                ax.plot([r["step"] for r in rows], [r[key] for r in rows], marker=".", label=label)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _mode_bars(models: list[dict], modes: list[str], metric: str, ylabel: str, title: str, out: str) -> str:
    """One bar chart per decoding mode of a generation metric (mean ± std over seeds), human text as a line."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(modes), figsize=(4.5 * len(modes), 3.8), squeeze=False, constrained_layout=True)
    for ax, mode in zip(axes[0], modes):
        values = [_get(m, "generation", mode, "mean", metric) for m in models]
        errors = [_get(m, "generation", mode, "std", metric) for m in models]
        _bar(ax, [m["label"] for m in models], values, errors, ylabel, title.format(mode))
        human = _get(models[0], "generation", "human", metric)
        if human is not None:
            ax.axhline(human, ls="--", color="grey", label="human text")
            ax.legend(fontsize=8)
    path = os.path.join(out, "degeneration.png" if metric.startswith("rep") else f"{metric}.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _plots(results: dict, out: str) -> list[tuple[str, str]]:
    from .calibration import plot_reliability

    models = results["models"]
    labels = [m["label"] for m in models]
    written = []
    curves = {m["label"]: m["calibration"] for m in models if "calibration" in m}
    if curves:
        written.append(("Reliability diagrams", plot_reliability(curves, os.path.join(out, "reliability.png"))))
    plt = _plt()
    if any("perplexity" in m for m in models):
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.8), constrained_layout=True)
        for ax, unit in zip(axes, ("token", "word")):
            values = [_get(m, "perplexity", unit) for m in models]
            errors = [_get(m, "perplexity", f"{unit}_std") for m in models]
            _bar(ax, labels, values, errors, "perplexity (lower is better)", f"per {unit} (± bootstrap std)")
        fig.savefig(os.path.join(out, "perplexity.png"), dpi=120)
        plt.close(fig)
        written.append(("Perplexity", os.path.join(out, "perplexity.png")))
    modes = [mode for mode in ("sample", "greedy") if any(_get(m, "generation", mode) for m in models)]
    if any(_get(m, "generation", mode, "mean", "mauve") is not None for m in models for mode in modes):
        path = _mode_bars(models, modes, "mauve", "MAUVE (higher is better)", "{} (± std over seeds)", out)
        written.append(("MAUVE", path))
    if modes:
        path = _mode_bars(models, modes, "rep-4", "rep-4 (share of repeated 4-grams)", "degeneration, {}", out)
        written.append(("Degeneration (rep-4)", path))
    if any("icl" in m for m in models):
        written.append(("In-context learning accuracy", plot_icl(models, os.path.join(out, "icl_accuracy.png"))))
    states = {m["label"]: m["trainer_state"] for m in models if m.get("trainer_state")}
    if states and plot_training_curves(states, os.path.join(out, "training_curves.png")):
        written.append(("Training curves", os.path.join(out, "training_curves.png")))
    return written


def plot_icl(models: list[dict], path: str) -> str:
    """Grouped bars: ICL accuracy of each model on each task, with bootstrap 95 % intervals; chance as dashes."""
    plt = _plt()
    models = [m for m in models if "icl" in m]
    tasks = list(models[0]["icl"])
    fig, ax = plt.subplots(figsize=(max(4.5, 0.8 * len(tasks) * len(models) + 1.5), 3.8), constrained_layout=True)
    width = 0.8 / len(models)
    for k, m in enumerate(models):
        xs = [t + (k - (len(models) - 1) / 2) * width for t in range(len(tasks))]
        res = [m["icl"][task] for task in tasks]
        low = [r["accuracy"] - r["ci95"][0] for r in res]
        high = [r["ci95"][1] - r["accuracy"] for r in res]
        ax.bar(xs, [r["accuracy"] for r in res], width, yerr=[low, high], capsize=3, label=m["label"])
    for t, task in enumerate(tasks):
        ax.hlines(models[0]["icl"][task]["chance"], t - 0.45, t + 0.45, colors="grey", linestyles="--")
    ax.set_xticks(list(range(len(tasks))), tasks)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy (95 % bootstrap CI)")
    ax.set_title("in-context learning (dashed: chance)")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _pct(value) -> str:
    return f"{100 * value:.1f}"


def icl_section(results: dict) -> list[str]:
    """Markdown: ICL accuracy per model and task, and the paired difference of every model against the first."""
    models = [m for m in results["models"] if "icl" in m]
    tasks = list(results.get("icl_tasks") or dict.fromkeys(t for m in models for t in m["icl"]))
    lines = ["## In-context learning", ""]
    lines += [
        "Accuracy in % [bootstrap 95 % CI over test items]; `norm`: candidates scored by their mean per-token "
        "log-probability instead of the sum.",
        "",
    ]
    header = ["model"] + [f"{t} (n={models[0]['icl'][t]['n']})" for t in tasks] + [f"{t} norm" for t in tasks]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for m in models:
        r = m["icl"]
        cells = [f"{_pct(r[t]['accuracy'])} [{_pct(r[t]['ci95'][0])}, {_pct(r[t]['ci95'][1])}]" for t in tasks]
        cells += [_pct(r[t]["accuracy_norm"]) for t in tasks]
        lines.append(f"| {m['label']} | " + " | ".join(cells) + " |")
    baselines = [f"{_pct(models[0]['icl'][t]['chance'])} / {_pct(models[0]['icl'][t]['majority'])}" for t in tasks]
    lines.append("| chance / majority class | " + " | ".join(baselines + ["-"] * len(tasks)) + " |")
    paired = results.get("paired") or {}
    pairs = [(label, groups["icl"]) for label, groups in paired.get("models", {}).items() if "icl" in groups]
    if pairs:
        ref = paired["reference"]
        lines += [
            "",
            f"Paired difference against **{ref}** (same items, same demonstrations): accuracy points [paired "
            f"bootstrap 95 % CI], exact McNemar p-value, items only this model / only {ref} got right.",
            "",
        ]
        lines += ["| model | task | difference | p (McNemar) | wins / losses |", "|---|---|---|---|---|"]
        for label, icl in pairs:
            for t in (t for t in tasks if t in icl):
                d, test = icl[t], icl[t]["mcnemar"]
                lines.append(
                    f"| {label} | {t} | {100 * d['estimate']:+.1f} [{100 * d['ci95'][0]:+.1f}, "
                    f"{100 * d['ci95'][1]:+.1f}] | {test['p_value']:.3g} | {test['a_only']} / {test['b_only']} |"
                )
    info = results.get("icl_tasks") or {}
    if info:
        s = results["settings"]
        lines += [
            "",
            f"Protocol: {s['icl_shots']} demonstrations per prompt ({s['icl_retriever']} retrieval"
            f"{' by TF-IDF cosine, most similar first' if s['icl_retriever'] == 'topk' else ''}), from a pool "
            "disjoint from the test items; every candidate label scored by its summed log-probability after "
            f"the prompt, the arg-max is the prediction; test sample seed {s['icl_seed']}.",
            "",
        ]
        lines += ["| task | test items | pool | template | source |", "|---|---|---|---|---|"]
        for t, d in info.items():
            template = d["template"].replace("\n", "\\n").replace("|", "\\|")
            lines.append(f"| {t} | {d['num_test']} | {d['num_pool']} | `{template}` | {d['source']} |")
    return lines


def _table(results: dict) -> list[str]:
    models = results["models"]
    modes = [mode for mode in ("sample", "greedy") if any(_get(m, "generation", mode) for m in models)]
    tasks = sorted({t for m in models for t in m.get("downstream", {})})
    header = ["model", "kind", "ppl/token", "ppl/word", "ECE", "Brier"]
    for mode in modes:
        header += [f"MAUVE ({mode})", f"rep-4 ({mode})", f"distinct-4 ({mode})"]
    header += tasks
    rows = []
    for m in models:
        ppl = m.get("perplexity", {})
        row = [m["label"], m["kind"], _fmt(ppl.get("token"), ppl.get("token_std"), 2)]
        row += [_fmt(ppl.get("word"), ppl.get("word_std"), 2)]
        row += [_fmt(_get(m, "calibration", "ece"), digits=4), _fmt(_get(m, "calibration", "brier"), digits=4)]
        for mode in modes:
            mean, std = _get(m, "generation", mode, "mean") or {}, _get(m, "generation", mode, "std") or {}
            mauve = _fmt(mean.get("mauve"), std.get("mauve")) if mode == "sample" else _fmt(mean.get("mauve"))
            row += [mauve, _fmt(mean.get("rep-4")), _fmt(mean.get("distinct-4"))]
        for task in tasks:
            primary = _primary_metric(m.get("downstream", {}).get(task, {}))
            row.append("-" if primary is None else f"{primary[1]:.4f} ({primary[0]})")
        rows.append(row)
    human = _get(models[0], "generation", "human") if models else None
    if human:
        row = ["human text", "reference", "-", "-", "-", "-"]
        for _ in modes:
            row += ["-", _fmt(human["rep-4"]), _fmt(human["distinct-4"])]
        rows.append(row + ["-"] * len(tasks))
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def _text_section(results: dict) -> list[str]:
    """The held-out-text metrics: the side-by-side table and how each number was measured."""
    s = results["settings"]
    lines = [
        f"Held-out text: `{s['eval_data']}` ({results['num_documents']} documents, {results['num_words']} words).",
        "",
        *_table(results),
        "",
        "## How these numbers were measured",
        "",
        f"- Perplexity: windows of {s['window']} tokens, stride {s['stride']}; per token, and per whitespace word "
        "(total NLL / words: comparable across tokenizers). ± is the std of a bootstrap over documents.",
        f"- Calibration: top-label ECE with {s['calibration_bins']} equal-width bins (confidence = largest next-token "
        "probability, correct = it is the observed token); multi-class Brier score in [0, 2]. Lower is better.",
    ]
    if results["num_prompts"]:
        lines.append(
            f"- Generation: {results['num_prompts']} prompts of {s['prefix_words']} words from held-out paragraphs, "
            f"exactly {s['max_new_tokens']} new tokens; `sample` = unbiased ancestral sampling (top_k 0, top_p 1, "
            f"temperature 1), seeds {s['seeds']} (± is the std over seeds); `greedy` = one greedy run. rep-4 = share of "
            "repeated 4-grams in a continuation (degeneration, lower is better); distinct-4 = unique / all 4-grams "
            "over all continuations. The human row scores the human continuations cut to the same token length."
        )
        featurizer = results["featurizer"] or "none (MAUVE not computed)"
        lines.append(
            f"- MAUVE featurizer: **{featurizer}** (the paper used gpt2-large). MAUVE depends on the featurizer and on "
            "the number of samples: compare values only within one report. It clusters the samples into "
            f"{max(2, round(results['num_prompts'] / 10))} buckets here; with fewer than a few hundred prompts it is "
            "coarse and values near 1 say little."
        )
    return lines


# The rows of the paired table (path in a model's `paired` entry, name, digits); ICL has its own, with McNemar.
_PAIRED_ROWS = (
    (("perplexity", "token"), "ppl/token", 2),
    (("perplexity", "word"), "ppl/word", 2),
    (("calibration", "ece"), "ECE", 4),
    (("generation", "sample", "rep-4"), "rep-4 (sample)", 3),
    (("generation", "greedy", "rep-4"), "rep-4 (greedy)", 3),
    (("generation", "sample", "mauve"), "MAUVE (sample)", 3),
    (("generation", "greedy", "mauve"), "MAUVE (greedy)", 3),
)


def _change(stat: dict, digits: int) -> str:
    """`estimate [low, high]` of a paired statistic, `*` when the interval excludes no change."""
    ratio = stat["statistic"] == "ratio"

    def fmt(value):
        return f"{value:.3f}" if ratio else f"{value:+.{digits}f}"

    if stat["ci95"] is None:
        return f"{fmt(stat['estimate'])} (one run: no interval)"
    low, high = stat["ci95"]
    return f"{fmt(stat['estimate'])} [{fmt(low)}, {fmt(high)}]" + " *" * stat["excludes_null"]


def paired_section(results: dict) -> list[str]:
    """Markdown: the paired statistics of `results["paired"]` other than ICL's, one row per model and metric."""
    paired = results.get("paired") or {}
    rows = []
    for label, groups in paired.get("models", {}).items():
        for path, name, digits in _PAIRED_ROWS:
            stat = _get(groups, *path)
            if stat:
                units = f"{stat['n']} {stat['unit']}"
                if path[1] == "sample" and stat["unit"] != "seeds":
                    units += f", seeds {' '.join(str(seed) for seed in stat['seeds'])}"
                values = f"{_fmt(stat['reference'], digits=digits)} | {_fmt(stat['model'], digits=digits)}"
                rows.append(f"| {label} | {name} | {values} | {_change(stat, digits)} | {units} |")
    if not rows:
        return []
    ref = paired["reference"]
    return [
        f"## Paired differences against {ref}",
        "",
        f"Each model against **{ref}** on the same units. Perplexity: the ratio model / {ref} (below 1: lower), "
        "bootstrap over documents, each resample drawing the same documents for both models. ECE and rep-4: the "
        f"difference model - {ref} (negative: lower), bootstrap over the same documents, and paired bootstrap over "
        "prompts (sampled: a prompt's rep-4 averaged over the seeds). MAUVE: the mean difference over sampling "
        f"seeds with a Student t interval (one run: no interval). 95 % intervals, {paired['num_samples']} "
        f"resamples, seed {paired['seed']}; `*`: the interval excludes no change (1 for a ratio, 0 for a "
        "difference). Every statistic, rep-1 to rep-3 included, is under `paired` in results.json.",
        "",
        f"| model | metric | {ref} | model | change [95 % CI] | units |",
        "|---|---|---|---|---|---|",
        *rows,
    ]


_TIMED = {
    "perplexity_calibration": "perplexity+calibration",
    "generation": "generation",
    "downstream": "downstream",
    "icl": "icl",
}


def write_report(results: dict, output_dir: str) -> str:
    """Write `report.md` and its PNG plots into `output_dir`; returns the report's path."""
    s = results["settings"]
    if "paired" not in results and len(results["models"]) > 1:  # e.g. an older results.json
        results = {**results, "paired": paired_statistics(results)}
    plots = _plots(results, output_dir)
    lines = ["# Evaluation report", "", f"Device {results['device']}, dtype {s['dtype']}.", ""]
    if any(group in m for m in results["models"] for group in TEXT_METRICS):
        lines += _text_section(results)
    if any("downstream" in m for m in results["models"]):
        lines.append(f"- Downstream: lm-evaluation-harness tasks {s['lm_eval_tasks']} (full metrics in results.json).")
    if paired := paired_section(results):
        lines += [""] * (lines[-1] != "") + paired
    if any("icl" in m for m in results["models"]):
        lines += [""] * (lines[-1] != "") + icl_section(results)
    timed = [k for k in _TIMED if any(k in m.get("seconds", {}) for m in results["models"])]
    lines += ["", "## Time (seconds)", "", "| model | " + " | ".join(_TIMED[k] for k in timed) + " |"]
    lines.append("|---|" + "---|" * len(timed))
    for m in results["models"]:
        sec = m.get("seconds", {})
        lines.append(f"| {m['label']} | " + " | ".join(_fmt(sec.get(k), digits=1) for k in timed) + " |")
    if plots:
        lines += ["", "## Plots", ""]
        lines += [f"### {title}\n\n![{title}]({os.path.basename(path)})\n" for title, path in plots]
    path = os.path.join(output_dir, "report.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return path
