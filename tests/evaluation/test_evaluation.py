"""Evaluation: metrics against hand-worked examples, model paths against slow references, runner, report and CLI."""

import json
import math
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from emo_calibrate.evaluation.metrics import (
    CalibrationAccumulator,
    CalibrationBins,
    NLLAccumulator,
    bootstrap_perplexity,
    brier_score,
    distinct_n,
    expected_calibration_error,
    mean_rep_n,
    perplexity,
    rep_n,
    repetition_summary,
    sequence_repetition_rate,
    token_nll,
    top1_confidence,
    word_perplexity,
)
from emo_calibrate.evaluation.perplexity import evaluate_perplexity, score_documents, window_spans
from emo_calibrate.evaluation.texts import load_eval_documents, pack_short_documents, truncate_words


# ---------------------------------------------------------------------------------------------------------------
# Pure metrics: worked examples
# ---------------------------------------------------------------------------------------------------------------

# Three next-token distributions over 2 tokens; top-1 confidences 0.85, 0.65, 0.75 fall in separate bins (of 10),
# away from bin edges. Top-1 predictions 0, 0, 1 against targets 0, 1, 1: correct, wrong, correct.
PROBS = torch.tensor([[0.85, 0.15], [0.65, 0.35], [0.25, 0.75]])
TARGETS = torch.tensor([0, 1, 1])


def test_uniform_model_has_perplexity_vocab_size():
    V = 37
    nll = token_nll(torch.zeros(5, V), torch.tensor([0, 3, 7, 36, 1]))
    torch.testing.assert_close(nll, torch.full((5,), math.log(V)))
    assert perplexity(nll.sum().item(), 5) == pytest.approx(V)


def test_word_perplexity_divides_total_nll_by_words():
    # 6 tokens of total NLL 2 ln 3 spread over 2 words: word perplexity exp(2 ln 3 / 2) = 3, token exp(ln 3 / 3)
    assert word_perplexity(2 * math.log(3), 2) == pytest.approx(3.0)
    assert perplexity(2 * math.log(3), 6) == pytest.approx(3 ** (1 / 3))
    with pytest.raises(ValueError, match="positive count"):
        perplexity(1.0, 0)


def test_top1_confidence_and_brier_by_hand():
    conf, correct = top1_confidence(PROBS, TARGETS)
    torch.testing.assert_close(conf, torch.tensor([0.85, 0.65, 0.75]))
    assert correct.tolist() == [True, False, True]
    # (0.85-1)^2 + 0.15^2 = 0.045 ; 0.65^2 + (0.35-1)^2 = 0.845 ; 0.25^2 + (0.75-1)^2 = 0.125
    torch.testing.assert_close(brier_score(PROBS, TARGETS), torch.tensor([0.045, 0.845, 0.125]))
    # Brier is 0 for a one-hot on the target and 2 for a one-hot elsewhere
    torch.testing.assert_close(
        brier_score(torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([0, 1])), torch.tensor([0.0, 2.0])
    )


def test_ece_by_hand():
    conf, correct = top1_confidence(PROBS, TARGETS)
    # 10 bins: each prediction alone in its bin -> (|1-0.85| + |0-0.65| + |1-0.75|) / 3 = 0.35
    assert expected_calibration_error(conf, correct, num_bins=10) == pytest.approx(0.35)
    # 1 bin: |accuracy - mean confidence| = |2/3 - 0.75|
    assert expected_calibration_error(conf, correct, num_bins=1) == pytest.approx(0.75 - 2 / 3)
    # 2 bins: all confidences are in (0.5, 1], same as 1 bin
    assert expected_calibration_error(conf, correct, num_bins=2) == pytest.approx(0.75 - 2 / 3)
    curve = CalibrationBins.from_predictions(conf, correct, 10).curve()
    assert curve["bin_low"] == pytest.approx([0.6, 0.7, 0.8])
    assert curve["confidence"] == pytest.approx([0.65, 0.75, 0.85])
    assert curve["accuracy"] == [0.0, 1.0, 1.0]
    assert curve["count"] == [1, 1, 1]


