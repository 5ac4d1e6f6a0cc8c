"""Defaults study (issue 19): every EMO checkpoint against its MLE twin at the same step, from `emo-calibrate eval`
reports, as a table (summary.md, summary.json) and one plot (tradeoff.png: perplexity cost against repetition
reduction, a curve per setting through its checkpoints).

Labels follow `<lora>_<weighting>-<step>` (e.g. `off_emo-104`; `off` = the official LoRA setting, `lin` = all-linear;
`mle`, `emo` = emo_anchored, `mla` = mle_anchored); the twin of `off_emo-104` is `off_mle-104`. A `base` model, when
present, gives each checkpoint's perplexity relative to the starting model (what the perplexity budget watches).

    python docs/results/defaults/summarize.py --reports runs/study19/eval/base runs/study19/eval/step-*/ \
        --runs runs/study19 --icl_reports runs/study19/eval/icl-*/ --final_reports runs/study19/eval/final-*/ \
        --output docs/results/defaults
"""

import argparse
import glob
import json
import math
import os
import re
import sys


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))

from emo_calibrate.evaluation import merge_results, paired_statistics  # noqa: E402


LABEL = re.compile(r"^(?P<lora>[a-z]+)_(?P<weighting>[a-z]+)-(?P<step>\d+)$")
GOAL = {"ppl": 1.05, "ece": 1.5, "rep4": 0.6}  # issue 19: ratios to the MLE twin a default should meet


def load(folders: list[str]) -> dict:
    results = []
    for folder in folders:
        with open(os.path.join(folder, "results.json"), encoding="utf-8") as f:
            results.append(json.load(f))
    return merge_results(*results) if len(results) > 1 else results[0]


def twin_of(label: str) -> str | None:
    """The MLE twin's label of an EMO checkpoint label (`off_emo-104` -> `off_mle-104`); None for MLE runs and others."""
    match = LABEL.match(label)
    return f"{match['lora']}_mle-{match['step']}" if match and match["weighting"] != "mle" else None


def goal_checks(row: dict) -> dict[str, bool | None]:
    """The goal's three checkpoint criteria for a `rows()` row, each against the twin; None = not measured."""
    bounded = {"ppl": "ppl_ratio", "ece": "ece_ratio", "rep4": "rep4_ratio"}
    return {k: None if row.get(key) is None else row[key] <= GOAL[k] for k, key in bounded.items()}


def _ratio(entry: dict) -> float | None:
    return entry["model"] / entry["reference"] if entry and entry["reference"] else None


def rows(results: dict) -> list[dict]:
    """One row per EMO checkpoint with a twin: the paired statistics against the twin (and against `base`)."""
    labels = [m["label"] for m in results["models"]]
    against_base = paired_statistics(results, "base")["models"] if "base" in labels else {}
    out = []
    for label in labels:
        twin = twin_of(label)
        if twin not in labels:
            continue
        match = LABEL.match(label)
        pair = paired_statistics(results, twin)["models"][label]
        ppl = pair["perplexity"]["token"]
        ece = pair["calibration"]["ece"]
        rep4 = pair.get("generation", {}).get("greedy", {}).get("rep-4")
        row = dict(
            label=label,
            setting=f"{match['lora']}_{match['weighting']}",
            step=int(match["step"]),
            ppl_ratio=ppl["estimate"],
            ppl_ci=ppl["ci95"],
            ece=ece["model"],
            ece_twin=ece["reference"],
            ece_ratio=_ratio(ece),
            ece_diff_ci=ece["ci95"],
            rep4=rep4 and rep4["model"],
            rep4_twin=rep4 and rep4["reference"],
            rep4_ratio=_ratio(rep4),
            rep4_diff_ci=rep4 and rep4["ci95"],
            ppl_vs_base=against_base.get(label, {}).get("perplexity", {}).get("token", {}).get("estimate"),
            twin_ppl_vs_base=against_base.get(twin, {}).get("perplexity", {}).get("token", {}).get("estimate"),
        )
        row["meets_goal"] = all(goal_checks(row).values())
        out.append(row)
    return sorted(out, key=lambda r: (r["setting"], r["step"]))


