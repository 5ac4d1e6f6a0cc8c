"""In-context learning: retrieval, prompt tokenisation, scoring against a naive reference, and the whole eval path."""

import json

import pytest
import torch

from emo_calibrate.evaluation.icl import PreparedTask, evaluate_icl, prepare_icl_tasks, task_prompts
from emo_calibrate.evaluation.icl_retrieval import retrieve_demonstrations, split_test_and_pool
from emo_calibrate.evaluation.icl_scoring import EncodedItem, encode_item, score_items
from emo_calibrate.evaluation.icl_tasks import (
    ICLExample,
    ICLTask,
    check_template,
    fill_template,
    load_local_task,
    split_template,
)


# ---------------------------------------------------------------------------------------------------------------
# Test items and demonstrations
# ---------------------------------------------------------------------------------------------------------------


def test_split_is_disjoint_seeded_and_leaves_a_pool():
    test, pool = split_test_and_pool(11, max_test=100, seed=0)
    assert len(test) == 5 and len(pool) == 6  # never more than half the items are test items
    assert not set(test) & set(pool) and sorted(test + pool) == list(range(11))
    assert split_test_and_pool(11, 100, seed=0) == (test, pool)
    assert split_test_and_pool(11, 100, seed=1) != (test, pool)
    assert len(split_test_and_pool(1000, 40, seed=0)[0]) == 40


POOL = ["the cat sat on the mat", "dogs bark loudly at night", "the cat ate the fish", "stock markets fell today"]


def test_topk_returns_the_most_similar_first_and_never_the_item_itself():
    assert retrieve_demonstrations(["a cat sat on a mat"], POOL, k=2) == [[0, 2]]
    # the exact text is in the pool: the most similar item, and still never a demonstration of itself
    (row,) = retrieve_demonstrations(["dogs bark loudly at night"], POOL, k=3)
    assert 1 not in row and len(row) == 3
    (row,) = retrieve_demonstrations(["dogs bark loudly at night"], POOL + POOL[1:2], k=10)
    assert sorted(row) == [0, 2, 3]  # both copies excluded, fewer than k left
    assert retrieve_demonstrations(["anything"], POOL, k=0) == [[]]


def test_retrievers_are_deterministic_with_the_seed():
    pool = [f"item number {i} about topic {i % 7}" for i in range(60)]
    queries = ["unrelated words entirely", "item number 5 about topic 5", "zebra"]
    for method in ("topk", "random"):
        first = retrieve_demonstrations(queries, pool, k=8, method=method, seed=3)
        assert first == retrieve_demonstrations(queries, pool, k=8, method=method, seed=3)
        assert all(len(set(row)) == 8 for row in first)
    # queries with no word in common with the pool are all ties: the seed decides, as for the random draw
    tied = [retrieve_demonstrations(["zebra"], pool, k=8, seed=s) for s in range(3)]
    assert tied[0] != tied[1] or tied[1] != tied[2]
    randoms = [retrieve_demonstrations(queries, pool, k=8, method="random", seed=s) for s in range(2)]
    assert randoms[0] != randoms[1]
    (row,) = retrieve_demonstrations([pool[4]], pool, k=59, method="random")
    assert 4 not in row and len(row) == 59
    with pytest.raises(ValueError, match="Unknown retriever"):
        retrieve_demonstrations(queries, pool, k=1, method="bm25")


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


WORDS = ["king", "city", "river"]


def _tiny_rows(n=24):
    """`n` distinct rows (the pattern repeats after 24) whose text contains its label word."""
    from tiny_models import SENTENCES

    return [
        {
            "text": f"{' '.join(SENTENCES[i % 8].split()[: 3 + i % 6])} {WORDS[i % 3]} {WORDS[i % 3]}",
            "label": WORDS[i % 3],
        }
        for i in range(n)
    ]


