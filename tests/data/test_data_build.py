"""End-to-end calibration-set builds on corpora written by the tests: determinism, no document leakage, the
manifest, every source format, every bad-input error (and that nothing is written then), the CLI."""

import hashlib
import json
import logging

import pytest
from test_data import build, doc_numbers, document_sentences, write_corpus

from emo_calibrate.data import DataArguments, DataError, is_calibration_set, load_calibration_set


def tree_digest(folder) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path / "corpus")


def test_same_seed_gives_the_same_bytes(tmp_path, corpus):
    a = build(tmp_path, corpus, "a", num_sentences=150, seed=3, jsonl=True)
    b = build(tmp_path, corpus, "b", num_sentences=150, seed=3, jsonl=True)
    c = build(tmp_path, corpus, "c", num_sentences=150, seed=4, jsonl=True)
    assert tree_digest(a) == tree_digest(b)
    assert (a / "train.jsonl").read_bytes() != (c / "train.jsonl").read_bytes()


def test_held_out_documents_never_leak_and_manifest_adds_up(tmp_path, corpus):
    out = build(tmp_path, corpus, num_sentences=200, test_size=0.1, seed=0)
    assert is_calibration_set(out)
    data = load_calibration_set(out)
    manifest = json.loads((out / "manifest.json").read_text())
    train_docs, test_docs = doc_numbers(data["train"]["text"]), doc_numbers(data["test"]["text"])
    assert train_docs and test_docs and not train_docs & test_docs
    assert {f"doc{d:02d}.txt" for d in test_docs} == set(manifest["test_documents"])
    assert data["train"].column_names == ["text"]

    counts = manifest["counts"]
    assert counts["documents"] == 12 and counts["segmented"] == 12 * 30
    stages = [
        counts[k] for k in ("segmented", "after_min_words", "after_max_words", "after_no_letters", "after_markup")
    ]
    assert stages == sorted(stages, reverse=True)
    assert (
        counts["train_pool_sentences"] + counts["test_pool_sentences"] + counts["unused_sentences"]
        == counts["after_near_duplicates"]
    )
    assert counts["train_pool_documents"] + counts["test_pool_documents"] == counts["documents"]
    splits = manifest["splits"]
    assert splits["train"]["sentences"] == splits["train"]["examples"] == len(data["train"]) == 200
    assert splits["test"]["sentences"] == len(data["test"]) == 20
    assert splits["train"]["words"] == sum(len(t.split()) for t in data["train"]["text"])
    assert manifest["seed"] == 0 and manifest["document_by"] == "file"
    assert len(manifest["source"]["files"]) == 12 and all(len(f["sha256"]) == 64 for f in manifest["source"]["files"])


def test_packing_and_token_statistics(tmp_path, corpus, tiny_llama_dir):
    out = build(tmp_path, corpus, num_sentences=120, block_size=40, tokenizer=tiny_llama_dir)
    data = load_calibration_set(out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert all(len(t.split()) <= 40 for t in data["train"]["text"])
    assert all(len(doc_numbers([t])) == 1 for t in data["train"]["text"])  # packed within one document
    assert manifest["splits"]["train"]["sentences"] == 120 > manifest["splits"]["train"]["examples"]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in data["train"]["text"]]
    assert manifest["splits"]["train"]["tokens"]["total"] == sum(lengths)
    assert manifest["splits"]["train"]["tokens"]["max"] == max(lengths)

    by_tokens = build(
        tmp_path, corpus, "tok", num_sentences=60, block_size=30, block_unit="tokens", tokenizer=tiny_llama_dir
    )
    texts = load_calibration_set(by_tokens)["train"]["text"]
    assert all(len(tokenizer(t, add_special_tokens=False)["input_ids"]) <= 30 for t in texts)