def test_calibration_accumulator_from_logits_and_in_pieces():
    logits = PROBS.log()
    whole = CalibrationAccumulator(10)
    whole.update(logits, TARGETS)
    pieces = CalibrationAccumulator(10)
    pieces.update(logits[:1], TARGETS[:1])
    pieces.update(logits[1:], TARGETS[1:])
    for acc in (whole, pieces):
        out = acc.compute()
        assert out["ece"] == pytest.approx(0.35)
        assert out["brier"] == pytest.approx((0.045 + 0.845 + 0.125) / 3)
        assert out["accuracy"] == pytest.approx(2 / 3)
        assert out["mean_confidence"] == pytest.approx(0.75)
        assert out["mean_target_prob"] == pytest.approx((0.85 + 0.35 + 0.75) / 3)
        assert out["num_tokens"] == 3


def test_repetition_and_diversity_by_hand():
    seq = [1, 2, 1, 2, 1]
    assert rep_n(seq, 1) == pytest.approx(1 - 2 / 5)  # 5 unigrams, 2 distinct
    assert rep_n(seq, 2) == pytest.approx(1 - 2 / 4)  # (1,2) (2,1) (1,2) (2,1)
    assert rep_n(seq, 3) == pytest.approx(1 - 2 / 3)  # (1,2,1) (2,1,2) (1,2,1)
    assert rep_n([1, 2, 3], 2) == 0.0
    assert rep_n([1], 2) == 0.0  # too short to have an n-gram
    seqs = [seq, [3, 4]]
    assert mean_rep_n(seqs, 2) == pytest.approx((0.5 + 0.0) / 2)
    assert distinct_n(seqs, 2) == pytest.approx(3 / 5)  # (1,2) (2,1) (3,4) unique among 4 + 1 bigrams
    assert distinct_n(seqs, 1) == pytest.approx(4 / 7)
    assert sequence_repetition_rate(seqs, 2) == pytest.approx(0.5)
    assert sequence_repetition_rate(seqs, 4) == pytest.approx(0.0)  # (1,2,1,2) (2,1,2,1): no repeat
    summary = repetition_summary(seqs, ns=(2,))
    assert summary == {"rep-2": 0.25, "distinct-2": 0.6, "seq-rep-2": 0.5}
    # works on words as well as token ids
    assert rep_n("the cat the cat".split(), 2) == pytest.approx(1 - 2 / 3)


def test_bootstrap_perplexity():
    one = bootstrap_perplexity([2 * math.log(5)], [2])
    assert one["std"] == 0.0 and one["low"] == pytest.approx(5) and one["high"] == pytest.approx(5)
    same = bootstrap_perplexity([math.log(4)] * 3, [1] * 3)
    assert same["std"] == pytest.approx(0.0, abs=1e-9)
    spread = bootstrap_perplexity([math.log(2), math.log(50)], [1, 1], num_samples=500)
    assert 2 <= spread["low"] < spread["high"] <= 50 and spread["std"] > 0


def test_nll_accumulator_per_document():
    acc = NLLAccumulator(2, words_per_document=[1, 2])
    acc.update(torch.zeros(3, 4), torch.tensor([0, 1, 2]), torch.tensor([0, 1, 1]))
    out = acc.compute()
    assert out["num_tokens"] == 3 and out["num_words"] == 3
    assert out["token"] == pytest.approx(4.0) and out["word"] == pytest.approx(4.0)
    torch.testing.assert_close(acc.nll, torch.tensor([1.0, 2.0], dtype=torch.float64) * math.log(4))
    assert out["per_document"] == {"nll": acc.nll.tolist(), "tokens": [1, 2], "words": [1, 2]}


# ---------------------------------------------------------------------------------------------------------------
# Sliding windows
# ---------------------------------------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(n=st.integers(0, 60), window=st.integers(2, 20), data=st.data())
def test_window_spans_score_each_token_at_most_once(n, window, data):
    stride = data.draw(st.integers(1, window))
    spans = window_spans(n, window, stride)
    targets = [t for _, end, first in spans for t in range(first, end)]
    assert len(targets) == len(set(targets))  # never a target twice
    for begin, end, first in spans:
        assert 0 <= begin < first < end <= n and end - begin <= window
    if stride < window:
        assert sorted(targets) == list(range(1, n))  # every token but the first
    else:  # blocks: the first token of each block has no context
        assert sorted(targets) == [t for t in range(1, n) if t % window != 0]


def test_window_spans_rejects_bad_settings():
    with pytest.raises(ValueError, match="stride"):
        window_spans(10, 4, 5)
    with pytest.raises(ValueError, match="window"):
        window_spans(10, 1, 1)


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_llama_dir)


DOCS = [
    "the king of the city was a new king and the river is in the state and the city is on the river " * 2,
    "she had a song on the album",
    "he was the first king of the state after the war and the church in the city has a book of music " * 3,
]


