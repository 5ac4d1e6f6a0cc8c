"""Paired statistics against slow, obvious references: Python-loop bootstraps on the same resamples, pooled ECE."""

import json
import math
import random

import pytest
import torch

from emo_calibrate.evaluation import merge_results, paired_statistics
from emo_calibrate.evaluation.metrics import (
    CalibrationAccumulator,
    CalibrationBins,
    _resample,
    bootstrap_perplexity,
    expected_calibration_error,
    paired_bootstrap_difference,
    top1_confidence,
)
from emo_calibrate.evaluation.paired import (
    paired_ece_difference,
    paired_perplexity_ratio,
    resample_weights,
    seed_difference,
)
from emo_calibrate.evaluation.report import dumps_results, paired_section


def _quantiles(values: list[float]) -> list[float]:
    """2.5 / 97.5 % percentiles by linear interpolation, as `torch.quantile` (and numpy's default) take them."""
    values = sorted(values)
    out = []
    for q in (0.025, 0.975):
        pos = q * (len(values) - 1)
        low = math.floor(pos)
        out.append(values[low] + (pos - low) * (values[min(low + 1, len(values) - 1)] - values[low]))
    return out


def test_resample_weights_count_the_draws_of_the_bootstrap():
    index = _resample(5, 7, seed=3)
    weights = resample_weights(5, 7, seed=3)
    for row, drawn in zip(weights.tolist(), index.tolist()):
        assert row == [drawn.count(u) for u in range(5)]


def test_perplexity_ratio_equals_a_python_loop_bootstrap_on_the_same_resamples():
    rng = random.Random(0)
    tokens_a = [rng.randint(20, 80) for _ in range(9)]
    tokens_b = [t + rng.randint(-5, 5) for t in tokens_a]  # another tokenizer: other counts
    nll_a = [t * rng.uniform(2.5, 3.5) for t in tokens_a]
    nll_b = [t * rng.uniform(2.5, 3.5) for t in tokens_b]
    got = paired_perplexity_ratio(nll_a, tokens_a, nll_b, tokens_b, num_samples=300, seed=4)
    ratios = []
    for drawn in _resample(9, 300, 4).tolist():  # the same documents for both models in each resample
        ppl_a = math.exp(sum(nll_a[d] for d in drawn) / sum(tokens_a[d] for d in drawn))
        ppl_b = math.exp(sum(nll_b[d] for d in drawn) / sum(tokens_b[d] for d in drawn))
        ratios.append(ppl_a / ppl_b)
    ppl_a, ppl_b = math.exp(sum(nll_a) / sum(tokens_a)), math.exp(sum(nll_b) / sum(tokens_b))
    assert got["ratio"] == pytest.approx(ppl_a / ppl_b, rel=1e-12)
    assert [got["low"], got["high"]] == pytest.approx(_quantiles(ratios), rel=1e-9)
    # with the same counts (one tokenizer, or words) it is the perplexity of the per-document NLL differences
    same = paired_perplexity_ratio(nll_a, tokens_a, nll_b, tokens_a, num_samples=300, seed=4)
    diff = bootstrap_perplexity([a - b for a, b in zip(nll_a, nll_b)], tokens_a, num_samples=300, seed=4)
    assert [same["low"], same["high"]] == pytest.approx([diff["low"], diff["high"]], rel=1e-9)
    with pytest.raises(ValueError, match="same, non-empty"):
        paired_perplexity_ratio(nll_a, tokens_a, nll_b[:-1], tokens_b[:-1])