def test_prepared_demonstrations_come_from_the_pool_only(tmp_path):
    path = _write_jsonl(tmp_path / "t.jsonl", _tiny_rows())
    (prepared,) = prepare_icl_tasks([f"tiny={path}"], shots=4, max_examples=10, seed=1)
    assert len(prepared.test) == 10 and len(prepared.pool) == 14
    for item, demos in zip(prepared.test, prepared.demonstrations):
        assert len(demos) == 4 and item not in demos and set(demos) <= set(prepared.pool)
    again = prepare_icl_tasks([f"tiny={path}"], shots=4, max_examples=10, seed=1)[0]
    assert (again.test, again.demonstrations) == (prepared.test, prepared.demonstrations)
    row = task_prompts(prepared)[0]
    assert row["candidates"] == WORDS and row["continuations"] == WORDS
    assert row["head"].endswith("\nAnswer: ") and row["demonstrations"][0].count("\nAnswer: ") == 1


# ---------------------------------------------------------------------------------------------------------------
# Templates and local task files
# ---------------------------------------------------------------------------------------------------------------


def test_templates():
    t = "Review: {text} It is {label}."
    assert fill_template(t, "a {weird} text", "good") == "Review: a {weird} text It is good."
    assert split_template(t, "x") == ("Review: x It is ", ".")
    for bad in ("{text} only", "{label} {text}", "{text} {label} {label}"):
        with pytest.raises(ValueError, match="--icl_template"):
            check_template(bad)


def test_local_task_files(tmp_path):
    rows = [
        {"text": "good film", "label": "positive"},
        {"text": "bad film", "label": "negative"},
        {"text": "good film", "label": "positive"},  # duplicate: kept once
        {"text": "odd film", "label": "positive"},
        {"text": "odd film", "label": "negative"},  # conflicting: dropped
        {"text": "fine film", "label": "positive"},
        {"text": "dull film", "label": "negative"},
    ]
    task = load_local_task("s", _write_jsonl(tmp_path / "s.jsonl", rows))
    assert [e.text for e in task.examples] == ["good film", "bad film", "fine film", "dull film"]
    assert task.labels == ("positive", "negative") and task.info["conflicting_texts"] == 1
    (tmp_path / "mc.csv").write_text(
        'text,label,options\nq1,b,"[""a"", ""b""]"\nq2,c,a|b|c\nq3,a,a|b\nq4,b,a|b\n', encoding="utf-8"
    )
    task = load_local_task("mc", str(tmp_path / "mc.csv"), template="Q: {text} A: {label}")
    assert task.labels is None and task.candidates(task.examples[1]) == ("a", "b", "c")
    bad = {
        "label.jsonl": ([{"text": "x"}], "no non-empty 'label'"),
        "ids.jsonl": ([{"text": f"t{i}", "label": i % 2} for i in range(6)], "class ids"),
        "opt.jsonl": ([{"text": "x", "label": "z", "options": ["a", "b"]}], "not one of its options"),
        "few.jsonl": ([{"text": "x", "label": "a"}, {"text": "y", "label": "b"}], "usable rows"),
    }
    for name, (content, message) in bad.items():
        with pytest.raises(ValueError, match=message):
            load_local_task(name, _write_jsonl(tmp_path / name, content))
    (tmp_path / "t.parquet").write_text("")
    with pytest.raises(ValueError, match=".jsonl or .csv"):
        load_local_task("p", str(tmp_path / "t.parquet"))