def training_windows(runs_dir: str, window: int = 52) -> list[dict]:
    """Per `window` steps, each EMO run's mean training cross-entropy (`mle`) and next-token entropy against its MLE
    twin's, from the runs' own logs. In one epoch every batch is new when it is scored, so this is a held-out-like
    estimate on the training distribution, at every step and for free."""
    logs = {}
    for name in sorted(os.listdir(runs_dir)):
        path = os.path.join(runs_dir, name, "trainer_state.json")
        checkpoints = sorted(
            glob.glob(os.path.join(runs_dir, name, "checkpoint-*")), key=lambda p: int(p.split("-")[-1])
        )
        if not os.path.isfile(path) and checkpoints:  # a run still training: its latest checkpoint's log
            path = os.path.join(checkpoints[-1], "trainer_state.json")
        if "_" in name and os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                logs[name] = [e for e in json.load(f)["log_history"] if "mle" in e and "eval_mle" not in e]
    out = []
    for name, entries in logs.items():
        lora, weighting = name.split("_", 1)
        twin = logs.get(f"{lora}_mle")
        if weighting == "mle" or twin is None:
            continue
        last = max(e["step"] for e in entries)
        for end in range(window, last + window, window):
            mine = [e for e in entries if end - window < e["step"] <= end]
            theirs = [e for e in twin if end - window < e["step"] <= end]
            if not mine or not theirs:
                continue
            mean = lambda rows, key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
            out.append(
                dict(
                    setting=name,
                    steps=f"{end - window + 1}-{min(end, last)}",
                    train_ppl_ratio=math.exp(mean(mine, "mle") - mean(theirs, "mle")),
                    entropy=mean(mine, "entropy"),
                    entropy_twin=mean(theirs, "entropy"),
                )
            )
    return out


def training_table(windows: list[dict]) -> str:
    lines = [
        "| setting | steps | training perplexity / twin's | next-token entropy (twin) |",
        "|---|---|---|---|",
    ]
    for w in windows:
        lines.append(
            f"| {w['setting']} | {w['steps']} | {w['train_ppl_ratio']:.3f} | {w['entropy']:.2f} ({w['entropy_twin']:.2f}) |"
        )
    return "\n".join(lines) + "\n"


def icl_table(results: dict) -> str:
    """ICL accuracy per task of every model that ran it, and each EMO model against its twin (paired, McNemar)."""
    models = [m for m in results["models"] if m.get("icl")]
    if not models:
        return ""
    labels = [m["label"] for m in models]
    tasks = list(models[0]["icl"])
    lines = [
        "| task | " + " | ".join(labels) + " | EMO - twin, points [95 %], McNemar p |",
        "|---" * (len(labels) + 2) + "|",
    ]
    pairs = {}
    for label in labels:
        twin = twin_of(label)
        if twin in labels:
            pairs[label] = paired_statistics(results, twin)["models"][label]["icl"]
    for task in tasks:
        accuracy = [f"{100 * m['icl'][task]['accuracy']:.1f}" for m in models]
        diffs = [
            f"{label}: {100 * p[task]['estimate']:+.1f} [{100 * p[task]['ci95'][0]:+.1f}, {100 * p[task]['ci95'][1]:+.1f}], "
            f"p = {p[task]['mcnemar']['p_value']:.2f}"
            for label, p in pairs.items()
        ]
        lines.append(f"| {task} | " + " | ".join(accuracy) + f" | {'; '.join(diffs) or '-'} |")
    return "\n".join(lines) + "\n"


