"""Calibration of next-token probabilities on held-out text: ECE, Brier score and reliability diagrams.

A well-calibrated LM is right about 70% of the time when its top token has probability 0.7. EMO's claim is a better
calibrated distribution than MLE fine-tuning gives; these numbers measure that directly on the user's text. The
definitions (top-label ECE, multi-class Brier) are in `metrics.py`; the windowing is the one of `perplexity.py`.
"""

import os
from collections.abc import Mapping, Sequence

from .metrics import CalibrationAccumulator
from .perplexity import score_texts


__all__ = ["evaluate_calibration", "plot_reliability"]


def evaluate_calibration(
    model,
    tokenizer,
    documents: Sequence[str],
    *,
    num_bins: int = 15,
    window: int = 512,
    stride: int = 512,
    batch_size: int = 4,
    add_special_tokens: bool = True,
    show_progress: bool = True,
) -> dict:
    """ECE, Brier score, accuracy, mean confidence and reliability-curve data of `model` on `documents`.

    Returns:
        `dict` as `CalibrationAccumulator.compute()`: `ece`, `brier`, `accuracy`, `mean_confidence`,
        `mean_target_prob`, `num_tokens`, `num_bins`, `curve` (per non-empty bin: `bin_low`, `bin_high`,
        `confidence`, `accuracy`, `count`) and `per_document` (each document's bins: `count`, `confidence_sum`,
        `correct_sum`, for paired comparisons).
    """
    acc = CalibrationAccumulator(num_bins, num_documents=len(documents))
    kwargs = dict(window=window, stride=stride, batch_size=batch_size, add_special_tokens=add_special_tokens)
    score_texts(model, tokenizer, documents, [acc], show_progress=show_progress, desc="calibration", **kwargs)
    return acc.compute()


def plot_reliability(curves: Mapping[str, dict], path: str | os.PathLike, title: str = "Reliability diagram") -> str:
    """Overlay the reliability curves of several models in one PNG.

    Args:
        curves: model label -> a calibration result (`evaluate_calibration` output, with `curve` and `ece`).
        path: the PNG to write.
        title: figure title.

    Returns:
        `str`: `path`.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_hist) = plt.subplots(
        2, 1, figsize=(6, 7), sharex=True, gridspec_kw={"height_ratios": [3, 1]}, constrained_layout=True
    )
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfect calibration")
    for label, result in curves.items():
        curve = result["curve"]
        line = ax.plot(
            curve["confidence"], curve["accuracy"], marker="o", ms=3, label=f"{label} (ECE {result['ece']:.3f})"
        )
        total = sum(curve["count"]) or 1
        ax_hist.plot(curve["confidence"], [c / total for c in curve["count"]], marker=".", color=line[0].get_color())
    ax.set_ylabel("accuracy of the top token")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper left")
    ax_hist.set_xlabel("confidence (largest next-token probability)")
    ax_hist.set_ylabel("share of tokens")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return os.fspath(path)