# ---------------------------------------------------------------------------------------------------------------
# Tokenisation at the prompt / label boundary
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bpe_tokenizer():
    """A byte-level BPE tokenizer (GPT-2 / Llama-3 / SmolLM2 style: a leading space belongs to the next word)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<pad>", "<s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(
        ["Review: a good film. It is positive", "Review: a bad film. It is negative"] * 50, trainer
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>")


def test_label_keeps_its_leading_space_token(bpe_tokenizer):
    tok = bpe_tokenizer
    head, tail = split_template("Review: {text} It is {label}", "a bad film.")
    item = encode_item(tok, ["Review: a good film. It is positive"], head, ["positive" + tail, "negative" + tail])
    positive, negative = tok.convert_tokens_to_ids(["Ġpositive", "Ġnegative"])
    assert item.candidates == [[positive], [negative]] and item.boundary_fallbacks == 0
    assert tok.decode(item.context).endswith("It is")  # the space went to the label
    # the naive split would score a lone space token, then the label without its space
    assert tok(head)["input_ids"][-1] == tok.convert_tokens_to_ids("Ġ")
    assert tok("positive")["input_ids"] != [positive]
    assert tok.decode(item.context + item.candidates[0]) == "Review: a good film. It is positive\n" + head + "positive"


class _MergingTokenizer:
    """Characters as ids, except that 'ab' is one token (id 99): a merge across the prompt / label boundary."""

    bos_token_id = 1

    def __call__(self, text, add_special_tokens=True):
        ids, i = ([1] if add_special_tokens else []), 0
        while i < len(text):
            if text[i : i + 2] == "ab":
                ids.append(99)
                i += 2
            else:
                ids.append(ord(text[i]))
                i += 1
        return {"input_ids": ids}


def test_boundary_merge_falls_back_and_long_prompts_lose_demonstrations_then_tokens():
    tok = _MergingTokenizer()
    item = encode_item(tok, [], "xa", ["b", "c"])
    assert item.context == [1, ord("x"), ord("a")] and item.candidates == [[ord("b")], [ord("c")]]
    assert item.boundary_fallbacks == 1  # "xab" tokenizes as x, ab: the candidate is tokenized alone
    item = encode_item(tok, ["d1", "d2", "d3"], "q ", ["yes"], max_length=12)
    assert item.num_shots == 2 and len(item.context) + 4 <= 12 and not item.truncated  # " yes": 4 tokens
    item = encode_item(tok, ["d1"], "a long question ", ["yes"], max_length=10)
    assert item.num_shots == 0 and item.truncated and item.context[0] == 1 and len(item.context) == 6


# ---------------------------------------------------------------------------------------------------------------
# Scoring: the cached fast path against a full forward of every prompt + candidate
# ---------------------------------------------------------------------------------------------------------------


def _naive_scores(model, item: EncodedItem) -> list[float]:
    scores = []
    for cand in item.candidates:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([item.context + cand])).logits[0].double()
        logp = torch.log_softmax(logits, -1)
        scores.append(sum(logp[len(item.context) - 1 + j, t].item() for j, t in enumerate(cand)))
    return scores


def _tiny_items(tok, n=7):
    from tiny_models import SENTENCES

    candidates = ["king", "new king of the", "city", "the river", "war"]
    return [
        encode_item(tok, SENTENCES[: i % 4], " ".join(SENTENCES[i].split()[: 2 + i]), candidates[: 2 + i % 4])
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_llama_dir)


def _tiny_gemma3():
    """A Gemma-3 text model (the study's second base) whose sliding window (5) is shorter than most prompts."""
    from tiny_models import VOCAB_SIZE
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        sliding_window=5,
        layer_types=["sliding_attention", "full_attention"],
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2:
                torch.nn.init.normal_(param, std=0.3 if "embed" in name else 0.1)
    return model


# one pass on the prompt cache, or several on copies of it; Llama, and Gemma-3 with a sliding-window cache
@pytest.mark.parametrize("arch,max_rows", [("llama", 64), ("llama", 2), ("gemma3", 2)])
def test_fast_scores_equal_naive_full_forwards(tiny, arch, max_rows):
    model, tok = tiny
    model = model if arch == "llama" else _tiny_gemma3()
    items = _tiny_items(tok)
    assert len({len(it.context) for it in items}) > 3  # batches mix prompt lengths: left padding is exercised
    fast = score_items(model, items, pad_token_id=0, batch_size=3, max_rows=max_rows, show_progress=False)
    for item, got in zip(items, fast):
        assert got == pytest.approx(_naive_scores(model, item), abs=1e-4)


def test_fast_scores_equal_naive_on_a_lora_adapter_and_in_bf16(tiny_llama_dir, tiny):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    _, tok = tiny
    items = _tiny_items(tok, n=5)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    adapter = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)).eval()
    for item, got in zip(items, score_items(adapter, items, pad_token_id=0, batch_size=2, show_progress=False)):
        assert got == pytest.approx(_naive_scores(adapter, item), abs=1e-4)
    bf16 = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.bfloat16).eval()
    for item, got in zip(items, score_items(bf16, items, pad_token_id=0, batch_size=2, show_progress=False)):
        assert got == pytest.approx(_naive_scores(bf16, item), abs=0.15, rel=0.02)  # bf16: ~3 significant digits