def _reference_block_nll(model, ids, window):
    """Plain blocks: the model's own mean loss on each `window`-token chunk, times its number of targets."""
    total, count = 0.0, 0
    for start in range(0, len(ids), window):
        block = torch.tensor([ids[start : start + window]])
        if block.shape[1] < 2:
            continue
        with torch.no_grad():
            loss = model(input_ids=block, labels=block).loss
        total += loss.item() * (block.shape[1] - 1)
        count += block.shape[1] - 1
    return total, count


def test_stride_equal_window_matches_plain_block_perplexity(tiny):
    model, tok = tiny
    ids = [tok(d)["input_ids"] for d in DOCS]
    ref = [_reference_block_nll(model, x, 8) for x in ids]
    out = evaluate_perplexity(model, tok, DOCS, window=8, stride=8, batch_size=3, show_progress=False)
    assert out["num_tokens"] == sum(c for _, c in ref)
    assert out["nll_sum"] == pytest.approx(sum(t for t, _ in ref), rel=1e-5)
    assert out["token"] == pytest.approx(math.exp(sum(t for t, _ in ref) / sum(c for _, c in ref)), rel=1e-5)
    assert out["num_words"] == sum(len(d.split()) for d in DOCS)
    assert out["word"] == pytest.approx(math.exp(out["nll_sum"] / out["num_words"]), rel=1e-9)


def test_smaller_stride_scores_every_token_once_and_window_covering_all_is_full_context(tiny):
    model, tok = tiny
    ids = [tok(d)["input_ids"] for d in DOCS]
    out = evaluate_perplexity(model, tok, DOCS, window=8, stride=3, batch_size=2, show_progress=False)
    assert out["num_tokens"] == sum(len(x) - 1 for x in ids)
    # a window longer than every document: one window per document = the model's loss on the full document
    full = [_reference_block_nll(model, x, 10_000) for x in ids]
    out = evaluate_perplexity(model, tok, DOCS, window=200, stride=50, batch_size=3, show_progress=False)
    assert out["nll_sum"] == pytest.approx(sum(t for t, _ in full), rel=1e-5)


def test_batching_and_padding_do_not_change_scores(tiny):
    model, tok = tiny
    one = evaluate_perplexity(model, tok, DOCS, window=16, stride=5, batch_size=1, show_progress=False)
    many = evaluate_perplexity(model, tok, DOCS, window=16, stride=5, batch_size=7, show_progress=False)
    assert many["nll_sum"] == pytest.approx(one["nll_sum"], rel=1e-5)


