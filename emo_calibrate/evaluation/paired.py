"""Paired comparisons of every model against a reference model, from the content of `results.json`.

All models of an `emo-calibrate eval` run see the same held-out documents, generation prompts and ICL items (seeded,
so also across runs with the same settings). Differences are therefore measured on paired units, which removes the
variation between units that two separate intervals would both carry:

- perplexity (per token and per word): the ratio `ppl(model) / ppl(reference)`, bootstrap over documents: each
  resample draws documents with replacement and both perplexities, `exp(sum NLL / sum count)`, are recomputed on
  the same draw;
- ECE: the difference, with the same document bootstrap (ECE recomputed from the drawn documents' summed bins);
- rep-n of sampled and greedy continuations: the difference of per-prompt values (sampled: a prompt's rep-n
  averaged over the seeds both models ran), paired bootstrap over prompts;
- MAUVE: one value per run, so the unit is the sampling seed: the mean per-seed difference with a Student t 95 %
  interval from 2 seeds on (a bootstrap of 2 to 5 values is too narrow); a single run: the difference only;
- ICL accuracy: paired bootstrap over test items and an exact McNemar test.

Every bootstrap draws `num_samples` resamples from `seed`, the resamples of `metrics.paired_bootstrap_difference`:
the same inputs give the same intervals.
"""

import math
import statistics
from collections.abc import Sequence

import torch

from .metrics import _percentiles, _resample, mcnemar, paired_bootstrap_difference


__all__ = [
    "resample_weights",
    "paired_perplexity_ratio",
    "paired_ece_difference",
    "seed_difference",
    "merge_results",
    "paired_statistics",
]

DEFAULT_BOOTSTRAP_SAMPLES = 2000

# What fixes the units of a metric group and how they are measured, keyed by the results entry that says the group
# ran: settings, then counts of results.json. Runs merged for pairing must agree on them.
_UNITS = {
    "num_documents": (
        ("eval_data", "split", "text_field", "min_document_words", "max_eval_words", "window", "stride",
         "add_special_tokens", "calibration_bins"),
        ("num_documents", "num_words"),
    ),
    "num_prompts": (
        ("eval_data", "split", "text_field", "min_document_words", "prefix_words", "continuation_words",
         "num_prompts", "max_new_tokens"),
        ("num_prompts",),
    ),
    "icl_tasks": (("icl_shots", "icl_retriever", "icl_max_examples", "icl_template", "icl_seed"), ()),
}  # fmt: skip


def resample_weights(num_units: int, num_samples: int = DEFAULT_BOOTSTRAP_SAMPLES, seed: int = 0) -> torch.Tensor:
    """How often each unit is drawn in each bootstrap resample, `(num_samples, num_units)`.

    The draws are those of `metrics.paired_bootstrap_difference` and `metrics.bootstrap_perplexity` for the same
    `seed`; as counts, any per-unit sum over a resample is one matrix product.
    """
    index = _resample(num_units, num_samples, seed)
    weights = torch.zeros(num_samples, num_units, dtype=torch.float64)
    return weights.scatter_add_(1, index, torch.ones(index.shape, dtype=torch.float64))


def _as_units(*values) -> list[torch.Tensor]:
    tensors = [torch.as_tensor(v, dtype=torch.float64) for v in values]
    if tensors[0].numel() == 0 or any(t.shape != tensors[0].shape for t in tensors):
        raise ValueError("A paired comparison needs the same, non-empty list of units for both models.")
    return tensors


def paired_perplexity_ratio(
    nll: Sequence[float],
    counts: Sequence[float],
    reference_nll: Sequence[float],
    reference_counts: Sequence[float],
    num_samples: int = DEFAULT_BOOTSTRAP_SAMPLES,
    seed: int = 0,
) -> dict[str, float]:
    """`ppl / ppl_reference` over the same documents, with a 95 % bootstrap interval over documents.

    Args:
        nll, counts: the model's summed NLL and unit count (tokens or words) of each document.
        reference_nll, reference_counts: the same for the reference model, documents in the same order.
        num_samples, seed: bootstrap resamples and their seed; each resample draws the same documents for both.

    Returns:
        `{"ratio", "low", "high"}`, where a perplexity is `exp(sum nll / sum counts)` over the (drawn) documents.
    """
    a, ca, b, cb = _as_units(nll, counts, reference_nll, reference_counts)
    w = resample_weights(a.numel(), num_samples, seed)
    log_ratio = w @ a / (w @ ca).clamp(min=1e-12) - w @ b / (w @ cb).clamp(min=1e-12)
    low, high = _percentiles(log_ratio.exp())
    return {"ratio": math.exp(a.sum() / ca.sum() - b.sum() / cb.sum()), "low": low, "high": high}


def _ece(bins: torch.Tensor) -> torch.Tensor:
    """ECE of summed bins `(3, ..., num_bins)` (count, confidence sum, correct sum), as `CalibrationBins.ece`."""
    count, confidence_sum, correct_sum = bins
    return (correct_sum - confidence_sum).abs().sum(-1) / count.sum(-1).clamp(min=1e-12)