def final_table(results: dict) -> str:
    """End-of-epoch generation of the finalists: MAUVE and rep-4 of sampled text (mean over seeds), greedy rep-4,
    and each model against `base` and each EMO model against its twin (paired: prompts for rep-4, seeds for MAUVE)."""
    models = [m for m in results["models"] if m.get("generation", {}).get("sample")]
    if not models:
        return ""
    labels = [m["label"] for m in models]
    human = results["models"][0].get("generation", {}).get("human", {})
    lines = [
        "| model | MAUVE (sampled) | sampled rep-4 | greedy rep-4 | against | MAUVE diff. [95 %] | sampled rep-4 diff. [95 %] |",
        "|---|---|---|---|---|---|---|",
    ]
    for model in models:
        gen = model["generation"]
        sample, greedy = gen["sample"]["mean"], gen.get("greedy", {}).get("mean", {})
        candidates = ("base", twin_of(model["label"]))
        against = [r for r in candidates if r in labels and r != model["label"]]
        cells = []
        for reference in against:
            pair = paired_statistics(results, reference)["models"][model["label"]]["generation"]["sample"]
            mauve, rep4 = pair.get("mauve"), pair.get("rep-4")
            cells.append(
                (
                    reference,
                    "-" if not mauve else f"{mauve['estimate']:+.3f}{_ci(mauve['ci95'])}",
                    "-" if not rep4 else f"{rep4['estimate']:+.3f}{_ci(rep4['ci95'])}",
                )
            )
        cells = cells or [("-", "-", "-")]
        for i, (reference, mauve_diff, rep_diff) in enumerate(cells):
            head = (
                f"| {model['label']} | {_f(sample.get('mauve'))} | {_f(sample.get('rep-4'))} | {_f(greedy.get('rep-4'))} "
                if i == 0
                else "| | | | "
            )
            lines.append(head + f"| {reference} | {mauve_diff} | {rep_diff} |")
    if human.get("rep-4") is not None:
        lines.append(f"| human continuations | - | {human['rep-4']:.3f} | - | | | |")
    return "\n".join(lines) + "\n"


def scorecard(table_rows: list[dict], icl_results: dict | None, final_results: dict | None) -> str:
    """The goal's five criteria for every EMO finalist (a model in the ICL or final reports), each against its twin:
    perplexity <= 1.05x, ECE <= 1.5x, MAUVE >= the twin's (point estimate, mean over seeds), ICL not below the
    twin's (no task whose paired interval lies below zero), greedy rep-4 <= 0.6x. "-" = not measured."""
    by_label = {r["label"]: r for r in table_rows}
    finalists = []
    for results in (icl_results, final_results):
        for model in (results or {}).get("models", []):
            if twin_of(model["label"]) and model["label"] not in finalists:
                finalists.append(model["label"])
    if not finalists:
        return ""

    def against_twin(results, label):
        twin = twin_of(label)
        labels = [m["label"] for m in (results or {}).get("models", [])]
        if label not in labels or twin not in labels:
            return None
        return paired_statistics(results, twin)["models"][label]

    yes_no = lambda ok: "-" if ok is None else ("yes" if ok else "no")  # noqa: E731
    lines = [
        "| model | ppl <= 1.05x | ECE <= 1.5x | MAUVE >= twin | ICL not below twin (mean diff., points) "
        "| greedy rep-4 <= 0.6x | met |",
        "|---|---|---|---|---|---|---|",
    ]
    for label in finalists:
        ppl, ece, rep4 = goal_checks(by_label.get(label, {})).values()
        final = against_twin(final_results, label)
        mauve_pair = final and final.get("generation", {}).get("sample", {}).get("mauve")
        mauve = None if not mauve_pair else mauve_pair["estimate"] >= 0
        icl_pair = (against_twin(icl_results, label) or {}).get("icl")
        icl, icl_mean = None, ""
        if icl_pair:
            icl = not any(t["excludes_null"] and t["estimate"] < 0 for t in icl_pair.values())
            icl_mean = f" ({100 * sum(t['estimate'] for t in icl_pair.values()) / len(icl_pair):+.1f})"
        checks = [ppl, ece, mauve, icl, rep4]
        lines.append(
            f"| {label} | {yes_no(ppl)} | {yes_no(ece)} | {yes_no(mauve)} | {yes_no(icl)}{icl_mean} | {yes_no(rep4)} "
            f"| {sum(bool(c) for c in checks)} of {sum(c is not None for c in checks)} |"
        )
    return "\n".join(lines) + "\n"