def test_tabular_sources_and_document_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"body": s, "article": f"a{d}"} for d in range(6) for s in document_sentences(d, 10)]
    folder = tmp_path / "tables"
    folder.mkdir()
    with open(folder / "part1.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows[:20])
    with open(folder / "part2.csv", "w") as f:
        f.write("article,body\n" + "".join(f'{r["article"]},"{r["body"]}"\n' for r in rows[20:40]))
    pq.write_table(pa.Table.from_pylist(rows[40:]), folder / "part3.parquet")
    out = build(tmp_path, folder, num_sentences=40, test_size=10, text_column="body", document_column="article")
    data = load_calibration_set(out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["document_by"] == "column" and manifest["counts"]["documents"] == 6
    assert len(data["train"]) == 40 and len(data["test"]) == 10
    assert not doc_numbers(data["train"]["text"]) & doc_numbers(data["test"]["text"])


def test_wikitext_file_is_split_by_article_and_cleaned(tmp_path):
    lines = []
    for d in range(4):
        lines += [f" = Article {d} = ", "", f" = = Section of {d} = = ", ""]
        lines += [
            " ".join(s.replace(" met ", " met @-@ up ").replace(".", " .") for s in document_sentences(d, 8)),
            "",
        ]
    (tmp_path / "wiki.train.raw.txt").write_text("\n".join(lines), encoding="utf-8")
    out = build(tmp_path, tmp_path / "wiki.train.raw.txt", num_sentences=20, test_size=5)
    data = load_calibration_set(out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["document_by"] == "heading" and manifest["wikitext_detokenized"] is True
    assert manifest["counts"]["documents"] == 4 and manifest["test_documents"][0].startswith("Article ")
    texts = list(data["train"]["text"]) + list(data["test"]["text"])
    assert not any("=" in t or "@" in t or " ." in t for t in texts)
    assert all("met-up" in t for t in texts)


def test_hub_source_is_read_through_datasets(tmp_path, monkeypatch):
    import datasets

    rows = []
    for d in range(5):
        rows += [f" = Title {d} = \n", ""] + [s + "\n" for s in document_sentences(d, 6)]
    calls = []

    def fake_load_dataset(name, config=None, split=None, revision=None):
        calls.append((name, config, split))
        return datasets.Dataset.from_dict({"text": rows})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    out = build(tmp_path, "Salesforce/wikitext", num_sentences=20, test_size=6)
    assert calls == [("Salesforce/wikitext", "wikitext-103-raw-v1", "train")]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"]["kind"] == "hub" and manifest["source"]["rows"] == len(rows)
    assert manifest["document_by"] == "heading" and manifest["counts"]["documents"] == 5


def test_fewer_sentences_than_requested(tmp_path, corpus, caplog):
    with pytest.raises(DataError, match="fewer than --num_sentences 1000.*--allow_fewer"):
        build(tmp_path, corpus, num_sentences=1000)
    assert not (tmp_path / "out").exists()
    with caplog.at_level(logging.WARNING):
        out = build(tmp_path, corpus, num_sentences=1000, allow_fewer=True)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"]["train"]["sentences"] == manifest["counts"]["train_pool_sentences"] < 1000
    assert f"Taking all {manifest['counts']['train_pool_sentences']}" in caplog.text


def write_bytes(path, data: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("empty.txt", b"", r"empty\.txt is empty"),
        ("blank.txt", b"  \n\n \n", r"blank\.txt is empty"),
        (
            "latin1.txt",
            b"First line is fine.\nSecond too.\nCaf\xe9 is not UTF-8.\n",
            r"latin1\.txt: line 3 is not valid UTF-8",
        ),
        (
            "rows.jsonl",
            b'{"text": "A fine row of text."}\n{"content": "no text"}\n',
            r"rows\.jsonl: line 2 has no column 'text' \(it has: content\)",
        ),
        (
            "rows.jsonl",
            b'{"text": "A fine row of text."}\n{"text": broken\n',
            r"rows\.jsonl: line 2 is not valid JSON",
        ),
        ("rows.jsonl", b'{"text": ["a", "list"]}\n', r"line 1: 'text' is a list, not a string"),
        (
            "table.csv",
            b"title,body\nA,Some text here.\n",
            r"table\.csv: line 2 has no column 'text' \(it has: title, body\)",
        ),
        ("notes.md", b"# Some text.\n", r"unsupported file type '\.md'"),
    ],
)
def test_bad_input_is_refused_before_writing(tmp_path, name, content, message):
    source = write_bytes(tmp_path / "src" / name, content)
    with pytest.raises(DataError, match=message):
        build(tmp_path, source, num_sentences=5)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["src"]  # no temporary folder left behind either


def test_bad_parquet_and_folder_inputs(tmp_path, corpus):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["Some text in a table."]}), tmp_path / "t.parquet")
    with pytest.raises(DataError, match=r"t\.parquet has no column 'text' \(it has: body\)"):
        build(tmp_path, tmp_path / "t.parquet")
    write_bytes(tmp_path / "bad.parquet", b"not parquet at all")
    with pytest.raises(DataError, match=r"bad\.parquet is not a readable Parquet file"):
        build(tmp_path, tmp_path / "bad.parquet")
    write_bytes(corpus / "sub" / "zz.txt", b"")
    with pytest.raises(DataError, match=r"zz\.txt is empty"):
        build(tmp_path, corpus)
    with pytest.raises(DataError, match="no such file or folder"):
        build(tmp_path, tmp_path / "missing.txt")
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DataError, match="holds no .txt"):
        build(tmp_path, tmp_path / "nothing")
    assert not (tmp_path / "out").exists()