def _rigged_model(tiny_llama_dir, favourite: int, boost: float):
    """Every block adds nothing and every token has the same embedding, so the final hidden state is the same at
    every position; the head gives `favourite` the logit `boost` and every other token 0."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        u = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0))
        model.model.embed_tokens.weight.copy_(u.expand_as(model.model.embed_tokens.weight))
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        h = model.model.norm(u)
        model.lm_head.weight.zero_()
        model.lm_head.weight[favourite] = boost * h / h.dot(h)
    return model


def test_rigged_model_by_hand(tiny_llama_dir, tiny):
    import math

    _, tok = tiny
    king = tok.convert_tokens_to_ids("king")
    model = _rigged_model(tiny_llama_dir, king, boost=3.0)
    log_z = math.log(math.exp(3.0) + model.config.vocab_size - 1)
    lp_king, lp_other = 3.0 - log_z, -log_z
    item = encode_item(tok, ["the city"], "a river", ["city", "king king city", "king"])
    (scores,) = score_items(model, [item], pad_token_id=0, show_progress=False)
    assert scores == pytest.approx([lp_other, 2 * lp_king + lp_other, lp_king], abs=1e-5)
    # summed: "city" beats "king king city"; per token, the three-token candidate wins
    golds = ["king king city", "city"] * 4
    results, predictions = evaluate_icl(
        model, tok, [_rigged_task(("city", "king king city"), golds)], show_progress=False
    )
    assert results["rigged"]["correct"] == [0, 1, 0, 1] and results["rigged"]["correct_norm"] == [1, 0, 1, 0]
    assert {p["prediction"] for p in predictions} == {"city"}
    assert {p["prediction_norm"] for p in predictions} == {"king king city"}
    # the right label wins when it is the one the model prefers
    results, _ = evaluate_icl(model, tok, [_rigged_task(("city", "war", "king"), ["king"] * 8)], show_progress=False)
    assert results["rigged"]["accuracy"] == 1.0 and results["rigged"]["ci95"] == [1.0, 1.0]
    assert results["rigged"]["chance"] == pytest.approx(1 / 3) and results["rigged"]["majority"] == 1.0


def _rigged_task(labels, golds) -> PreparedTask:
    texts = ["the king", "a city", "new war", "the river", "king of the", "city of the", "war of the", "the state"]
    task = ICLTask("rigged", [ICLExample(t, g) for t, g in zip(texts, golds)], "{text} is {label}", labels)
    return PreparedTask(task, test=[0, 1, 2, 3], pool=[4, 5, 6, 7], demonstrations=[[4, 5], [5], [6], []])


# ---------------------------------------------------------------------------------------------------------------
# The whole path: emo-calibrate eval --metrics icl
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def icl_assets(tiny_llama_dir, tmp_path_factory):
    """A small local task file and a non-identity LoRA adapter on the tiny model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("icl-assets")
    task = _write_jsonl(root / "tiny.jsonl", _tiny_rows())
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    adapter = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    adapter.save_pretrained(root / "emo-adapter")
    return root, task


