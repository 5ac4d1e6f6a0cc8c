"""Training curves of the calibration study's runs (docs/results.md), from each run's `trainer_state.json`.

Every run logs the same quantities on its own batches, whatever it optimises (`emo_weighting: mle` still measures
EMO), so the curves compare like with like: `mle` (training cross-entropy), `emd` (the transport cost itself) and
`entropy` (of the next-token distribution).

    python docs/results/study/plot_training.py --runs mle=runs/study/mle emo=runs/study/emo \
        --output docs/results/study/training_curves.png
"""

import argparse
import json
import os
import sys


KEYS = ("mle", "emd", "entropy")


def log_history(run_dir):
    """The run's logged steps: `trainer_state.json` of the run, else of its latest checkpoint."""
    path = os.path.join(run_dir, "trainer_state.json")
    if not os.path.isfile(path):
        checkpoints = sorted(
            (d for d in os.listdir(run_dir) if d.startswith("checkpoint-")), key=lambda d: int(d.split("-")[1])
        )
        if not checkpoints:
            raise SystemExit(f"{run_dir}: no trainer_state.json")
        path = os.path.join(run_dir, checkpoints[-1], "trainer_state.json")
    with open(path, encoding="utf-8") as f:
        return [row for row in json.load(f)["log_history"] if "mle" in row]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", required=True, help="LABEL=RUN_DIR pairs.")
    parser.add_argument("--output", required=True, help="PNG file to write.")
    args = parser.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = dict(spec.split("=", 1) for spec in args.runs)
    histories = {label: log_history(path) for label, path in runs.items()}
    keys = [k for k in KEYS if all(k in rows[0] for rows in histories.values() if rows)]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for label, rows in histories.items():
            ax.plot([r["step"] for r in rows], [r[key] for r in rows], label=label)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(args.output, dpi=110)
    for label, rows in histories.items():
        first, last = rows[0], rows[-1]
        print(label, *(f"{k} {first[k]:.3f} -> {last[k]:.3f} (step {last['step']})" for k in keys), sep="  ")
    return 0


if __name__ == "__main__":
    sys.exit(main())