def test_uniform_tiny_model_has_perplexity_vocab_size(tiny_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    torch.nn.init.zeros_(model.lm_head.weight)  # every logit 0: the uniform distribution over the vocabulary
    out = evaluate_perplexity(
        model, AutoTokenizer.from_pretrained(tiny_llama_dir), DOCS, window=8, stride=4, show_progress=False
    )
    assert out["token"] == pytest.approx(model.config.vocab_size, rel=1e-5)


def test_calibration_on_model_matches_slow_reference(tiny):
    from emo_calibrate.evaluation.calibration import evaluate_calibration

    model, tok = tiny
    out = evaluate_calibration(model, tok, DOCS, num_bins=10, window=1000, stride=1000, show_progress=False)
    # reference: full-document forward, then a Python loop over tokens and bins
    bins = [[0, 0.0, 0.0] for _ in range(10)]
    counts_per_document = [[0] * 10 for _ in DOCS]
    brier, n = 0.0, 0
    for d, doc in enumerate(DOCS):
        ids = tok(doc)["input_ids"]
        with torch.no_grad():
            probs = torch.softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
        for t in range(1, len(ids)):
            p = probs[t - 1]
            conf = p.max().item()
            b = min(max(math.ceil(conf * 10) - 1, 0), 9)
            bins[b][0] += 1
            counts_per_document[d][b] += 1
            bins[b][1] += conf
            bins[b][2] += float(p.argmax().item() == ids[t])
            brier += sum((p[v].item() - (v == ids[t])) ** 2 for v in range(p.numel()))
            n += 1
    ece = sum(abs(c - a) for _, c, a in bins) / n
    assert out["num_tokens"] == n
    assert out["ece"] == pytest.approx(ece, abs=1e-5)
    assert out["brier"] == pytest.approx(brier / n, abs=1e-5)
    assert out["per_document"]["count"] == counts_per_document


def test_score_documents_feeds_every_accumulator(tiny):
    model, tok = tiny
    seen = []

    class Recorder:
        def update(self, logits, targets, doc_index):
            seen.append((logits.shape, targets.shape, doc_index.tolist()))

    n = score_documents(
        model, [tok(d)["input_ids"] for d in DOCS], [Recorder()], window=8, stride=8, show_progress=False
    )
    assert sum(t[0] for _, t, _ in seen) == n
    assert all(lg[0] == tg[0] and lg[1] == model.config.vocab_size for lg, tg, _ in seen)
    assert sorted({d for _, _, docs in seen for d in docs}) == [0, 1, 2]


# ---------------------------------------------------------------------------------------------------------------
# Held-out text loading
# ---------------------------------------------------------------------------------------------------------------


def test_load_eval_documents_sources_and_errors(tmp_path):
    from datasets import Dataset, DatasetDict

    (tmp_path / "a.txt").write_text("first doc\nsecond line\n", encoding="utf-8")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "jsonl doc"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    assert load_eval_documents(str(tmp_path / "a.txt")) == ["first doc\nsecond line\n"]
    assert load_eval_documents(str(tmp_path / "b.jsonl")) == ["jsonl doc", "two"]
    assert load_eval_documents(str(tmp_path)) == ["first doc\nsecond line\n", "jsonl doc", "two"]  # sorted files

    (tmp_path / "rows.csv").write_text("text,other\ncsv one,1\ncsv two,2\n")
    assert load_eval_documents(str(tmp_path / "rows.csv")) == ["csv one", "csv two"]
    with pytest.raises(ValueError, match="no column 'body'"):
        load_eval_documents(str(tmp_path / "rows.csv"), text_field="body")

    saved = tmp_path / "calib"
    DatasetDict(
        {"train": Dataset.from_dict({"text": ["t"]}), "test": Dataset.from_dict({"text": ["held", " "]})}
    ).save_to_disk(saved)
    assert load_eval_documents(str(saved)) == ["held"]
    with pytest.raises(ValueError, match="no split 'valid'"):
        load_eval_documents(str(saved), split="valid")
    with pytest.raises(ValueError, match="no column 'body'"):
        load_eval_documents(str(saved), text_field="body")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_eval_documents(str(tmp_path / "missing.txt"))
    (tmp_path / "bad.txt").write_bytes(b"ok\nok\n\xff\xfe bad")
    with pytest.raises(ValueError, match="UTF-8 \\(line 3\\)"):
        load_eval_documents(str(tmp_path / "bad.txt"))
    (tmp_path / "c.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(ValueError, match="line 1: no string field 'text'"):
        load_eval_documents(str(tmp_path / "c.jsonl"))


def test_pack_and_truncate():
    assert pack_short_documents(["a b", "c", "d e f", "g"], 3) == ["a b c", "d e f g"]
    assert pack_short_documents(["a", "b"], 5) == ["a b"]
    assert pack_short_documents(["a", "b"], 0) == ["a", "b"]
    assert truncate_words(["a b\nc", "d e", "f"], 4) == ["a b\nc", "d"]
    assert truncate_words(["a b", "c d"], 2) == ["a b"]
    assert truncate_words(["a b"], 0) == ["a b"]


# ---------------------------------------------------------------------------------------------------------------
# Generation, MAUVE
# ---------------------------------------------------------------------------------------------------------------


def test_cut_prompts_follows_the_paper_filters_and_spreads_over_documents():
    from emo_calibrate.evaluation.generation import cut_prompts

    long_a = " ".join(f"a{i}" for i in range(40))
    long_b = " ".join(f"b{i}" for i in range(40))
    docs = [
        f"short line\n== Heading == {long_a}\n{long_a}\n{long_a.upper()}",  # heading line skipped
        f"{long_b}",
    ]
    prompts = cut_prompts(docs, prefix_words=5, continuation_words=10)
    assert [p.document for p in prompts] == [0, 1, 0]  # round robin over documents
    assert prompts[0].prefix == "a0 a1 a2 a3 a4"
    assert prompts[0].continuation == " ".join(f"a{i}" for i in range(5, 15))
    assert prompts[0].reference == prompts[0].prefix + " " + prompts[0].continuation
    assert len(cut_prompts(docs, prefix_words=5, continuation_words=10, num_prompts=2)) == 2
    assert cut_prompts(docs, prefix_words=20, continuation_words=80) == []  # 40 words < 20 + 80 + 10


def test_sampling_is_unbiased_ancestral_and_greedy_is_argmax(tiny):
    from emo_calibrate.evaluation.generation import generate_continuations

    model, tok = tiny
    prefix = "the king of the city"
    steps = 6
    out = generate_continuations(model, tok, [prefix], max_new_tokens=steps, seed=3, show_progress=False)
    # reference: plain softmax sampling, no top-k/top-p/temperature, EOS suppressed (min_new_tokens)
    torch.manual_seed(3)
    ids = tok(prefix, return_tensors="pt")["input_ids"]
    ref = []
    for _ in range(steps):
        with torch.no_grad():
            logits = model(input_ids=ids).logits[:, -1].float()
        logits[:, tok.eos_token_id] = -float("inf")
        nxt = torch.multinomial(torch.softmax(logits, -1), 1)
        ref.append(nxt.item())
        ids = torch.cat([ids, nxt], 1)
    assert out == [ref]
    greedy = generate_continuations(
        model, tok, [prefix, "a"], max_new_tokens=steps, do_sample=False, show_progress=False
    )
    ids = tok(prefix, return_tensors="pt")["input_ids"]
    for _ in range(steps):
        with torch.no_grad():
            logits = model(input_ids=ids).logits[:, -1]
        logits[:, tok.eos_token_id] = -float("inf")
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], 1)
    assert greedy[0] == ids[0, -steps:].tolist()
    assert all(len(g) == steps for g in greedy)
    assert tok.padding_side == "right"  # restored