def paired_ece_difference(
    bins: Sequence, reference_bins: Sequence, num_samples: int = DEFAULT_BOOTSTRAP_SAMPLES, seed: int = 0
) -> dict[str, float]:
    """`ECE - ECE_reference` over the same documents, with a 95 % bootstrap interval over documents.

    Args:
        bins, reference_bins: per-document calibration bins, `(3, num_documents, num_bins)`: the `count`,
            `confidence_sum` and `correct_sum` lists of `calibration.per_document` in results.json.
        num_samples, seed: bootstrap resamples and their seed; each resample draws the same documents for both.

    Returns:
        `{"difference", "low", "high"}`; ECE of a resample is that of the drawn documents' summed bins.
    """
    a, b = _as_units(bins, reference_bins)
    if a.dim() != 3 or a.shape[0] != 3:
        raise ValueError(f"Calibration bins must be (3, documents, bins), got {tuple(a.shape)}.")
    w = resample_weights(a.shape[1], num_samples, seed)
    low, high = _percentiles(_ece(w @ a) - _ece(w @ b))  # (S, D) @ (3, D, B): the resampled bins, (3, S, B)
    return {"difference": (_ece(a.sum(1)) - _ece(b.sum(1))).item(), "low": low, "high": high}


def seed_difference(values: Sequence[float], reference_values: Sequence[float]) -> dict:
    """Mean of per-seed differences `values - reference_values`, with a Student t 95 % interval over seeds.

    Returns:
        `{"difference", "low", "high"}`; `low` and `high` are `None` for a single seed (nothing to spread).
    """
    diff = [a - b for a, b in zip(values, reference_values, strict=True)]
    mean = sum(diff) / len(diff)
    if len(diff) < 2:
        return {"difference": mean, "low": None, "high": None}
    from scipy.stats import t  # there whenever MAUVE is: mauve-text needs scikit-learn, which needs scipy

    half = t.ppf(0.975, len(diff) - 1) * statistics.stdev(diff) / math.sqrt(len(diff))
    return {"difference": mean, "low": mean - half, "high": mean + half}


def _entry(kind: str, result: dict, reference: float, value: float, n: int, unit: str, method: str, **extra) -> dict:
    """One paired statistic as results.json keeps it; `excludes_null`: the interval excludes 0 (1 for a ratio)."""
    estimate, low, high = result[kind], result["low"], result["high"]
    null = 1.0 if kind == "ratio" else 0.0
    return {
        "statistic": kind,
        "estimate": estimate,
        "ci95": None if low is None else [low, high],
        "reference": reference,
        "model": value,
        "n": n,
        "unit": unit,
        "method": method,
        **extra,
        "excludes_null": low is not None and not low <= null <= high,
    }


def _mean(values) -> float:
    return sum(values) / len(values)


def _perplexity(model: dict, ref: dict, num_samples: int, seed: int) -> dict:
    a, b = (e.get("perplexity", {}).get("per_document") for e in (model, ref))
    out = {}
    for unit, count in (("token", "tokens"), ("word", "words")):
        if a and b and count in a and count in b:
            ratio = paired_perplexity_ratio(a["nll"], a[count], b["nll"], b[count], num_samples, seed)
            values = ref["perplexity"][unit], model["perplexity"][unit]
            out[unit] = _entry("ratio", ratio, *values, len(a["nll"]), "documents", "paired bootstrap", seed=seed)
    return out


def _calibration(model: dict, ref: dict, num_samples: int, seed: int) -> dict:
    a, b = (e.get("calibration", {}).get("per_document") for e in (model, ref))
    if not (a and b):
        return {}
    fields = ("count", "confidence_sum", "correct_sum")
    diff = paired_ece_difference([a[f] for f in fields], [b[f] for f in fields], num_samples, seed)
    values = ref["calibration"]["ece"], model["calibration"]["ece"]
    return {"ece": _entry("difference", diff, *values, len(a["count"]), "documents", "paired bootstrap", seed=seed)}


def _runs(entry: dict, mode: str) -> dict:
    return {run["seed"]: run for run in entry.get("generation", {}).get(mode, {}).get("runs", [])}


def _generation(model: dict, ref: dict, num_samples: int, seed: int) -> dict:
    out = {}
    for mode in ("sample", "greedy"):
        runs, ref_runs = _runs(model, mode), _runs(ref, mode)
        if mode == "greedy" and runs and ref_runs:  # deterministic: its one run pairs whatever seed it is filed under
            ref_runs = {next(iter(runs)): next(iter(ref_runs.values()))}
        seeds = [s for s in runs if s in ref_runs]
        if not seeds:
            continue
        pairs = [[r[s] for s in seeds] for r in (runs, ref_runs)]
        result = {}
        names = [k for k in pairs[0][0].get("per_prompt", {}) if k in pairs[1][0].get("per_prompt", {})]
        for name in names:  # a prompt's rep-n averaged over the seeds: one value per prompt and model
            a, b = ([_mean(v) for v in zip(*(r["per_prompt"][name] for r in p))] for p in pairs)
            diff = paired_bootstrap_difference(a, b, num_samples, seed)
            n, extra = len(a), dict(seed=seed, seeds=seeds)
            result[name] = _entry("difference", diff, _mean(b), _mean(a), n, "prompts", "paired bootstrap", **extra)
        if all("mauve" in r for p in pairs for r in p):
            a, b = ([r["mauve"] for r in p] for p in pairs)
            method = "Student t over seeds" if len(seeds) > 1 else "one run: no interval"
            unit = "seeds" if mode == "sample" else "run"
            result["mauve"] = _entry("difference", seed_difference(a, b), _mean(b), _mean(a), len(a), unit, method)
            result["mauve"]["seeds"] = seeds
        if result:
            out[mode] = result
    return out