def test_output_folder_rules(tmp_path, corpus):
    out = build(tmp_path, corpus, num_sentences=50)
    (out / "stale.txt").write_text("from an older build")
    with pytest.raises(DataError, match="already exists; pass --overwrite"):
        build(tmp_path, corpus, num_sentences=60)
    build(tmp_path, corpus, num_sentences=60, overwrite=True)
    assert not (out / "stale.txt").exists() and len(load_calibration_set(out)["train"]) == 60
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "out"]
    with pytest.raises(DataError, match="contains the source"):
        build(tmp_path, corpus, "corpus", overwrite=True)


def test_interrupted_save_leaves_nothing(tmp_path, corpus, monkeypatch):
    import datasets

    def fail(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(datasets.DatasetDict, "save_to_disk", fail)
    with pytest.raises(KeyboardInterrupt):
        build(tmp_path, corpus, num_sentences=50)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]


def test_one_document_cannot_be_split_and_bad_options(tmp_path):
    write_bytes(tmp_path / "one.txt", " ".join(document_sentences(0, 20)).encode())
    with pytest.raises(DataError, match="leaves no training document"):
        build(tmp_path, tmp_path / "one.txt", num_sentences=10, document_by="file")
    out = build(tmp_path, tmp_path / "one.txt", num_sentences=10, document_by="file", test_size=0)
    assert len(load_calibration_set(out)["test"]) == 0
    for options, message in [
        (dict(min_words=10, max_words=5), "min_words"),
        (dict(num_sentences=0), "num_sentences"),
        (dict(test_size=2.5), "test_size"),
        (dict(block_size=64, block_unit="tokens"), "needs --tokenizer"),
        (dict(document_by="column"), "needs --document_column"),
    ]:
        with pytest.raises(DataError, match=message):
            DataArguments(output_dir=str(tmp_path / "x"), **options)


def test_unreachable_hub_dataset_explains_the_offline_options(tmp_path):
    with pytest.raises(DataError, match="(?s)not a local file or folder.*--source wikipedia-excerpt"):
        build(tmp_path, "someone/no-such-dataset", num_sentences=5)


def test_load_calibration_set_refuses_other_folders(tmp_path):
    with pytest.raises(DataError, match="not a calibration set"):
        load_calibration_set(tmp_path)


def test_sft_trainer_consumes_the_set(tmp_path, corpus, tiny_llama_dir):
    from trl import SFTConfig, SFTTrainer

    out = build(tmp_path, corpus, num_sentences=16, test_size=4)
    data = load_calibration_set(out)
    args = SFTConfig(
        output_dir=str(tmp_path / "run"),
        max_steps=1,
        per_device_train_batch_size=4,
        report_to="none",
        bf16=False,
        max_length=32,
    )
    trainer = SFTTrainer(tiny_llama_dir, args=args, train_dataset=data["train"], eval_dataset=data["test"])
    assert trainer.train().training_loss > 0


def test_cli(tmp_path, corpus, capsys):
    from emo_calibrate.cli.main import main

    out = tmp_path / "cli-out"
    assert (
        main(["data", "--source", str(corpus), "--output_dir", str(out), "--num_sentences", "40", "--seed", "1"]) == 0
    )
    assert len(load_calibration_set(out)["train"]) == 40
    assert main(["data", "--source", str(corpus), "--output_dir", str(out)]) == 1
    assert "already exists" in capsys.readouterr().err
    config = tmp_path / "data.yaml"
    config.write_text(f"source: {corpus}\noutput_dir: {tmp_path / 'from-yaml'}\nnum_sentences: 30\nseed: 1\n")
    assert main(["data", "--config", str(config), "--num_sentences", "35"]) == 0
    assert len(load_calibration_set(tmp_path / "from-yaml")["train"]) == 35
    assert main(["data", "--output_dir", str(tmp_path / "o"), "--min_words", "9", "--max_words", "3"]) == 2
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "--help"])
    assert exit_info.value.code == 0 and "--allow_fewer" in capsys.readouterr().out