def test_featurizer_is_last_hidden_state_at_last_token_under_padding(tiny_llama_dir):
    from transformers import AutoModel, AutoTokenizer

    from emo_calibrate.evaluation.generation import Featurizer

    feat = Featurizer(tiny_llama_dir, max_length=6, batch_size=2)
    texts = ["the king of the city was a new king", "a river", "the team"]
    got = feat(texts, show_progress=False)
    backbone = AutoModel.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    for row, text in zip(got, texts):
        ids = tok(text)["input_ids"][:6]
        with torch.no_grad():
            h = backbone(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]
        torch.testing.assert_close(torch.from_numpy(row), h, atol=1e-5, rtol=1e-5)


def test_mauve_score_identical_vs_disjoint_features():
    import numpy as np

    from emo_calibrate.evaluation.generation import mauve_score

    rng = np.random.default_rng(0)
    p = rng.normal(size=(40, 8)).astype(np.float32)
    assert mauve_score(p, p.copy(), num_buckets=4, kmeans_num_redo=1) == pytest.approx(1.0, abs=1e-6)
    q = rng.normal(size=(40, 8)).astype(np.float32) + 8.0
    assert mauve_score(p, q, num_buckets=4, kmeans_num_redo=1) < 0.1


def test_evaluate_generation_with_tiny_featurizer(tiny, tiny_llama_dir):
    from emo_calibrate.evaluation.generation import Featurizer, Prompt, evaluate_generation

    model, tok = tiny
    prompts = [
        Prompt(f"the king of the city {w}", "was a new king of the state", i)
        for i, w in enumerate(["a", "the", "and", "in", "on", "war"])
    ]
    feat = Featurizer(tiny_llama_dir, model=model.model, tokenizer=tok)
    out = evaluate_generation(
        model,
        tok,
        prompts,
        seeds=[0, 1],
        max_new_tokens=5,
        batch_size=4,
        featurizer=feat,
        show_progress=False,
        mauve_kwargs={"num_buckets": 2, "kmeans_num_redo": 1},
    )
    assert [r["seed"] for r in out["sample"]["runs"]] == [0, 1] and len(out["greedy"]["runs"]) == 1
    for mode in ("sample", "greedy"):
        assert 0.0 <= out[mode]["mean"]["mauve"] <= 1.0
        assert set(out[mode]["mean"]) >= {"rep-4", "distinct-2", "seq-rep-4", "mauve"}
    runs = out["sample"]["runs"]
    assert out["sample"]["std"]["rep-1"] == pytest.approx(abs(runs[0]["rep-1"] - runs[1]["rep-1"]) / 2)
    assert len(out["samples"]["sample"][0]) == len(prompts)
    assert all(s.startswith(p.prefix) for s, p in zip(out["samples"]["greedy"][0], prompts))


# ---------------------------------------------------------------------------------------------------------------
# lm-evaluation-harness on a local task
# ---------------------------------------------------------------------------------------------------------------