def _icl(model: dict, ref: dict, num_samples: int, seed: int) -> dict:
    out = {}
    for task, result in model.get("icl", {}).items():
        a, b = result["correct"], ref.get("icl", {}).get(task, {}).get("correct")
        if b is None:
            continue
        diff = paired_bootstrap_difference(a, b, num_samples, seed)
        values, n = (_mean(b), _mean(a)), len(a)
        out[task] = _entry(
            "difference", diff, *values, n, "items", "paired bootstrap", seed=seed, mcnemar=mcnemar(a, b)
        )
    return out


_GROUPS = {"perplexity": _perplexity, "calibration": _calibration, "generation": _generation, "icl": _icl}


def merge_results(*results: dict) -> dict:
    """The models of several `results.json` contents of the same held-out data as one, for `paired_statistics`.

    Runs are merged only when every metric group both ran was measured on the same units in the same way (the
    settings and counts of `_UNITS`, the document, word and prompt counts, the MAUVE featurizer when both had one),
    and when no model label repeats; `ValueError` otherwise. Settings and counts are those of the first run.
    """
    if not results:
        raise ValueError("merge_results needs at least one results dict.")
    first = results[0]
    for other in results[1:]:
        differ = []
        for group, (settings, counts) in _UNITS.items():
            if first.get(group) and other.get(group):
                differ += [k for k in settings if first["settings"].get(k) != other["settings"].get(k)]
                differ += [k for k in counts if first.get(k) != other.get(k)]
        if first.get("featurizer") and other.get("featurizer") and first["featurizer"] != other["featurizer"]:
            differ.append("featurizer")
        if differ:
            raise ValueError(f"Cannot pair models of these runs: they differ in {sorted(set(differ))}.")
    labels = [m["label"] for r in results for m in r["models"]]
    if len(set(labels)) != len(labels):
        raise ValueError(f"A model label appears twice in {labels}: pairs are named by label.")
    merged = {k: v for k, v in first.items() if k != "paired"}
    for key in ("num_documents", "num_words", "num_prompts", "featurizer"):
        merged[key] = next((r[key] for r in results if r.get(key)), first.get(key))
    merged["icl_tasks"] = {t: d for r in results for t, d in (r.get("icl_tasks") or {}).items()}
    merged["models"] = [m for r in results for m in r["models"]]
    return merged


def paired_statistics(
    results: dict | Sequence[dict],
    reference: str | None = None,
    *,
    num_samples: int | None = None,
    seed: int | None = None,
) -> dict:
    """The paired difference of every model against `reference` for each metric with per-unit data.

    Args:
        results: the content of a `results.json` (as `run_evaluation` returns it), or several of them on the same
            held-out data (merged with `merge_results`), e.g. two evaluation runs of one study.
        reference: the label of the reference model; defaults to the first model.
        num_samples: bootstrap resamples; defaults to the run's `bootstrap_samples` (2000 when it has none).
        seed: bootstrap seed; defaults to the run's `seed`.

    Returns:
        `{"reference", "num_samples", "seed", "models": {label: {"perplexity": {"token", "word"}, "calibration":
        {"ece"}, "generation": {mode: {"rep-1", ..., "mauve"}}, "icl": {task}}}}`, a group only where both models
        have its per-unit data. Each statistic: `statistic` (`"ratio"` or `"difference"`, model vs reference),
        `estimate`, `ci95` (`[low, high]`, or `None` for a single run), `reference` and `model` values, `n` units
        of `unit`, `method`, the bootstrap `seed`, `seeds` (the sampling seeds used, for generation),
        `excludes_null`, and `mcnemar` for ICL.
    """
    if not isinstance(results, dict):
        results = merge_results(*results)
    models, settings = results["models"], results.get("settings", {})
    labels = [m["label"] for m in models]
    reference = labels[0] if reference is None else reference
    if reference not in labels:
        raise ValueError(f"No model {reference!r} to pair against: the models are {labels}.")
    num_samples = num_samples or settings.get("bootstrap_samples") or DEFAULT_BOOTSTRAP_SAMPLES
    seed = settings.get("seed", 0) if seed is None else seed
    ref = models[labels.index(reference)]
    out = {"reference": reference, "num_samples": num_samples, "seed": seed, "models": {}}
    for model in models:
        if model is not ref:
            groups = {name: pair(model, ref, num_samples, seed) for name, pair in _GROUPS.items()}
            out["models"][model["label"]] = {name: group for name, group in groups.items() if group}
    return out