def _f(value, digits=3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _ci(ci, digits=3) -> str:
    return "" if not ci else f" [{ci[0]:+.{digits}f}, {ci[1]:+.{digits}f}]"


def table(table_rows: list[dict]) -> str:
    lines = [
        "| setting | step | ppl / twin [95 %] | ppl / start (twin) | ECE (twin) | ECE / twin | greedy rep-4 (twin) "
        "| rep-4 / twin (diff. [95 %]) | goal |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in table_rows:
        ppl_ci = f" [{r['ppl_ci'][0]:.3f}, {r['ppl_ci'][1]:.3f}]" if r["ppl_ci"] else ""
        lines.append(
            f"| {r['setting']} | {r['step']} | {r['ppl_ratio']:.3f}{ppl_ci} | {_f(r['ppl_vs_base'])} "
            f"({_f(r['twin_ppl_vs_base'])}) | {_f(r['ece'])} ({_f(r['ece_twin'])}) | {_f(r['ece_ratio'], 2)} | "
            f"{_f(r['rep4'])} ({_f(r['rep4_twin'])}) | {_f(r['rep4_ratio'], 2)}{_ci(r['rep4_diff_ci'])} | "
            f"{'yes' if r['meets_goal'] else 'no'} |"
        )
    return "\n".join(lines) + "\n"


def plot(table_rows: list[dict], path: str) -> None:
    """Two panels, one curve per setting through its checkpoints: perplexity (left) and ECE (right), each against the
    MLE twin, over the greedy rep-4 reduction; the dashed lines are the goal's bounds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    panels = [
        ("ppl_ratio", GOAL["ppl"], "held-out perplexity / MLE twin's"),
        ("ece_ratio", GOAL["ece"], "top-token ECE / MLE twin's"),
    ]
    for ax, (key, bound, label) in zip(axes, panels):
        for setting in sorted({r["setting"] for r in table_rows}):
            points = [r for r in table_rows if r["setting"] == setting and r["rep4_ratio"] is not None]
            if not points:
                continue
            xs = [100 * (1 - r["rep4_ratio"]) for r in points]
            ys = [r[key] for r in points]
            ax.plot(xs, ys, marker="o", label=setting)
            for i, (x, y, r) in enumerate(zip(xs, ys, points)):
                # Alternate above / below so that close checkpoints keep readable labels.
                offset = (4, 4) if i % 2 == 0 else (4, -10)
                ax.annotate(str(r["step"]), (x, y), textcoords="offset points", xytext=offset, fontsize=7)
        ax.axhline(bound, color="grey", linestyle="--", linewidth=0.8)
        ax.axvline(100 * (1 - GOAL["rep4"]), color="grey", linestyle="--", linewidth=0.8)
        ax.set_xlabel("greedy rep-4 reduction against the MLE twin (%)")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    fig.suptitle("EMO: repetition bought against perplexity and calibration (labels: step)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reports", nargs="+", required=True, help="emo-calibrate eval output folders")
    parser.add_argument("--icl_reports", nargs="*", default=[], help="emo-calibrate eval folders of `--metrics icl`")
    parser.add_argument(
        "--final_reports", nargs="*", default=[], help="folders of `eval.sh ... final` (MAUVE, sampled)"
    )
    parser.add_argument("--runs", help="the runs' folder: adds the training-log comparison per 52-step window")
    parser.add_argument("--output", required=True, help="folder for summary.md, summary.json, tradeoff.png")
    args = parser.parse_args(argv)
    results = load(args.reports)
    table_rows = rows(results)
    windows = training_windows(args.runs) if args.runs else []
    os.makedirs(args.output, exist_ok=True)
    with open(os.path.join(args.output, "summary.json"), "w", encoding="utf-8") as f:
        json.dump({"checkpoints": table_rows, "training_windows": windows}, f, indent=1)
    icl_results = load(args.icl_reports) if args.icl_reports else None
    final_results = load(args.final_reports) if args.final_reports else None
    icl = icl_table(icl_results) if icl_results else ""
    final = final_table(final_results) if final_results else ""
    score = scorecard(table_rows, icl_results, final_results)
    text = table(table_rows) + ("\n" + training_table(windows) if windows else "")
    text += ("\n" + icl if icl else "") + ("\n" + final if final else "") + ("\n" + score if score else "")
    with open(os.path.join(args.output, "summary.md"), "w", encoding="utf-8") as f:
        f.write(text)
    plot(table_rows, os.path.join(args.output, "tradeoff.png"))
    print(text)


if __name__ == "__main__":
    main()