def _document_bins(seed: int, num_documents: int = 6, num_bins: int = 10):
    """Per-document bins of random next-token predictions, and the pooled predictions they came from."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(200, 7, generator=gen) * 2
    targets = torch.randint(0, 7, (200,), generator=gen)
    documents = torch.randint(0, num_documents, (200,), generator=gen)
    acc = CalibrationAccumulator(num_bins, num_documents=num_documents)
    acc.update(logits[:120], targets[:120], documents[:120])  # in two batches, as the scoring loop feeds it
    acc.update(logits[120:], targets[120:], documents[120:])
    out = acc.compute()
    confidence, correct = top1_confidence(torch.softmax(logits, -1), targets)
    return out, confidence, correct, documents


def test_ece_from_per_document_bins_equals_ece_of_the_pooled_predictions():
    out, confidence, correct, documents = _document_bins(0)
    per_doc = out["per_document"]
    assert len(per_doc["count"]) == 6 and all(len(row) == 10 for row in per_doc["count"])
    assert [sum(row) for row in per_doc["count"]] == [(documents == d).sum().item() for d in range(6)]
    pooled = [[sum(col) for col in zip(*per_doc[f])] for f in ("count", "confidence_sum", "correct_sum")]
    ece = sum(abs(c - a) for c, a in zip(pooled[1], pooled[2])) / sum(pooled[0])
    assert ece == pytest.approx(expected_calibration_error(confidence, correct, 10), abs=1e-12)
    assert ece == pytest.approx(out["ece"], abs=1e-12)
    for d in range(6):  # one document's bins are those of its own predictions
        alone = CalibrationBins.from_predictions(confidence[documents == d], correct[documents == d], 10)
        assert per_doc["count"][d] == alone.count.tolist()
        assert per_doc["confidence_sum"][d] == pytest.approx(alone.confidence_sum.tolist(), abs=1e-12)
        assert per_doc["correct_sum"][d] == alone.correct_sum.tolist()


def test_paired_ece_difference_equals_a_python_loop_bootstrap():
    fields = ("count", "confidence_sum", "correct_sum")
    a, b = ([out["per_document"][f] for f in fields] for out in (_document_bins(1)[0], _document_bins(2)[0]))

    def ece(bins, drawn):
        count, conf, corr = ([sum(bins[k][d][j] for d in drawn) for j in range(10)] for k in range(3))
        return sum(abs(x - y) for x, y in zip(corr, conf)) / sum(count)

    got = paired_ece_difference(a, b, num_samples=200, seed=5)
    loop = [ece(a, drawn) - ece(b, drawn) for drawn in _resample(6, 200, 5).tolist()]
    assert got["difference"] == pytest.approx(ece(a, range(6)) - ece(b, range(6)), abs=1e-12)
    assert [got["low"], got["high"]] == pytest.approx(_quantiles(loop), abs=1e-12)
    zero = paired_ece_difference(a, a, num_samples=50)
    assert zero == {"difference": 0.0, "low": 0.0, "high": 0.0}


def test_seed_difference_is_the_mean_with_a_student_t_interval():
    got = seed_difference([0.9, 0.8, 0.7], [0.6, 0.6, 0.6])
    # differences 0.3, 0.2, 0.1: mean 0.2, sd 0.1, t(0.975, 2) = 4.302652729911275
    half = 4.302652729911275 * 0.1 / math.sqrt(3)
    assert [got["difference"], got["low"], got["high"]] == pytest.approx([0.2, 0.2 - half, 0.2 + half])
    assert seed_difference([0.9], [0.5]) == pytest.approx({"difference": 0.4, "low": None, "high": None})


def _model(label: str, shift: float, seeds=(0, 1), mauve=True) -> dict:
    """A results.json model entry with per-unit data: 5 documents, 6 prompts, 8 ICL items."""
    rng = random.Random(label)
    tokens = [rng.randint(30, 60) for _ in range(5)]
    nll = [t * (3 + shift + rng.uniform(-0.1, 0.1)) for t in tokens]
    words = [t // 2 for t in tokens]
    bins = [[[rng.randint(1, 9) for _ in range(4)] for _ in range(5)] for _ in range(3)]
    bins[1] = [[c * rng.uniform(0.3, 0.9) for c in row] for row in bins[0]]
    bins[2] = [[rng.randint(0, c) for c in row] for row in bins[0]]

    def run(seed):
        per_prompt = {f"rep-{n}": [max(0.0, rng.uniform(0, 0.3) + shift / n) for _ in range(6)] for n in (1, 4)}
        out = {"seed": seed, "per_prompt": per_prompt, **{k: sum(v) / 6 for k, v in per_prompt.items()}}
        return {**out, "mauve": 0.5 + shift + 0.01 * seed} if mauve else out

    count, conf, corr = ([sum(col) for col in zip(*rows)] for rows in bins)  # pooled over documents
    ece = sum(abs(c - a) for c, a in zip(conf, corr)) / sum(count)
    return {
        "label": label,
        "perplexity": {
            "token": math.exp(sum(nll) / sum(tokens)),
            "word": math.exp(sum(nll) / sum(words)),
            "per_document": {"nll": nll, "tokens": tokens, "words": words},
        },
        "calibration": {"ece": ece, "per_document": dict(zip(("count", "confidence_sum", "correct_sum"), bins))},
        "generation": {"sample": {"runs": [run(s) for s in seeds]}, "greedy": {"runs": [run(seeds[0])]}},
        "icl": {"tiny": {"correct": [rng.randint(0, 1) for _ in range(8)]}},
    }


SETTINGS = {"seed": 0, "bootstrap_samples": 500, "eval_data": "held", "window": 16, "num_prompts": 6}


def _results(*models) -> dict:
    return {
        "settings": dict(SETTINGS),
        "num_documents": 5,
        "num_prompts": 6,
        "featurizer": "f",
        "models": list(models),
    }


def test_paired_statistics_point_estimates_are_the_obvious_ones():
    base, emo = _model("base", 0.0), _model("emo", -0.2)
    paired = paired_statistics(_results(base, emo))
    assert (paired["reference"], paired["num_samples"], paired["seed"]) == ("base", 500, 0)
    got = paired["models"]["emo"]
    ppl = got["perplexity"]["token"]
    assert ppl["statistic"] == "ratio" and ppl["n"] == 5 and ppl["unit"] == "documents"
    assert ppl["estimate"] == pytest.approx(emo["perplexity"]["token"] / base["perplexity"]["token"])
    assert ppl["ci95"][0] <= ppl["estimate"] <= ppl["ci95"][1] and ppl["excludes_null"] == (ppl["ci95"][1] < 1)
    assert got["perplexity"]["word"]["estimate"] == pytest.approx(
        emo["perplexity"]["word"] / base["perplexity"]["word"]
    )
    assert got["calibration"]["ece"]["estimate"] == pytest.approx(
        emo["calibration"]["ece"] - base["calibration"]["ece"]
    )
    # sampled rep-n: each prompt averaged over the seeds, then the paired difference of means
    for n in (1, 4):
        a = [sum(r["per_prompt"][f"rep-{n}"][p] for r in emo["generation"]["sample"]["runs"]) / 2 for p in range(6)]
        b = [sum(r["per_prompt"][f"rep-{n}"][p] for r in base["generation"]["sample"]["runs"]) / 2 for p in range(6)]
        rep = got["generation"]["sample"][f"rep-{n}"]
        assert rep["estimate"] == pytest.approx(sum(a) / 6 - sum(b) / 6)
        reference = paired_bootstrap_difference(a, b, num_samples=500, seed=0)
        assert rep["ci95"] == pytest.approx([reference["low"], reference["high"]])
        assert (rep["n"], rep["unit"], rep["seeds"]) == (6, "prompts", [0, 1])
    mauve = got["generation"]["sample"]["mauve"]
    assert mauve["estimate"] == pytest.approx(-0.2) and mauve["n"] == 2 and mauve["method"] == "Student t over seeds"
    assert got["generation"]["greedy"]["mauve"]["ci95"] is None  # one run: the difference only
    icl = got["icl"]["tiny"]
    a, b = emo["icl"]["tiny"]["correct"], base["icl"]["tiny"]["correct"]
    assert icl["estimate"] == pytest.approx((sum(a) - sum(b)) / 8) and icl["mcnemar"]["a_only"] == sum(
        x > y for x, y in zip(a, b)
    )
    assert paired_statistics(_results(base, emo)) == paired  # seeded: deterministic
    against_emo = paired_statistics(_results(base, emo), reference="emo", num_samples=100)
    assert list(against_emo["models"]) == ["base"] and against_emo["num_samples"] == 100
    with pytest.raises(ValueError, match="No model 'mle'"):
        paired_statistics(_results(base, emo), reference="mle")


def test_merged_runs_pair_across_reports_and_refuse_other_units():
    base, emo, mle = _model("base", 0.0), _model("emo", -0.2), _model("mle", 0.1, seeds=(0, 2), mauve=False)
    first, second = _results(base, emo), _results(mle)
    second["featurizer"] = None  # a run without MAUVE merges with one that has it
    across = paired_statistics([first, second], reference="mle")
    assert list(across["models"]) == ["base", "emo"]
    assert across["models"]["emo"]["generation"]["sample"]["rep-4"]["seeds"] == [0]  # the seeds both ran
    assert "mauve" not in across["models"]["emo"]["generation"]["sample"]
    assert (
        across["models"]["emo"]["perplexity"] == paired_statistics(_results(mle, emo))["models"]["emo"]["perplexity"]
    )
    other = _results(mle)
    other["settings"]["window"] = 32
    with pytest.raises(ValueError, match="differ in \\['window'\\]"):
        merge_results(first, other)
    with pytest.raises(ValueError, match="appears twice"):
        merge_results(first, _results(_model("emo", 0.0)))


def test_paired_table_renders_with_markers():
    base, emo = _model("base", 0.0), _model("emo", -0.5)
    results = _results(base, emo)
    results["paired"] = paired_statistics(results)
    lines = paired_section(results)
    text = "\n".join(lines)
    assert lines[0] == "## Paired differences against base"
    assert "| model | metric | base | model | change [95 % CI] | units |" in text
    ppl = results["paired"]["models"]["emo"]["perplexity"]["token"]
    row = next(line for line in lines if line.startswith("| emo | ppl/token |"))
    assert f"{ppl['estimate']:.3f} [{ppl['ci95'][0]:.3f}, {ppl['ci95'][1]:.3f}] *" in row and "5 documents" in row
    assert "| emo | rep-4 (sample) |" in text and "6 prompts, seeds 0 1" in text
    assert "(one run: no interval)" in next(line for line in lines if "MAUVE (greedy)" in line)
    assert paired_section(_results(base)) == []


def test_dumps_results_keeps_lists_on_one_line_and_reads_back():
    value = {"a": [1, 2.5, None], "b": {"c": [[1, 2], [3]], 0: "x"}, "d": [{"e": []}], "f": {}, "é": ["ü"]}
    text = dumps_results(value)
    assert json.loads(text) == json.loads(json.dumps(value))
    assert '"a": [1, 2.5, null]' in text and "      [1, 2],\n" in text and '"é": ["ü"]' in text