def test_lm_eval_adapter_runs_a_local_task_on_an_adapter(tmp_path, tiny):
    from peft import LoraConfig, get_peft_model
    from tiny_models import build_tiny_model

    from emo_calibrate.evaluation.lm_eval_adapter import run_lm_eval

    rows = [
        {"question": "the king of the", "choices": ["city", "river", "song"], "label": 0},
        {"question": "the river is in the", "choices": ["state", "war"], "label": 1},
        {"question": "she had a song on the", "choices": ["album", "film"], "label": 0},
        {"question": "the team was first in the", "choices": ["world", "church"], "label": 1},
    ]
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "tiny_choice.yaml").write_text(
        f"task: tiny_choice\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{label}}'\nmetric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    _, tok = tiny
    model = get_peft_model(
        build_tiny_model(), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)
    ).eval()
    scores = run_lm_eval(
        model,
        tok,
        ["tiny_choice"],
        include_path=str(tmp_path),
        include_defaults=False,
        bootstrap_iters=0,
        batch_size=2,
    )
    # reference: the choice with the highest log-likelihood after the question (lm-eval joins them with a space)
    correct = 0
    for r in rows:
        ctx = tok(r["question"])["input_ids"]
        lls = []
        for c in r["choices"]:
            ids = tok(r["question"] + " " + c)["input_ids"]
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
            lls.append(sum(logp[t - 1, ids[t]].item() for t in range(len(ctx), len(ids))))
        correct += int(max(range(len(lls)), key=lls.__getitem__) == r["label"])
    assert scores["tiny_choice"]["acc,none"] == pytest.approx(correct / len(rows))
    with pytest.raises(ValueError, match="Unknown lm-eval task"):
        run_lm_eval(model, tok, ["no_such_task"], include_path=str(tmp_path), include_defaults=False)


# ---------------------------------------------------------------------------------------------------------------
# Runner, report, CLI
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def eval_assets(tiny_llama_dir, tmp_path_factory):
    """A held-out jsonl and a LoRA adapter (non-identity) on the tiny model, with a trainer_state.json beside it."""
    import random

    from peft import LoraConfig, get_peft_model
    from tiny_models import SENTENCES
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("eval-assets")
    rng = random.Random(0)
    with open(root / "held.jsonl", "w") as f:
        for _ in range(3):
            paragraphs = [" ".join(rng.choice(SENTENCES) for _ in range(8)) for _ in range(2)]
            f.write(json.dumps({"text": "\n".join(paragraphs)}) + "\n")
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    adapter = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    adapter.save_pretrained(root / "emo-adapter")
    history = [{"step": s, "loss": 3.0 / s, "mle": 2.0 / s, "emo": 0.5 / s} for s in (1, 2, 3)]
    (root / "emo-adapter" / "trainer_state.json").write_text(
        json.dumps({"log_history": history + [{"step": 3, "train_runtime": 1.0}]})
    )
    return root


def _tiny_eval_settings(tiny_llama_dir, eval_assets) -> dict:
    """EvalArguments for base vs adapter on the tiny model, sized to take seconds."""
    return dict(
        models=[f"base={tiny_llama_dir}", f"emo={eval_assets / 'emo-adapter'}"],
        eval_data=str(eval_assets / "held.jsonl"),
        window=16,
        stride=8,
        num_prompts=4,
        prefix_words=5,
        continuation_words=10,
        max_new_tokens=6,
        featurizer=tiny_llama_dir,
    )


def test_parse_model_spec(tiny_llama_dir, eval_assets, tmp_path):
    from emo_calibrate.evaluation.runner import find_trainer_state, parse_model_spec

    spec = parse_model_spec(f"base={tiny_llama_dir}")
    assert (spec.label, spec.kind) == ("base", "model")
    spec = parse_model_spec(str(eval_assets / "emo-adapter"))
    assert (spec.label, spec.kind, spec.base) == ("emo-adapter", "adapter", tiny_llama_dir)
    assert parse_model_spec("org/some-model").kind == "model"  # a hub id, resolved later
    with pytest.raises(FileNotFoundError, match="not an existing file"):
        parse_model_spec("./no/such/dir/x")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither a model folder"):
        parse_model_spec(str(tmp_path / "empty"))
    (tmp_path / "orphan").mkdir()
    (tmp_path / "orphan" / "adapter_config.json").write_text("{}")
    with pytest.raises(ValueError, match="--base_model"):
        parse_model_spec(str(tmp_path / "orphan"))
    assert find_trainer_state(str(eval_assets / "emo-adapter")).endswith("trainer_state.json")
    assert find_trainer_state(tiny_llama_dir) is None