def test_cli_icl_only_writes_results_report_and_plot(tiny_llama_dir, icl_assets, tmp_path, capsys):
    from emo_calibrate.cli.main import main

    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    help_text = capsys.readouterr().out
    for option in ("--icl_tasks", "--icl_shots", "--icl_retriever", "--icl_max_examples", "--icl_template"):
        assert option in help_text
    root, task = icl_assets
    out = tmp_path / "report"
    argv = ["eval", "--models", f"base={tiny_llama_dir}", f"emo={root / 'emo-adapter'}", "--metrics", "icl"]
    argv += ["--icl_tasks", f"tiny={task}", "--icl_max_examples", "8", "--icl_shots", "3", "--output_dir", str(out)]
    assert main(argv) == 0  # no --eval_data: only icl runs
    results = json.loads((out / "results.json").read_text())
    described = results["icl_tasks"]["tiny"]
    assert (described["num_test"], described["num_pool"], described["shots"]) == (8, 16, 3)
    assert described["retriever"] == "topk" and described["labels"] == WORDS
    for m in results["models"]:
        r = m["icl"]["tiny"]
        assert r["n"] == 8 and len(r["correct"]) == 8 and r["accuracy"] == sum(r["correct"]) / 8
        assert r["ci95"][0] <= r["accuracy"] <= r["ci95"][1] and 0 <= r["accuracy_norm"] <= 1
        assert r["mean_shots"] == 3 and r["truncated_prompts"] == 0 and r["boundary_fallbacks"] == 0
        assert set(m) >= {"icl", "seconds"} and "perplexity" not in m and "generation" not in m
    prompts = [json.loads(line) for line in (out / "icl" / "prompts-tiny.jsonl").read_text().splitlines()]
    assert len(prompts) == 8 and all(len(p["demonstrations"]) == 3 for p in prompts)
    base_rows, emo_rows = (
        [json.loads(line) for line in (out / "icl" / f"predictions-{m}.jsonl").read_text().splitlines()]
        for m in ("base", "emo")
    )
    assert [r["item"] for r in base_rows] == [r["item"] for r in emo_rows] == [p["item"] for p in prompts]
    assert base_rows != emo_rows  # the adapter changes the scores
    report = (out / "report.md").read_text()
    assert "## In-context learning" in report and "| base | " in report and "tiny (n=8)" in report
    assert "Paired difference against **base**" in report and "| emo | tiny | " in report
    paired = results["paired"]["models"]["emo"]
    assert list(paired) == ["icl"] and "## Paired differences against" not in report  # ICL has its own table
    a, b = (m["icl"]["tiny"]["correct"] for m in results["models"][::-1])
    assert paired["icl"]["tiny"]["estimate"] == pytest.approx((sum(a) - sum(b)) / 8)
    assert paired["icl"]["tiny"]["mcnemar"]["a_only"] == sum(x > y for x, y in zip(a, b))
    assert (out / "icl_accuracy.png").stat().st_size > 0 and not (out / "samples").exists()


def test_icl_options_fail_fast(tiny_llama_dir, tmp_path, capsys):
    from emo_calibrate.cli.main import main
    from emo_calibrate.evaluation.arguments import EvalArguments

    with pytest.raises(ValueError, match="needs --icl_tasks"):
        EvalArguments(models=["m"], metrics=["icl"])
    with pytest.raises(ValueError, match="--icl_retriever"):
        EvalArguments(models=["m"], icl_tasks=["trec"], icl_retriever="bm25")
    with pytest.raises(ValueError, match="--icl_template"):
        EvalArguments(models=["m"], icl_tasks=["trec"], icl_template="no fields")
    args = EvalArguments(models=["m"], icl_tasks=["trec"], icl_template="Q: {text}\\nA: {label}")
    assert args.icl_template == "Q: {text}\nA: {label}" and args.metrics[-1] == "icl"
    base = ["eval", "--models", tiny_llama_dir, "--output_dir", str(tmp_path / "x")]
    assert main([*base, "--metrics", "icl", "--icl_tasks", "no-such-task"]) == 2
    assert "Unknown ICL task 'no-such-task'" in capsys.readouterr().err
    assert main([*base, "--metrics", "icl", "--icl_tasks", f"mine={tmp_path / 'missing.jsonl'}"]) == 2
    assert "is not a file" in capsys.readouterr().err
    assert main([*base, "--icl_tasks", "trec"]) == 2  # the default text metrics still need held-out text
    assert "--metrics icl" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