def test_run_evaluation_base_vs_adapter_writes_report(tiny_llama_dir, eval_assets, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from emo_calibrate.evaluation.arguments import EvalArguments
    from emo_calibrate.evaluation.runner import load_model, parse_model_spec, run_evaluation

    out = tmp_path / "report"
    args = EvalArguments(**_tiny_eval_settings(tiny_llama_dir, eval_assets), seeds=[0, 1], output_dir=str(out))
    results = run_evaluation(args)
    base, emo = results["models"]
    assert emo["kind"] == "adapter" and emo["trainer_state"].endswith("trainer_state.json")
    assert base["perplexity"]["token"] != pytest.approx(emo["perplexity"]["token"])  # the adapter changes the model
    # the runner's adapter path is the exact base + adapter function
    model, tok = load_model(parse_model_spec(f"emo={eval_assets / 'emo-adapter'}"))
    ref = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_llama_dir), eval_assets / "emo-adapter"
    ).eval()
    ids = torch.tensor([tok("the king of the city")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits)
    for entry in results["models"]:
        assert 0 <= entry["calibration"]["ece"] <= 1 and 0 <= entry["calibration"]["brier"] <= 2
        assert len(entry["generation"]["sample"]["runs"]) == 2
        assert "rep-4" in entry["generation"]["human"]
        # per-unit data for paired comparisons: per document (perplexity, calibration bins), per prompt (rep-n)
        ppl, calib = entry["perplexity"], entry["calibration"]
        assert len(ppl["per_document"]["nll"]) == results["num_documents"] == len(calib["per_document"]["count"])
        assert sum(ppl["per_document"]["nll"]) == pytest.approx(ppl["nll_sum"])
        assert sum(ppl["per_document"]["tokens"]) == ppl["num_tokens"] == calib["num_tokens"]
        assert sum(ppl["per_document"]["words"]) == ppl["num_words"] == results["num_words"]
        assert sum(map(sum, calib["per_document"]["count"])) == calib["num_tokens"]
        for mode in ("sample", "greedy"):
            for run in entry["generation"][mode]["runs"]:
                assert set(run["per_prompt"]) == {"rep-1", "rep-2", "rep-3", "rep-4"}
                assert sum(run["per_prompt"]["rep-4"]) / 4 == pytest.approx(run["rep-4"])
    paired = results["paired"]["models"]["emo"]
    assert results["paired"]["reference"] == "base" and list(results["paired"]["models"]) == ["emo"]
    token = paired["perplexity"]["token"]
    assert token["estimate"] == pytest.approx(emo["perplexity"]["token"] / base["perplexity"]["token"])
    assert token["ci95"][0] <= token["estimate"] <= token["ci95"][1] and token["n"] == results["num_documents"]
    ece = paired["calibration"]["ece"]["estimate"]
    assert ece == pytest.approx(emo["calibration"]["ece"] - base["calibration"]["ece"], abs=1e-9)
    assert paired["generation"]["greedy"]["rep-4"]["estimate"] == pytest.approx(
        emo["generation"]["greedy"]["mean"]["rep-4"] - base["generation"]["greedy"]["mean"]["rep-4"]
    )
    mauve = paired["generation"]["sample"]["mauve"]
    assert mauve["n"] == 2 and mauve["estimate"] == pytest.approx(
        emo["generation"]["sample"]["mean"]["mauve"] - base["generation"]["sample"]["mean"]["mauve"]
    )
    assert results["featurizer"] == tiny_llama_dir and results["num_prompts"] == 4
    for name in (
        "results.json",
        "report.md",
        "reliability.png",
        "perplexity.png",
        "mauve.png",
        "degeneration.png",
        "training_curves.png",
    ):
        assert (out / name).stat().st_size > 0, name
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))
    samples = [json.loads(line) for line in (out / "samples" / "emo.jsonl").read_text().splitlines()]
    assert len(samples) == 4 * 3 and {s["mode"] for s in samples} == {"sample", "greedy"}
    report = (out / "report.md").read_text()
    assert "| base | model |" in report and "| emo | adapter |" in report and "human text" in report
    assert f"MAUVE featurizer: **{tiny_llama_dir}**" in report
    assert "## Paired differences against base" in report and "| emo | ppl/token |" in report
    assert "| emo | rep-4 (sample) |" in report and "| emo | MAUVE (sample) |" in report
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]  # no temporary folder left behind
    with pytest.raises(FileExistsError, match="--overwrite"):
        run_evaluation(args)


def test_cli_help_and_tiny_run(tiny_llama_dir, eval_assets, tmp_path, capsys):
    from emo_calibrate.cli.main import main

    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for option in ("--models", "--eval_data", "--stride", "--featurizer", "--lm_eval_tasks", "--overwrite"):
        assert option in help_text

    out = tmp_path / "cli-report"
    argv = [
        "eval",
        "--models",
        tiny_llama_dir,
        "--eval_data",
        str(eval_assets / "held.jsonl"),
        "--metrics",
        "perplexity",
    ]
    argv += ["--window", "16", "--output_dir", str(out)]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["models"][0]) >= {"perplexity", "seconds"} and "generation" not in results["models"][0]
    (out / "marker").write_text("old")
    assert main([*argv, "--overwrite"]) == 0 and not (out / "marker").exists()
    assert main(argv) == 2 and "--overwrite" in capsys.readouterr().err
    assert main(["eval", "--models", tiny_llama_dir, "--eval_data", str(tmp_path / "none.jsonl")]) == 2
    assert main(["eval", "--models", tiny_llama_dir, "--metrics", "bogus"]) == 2


def test_public_names_resolve_and_cli_import_is_light():
    import subprocess
    import sys

    import emo_calibrate

    for name in ("EvalArguments", "run_evaluation", "evaluate_perplexity", "evaluate_calibration", "run_lm_eval"):
        assert callable(getattr(emo_calibrate, name))
    code = "import sys, emo_calibrate.cli.eval, emo_calibrate.evaluation.arguments; print('torch' in sys.modules)"
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
        == "False"
    )


@pytest.mark.gpu
def test_run_evaluation_on_cuda(tiny_llama_dir, eval_assets, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from emo_calibrate.evaluation.arguments import EvalArguments
    from emo_calibrate.evaluation.runner import run_evaluation

    # No MAUVE: mauve-text and faiss are not on the GPU image (benchmarks/gpu/device_image.py), and this test compares
    # perplexity and calibration only. tests/gpu/test_device_image.py runs these settings with the image's packages.
    common = {
        **_tiny_eval_settings(tiny_llama_dir, eval_assets),
        "featurizer": "none",
        "seeds": [0],
        "decoding": ["greedy"],
    }
    on_gpu = run_evaluation(EvalArguments(**common, device="cuda", output_dir=str(tmp_path / "gpu")))
    on_cpu = run_evaluation(EvalArguments(**common, device="cpu", output_dir=str(tmp_path / "cpu")))
    assert on_gpu["device"] == "cuda"
    for g, c in zip(on_gpu["models"], on_cpu["models"]):
        assert g["perplexity"]["token"] == pytest.approx(c["perplexity"]["token"], rel=1e-3)
        assert g["calibration"]["ece"] == pytest.approx(c["calibration"]["ece"], abs=1e-3)


@pytest.mark.slow
def test_real_demo_model_on_held_out_wikipedia(tmp_path):
    """SmolLM2-135M on three Wikipedia articles, CPU-sized: the numbers must look like a real LM's."""
    from emo_calibrate.demo.assets import smollm2_path, wikipedia_articles
    from emo_calibrate.evaluation.arguments import EvalArguments
    from emo_calibrate.evaluation.runner import run_evaluation

    with open(tmp_path / "held.jsonl", "w") as f:
        for article in wikipedia_articles()[-3:]:
            f.write(json.dumps({"text": article["text"]}) + "\n")
    args = EvalArguments(
        models=[f"smollm2={smollm2_path()}"],
        eval_data=str(tmp_path / "held.jsonl"),
        max_eval_words=1500,
        num_prompts=8,
        max_new_tokens=40,
        seeds=[0],
        featurizer="base",
        output_dir=str(tmp_path / "report"),
    )
    (entry,) = run_evaluation(args)["models"]
    ppl, calib = entry["perplexity"], entry["calibration"]
    assert 5 < ppl["token"] < 60  # ~19 on Wikipedia prose (docs/offline-assets)
    assert ppl["word"] > ppl["token"]  # more than one token per word
    assert calib["ece"] < 0.1 and 0 < calib["brier"] < 1.2
    assert 0 <= entry["generation"]["sample"]["mean"]["mauve"] <= 1
    assert (tmp_path / "report" / "report.md").exists()
