"""Calibration sets: segmentation, WikiText clean-up, filters, sampling, the build, its bad-input errors and the CLI.

Every corpus here is written by the test itself; nothing touches a network.
"""

import random
import re
from pathlib import Path

import pytest

from emo_calibrate.data import build_calibration_set
from emo_calibrate.data.filters import filter_sentences, near_duplicate_key
from emo_calibrate.data.sampling import group_examples, sample_sentences, split_documents
from emo_calibrate.data.segment import detokenize_wikitext, heading_title, split_sentences


WORDS = "river city king music film school church album team game book war state world people year".split()


def document_sentences(doc: int, n: int, seed: int = 0) -> list[str]:
    """`n` distinct sentences naming their document ("Doc 3 ..."), so leakage can be read off the text."""
    rng = random.Random(seed * 1000 + doc)
    return [f"Doc {doc} line {j} says the {rng.choice(WORDS)} met the {rng.choice(WORDS)} again." for j in range(n)]


def write_corpus(folder: Path, docs: int = 12, per_doc: int = 30) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for d in range(docs):
        sentences = document_sentences(d, per_doc)
        paragraphs = [" ".join(sentences[i : i + 5]) for i in range(0, per_doc, 5)]
        (folder / f"doc{d:02d}.txt").write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    return folder


def doc_numbers(texts) -> set[int]:
    return {int(m) for t in texts for m in re.findall(r"Doc (\d+) ", t)}


def build(tmp_path, source, name="out", **options) -> Path:
    return build_calibration_set(str(source), tmp_path / name, **options)


# ----------------------------------------------------------------------------------------------- segmentation


@pytest.mark.parametrize(
    "text, expected",
    [
        (
            "Dr. Smith flew to Washington. He met the U.S. president.",
            ["Dr. Smith flew to Washington.", "He met the U.S. president."],
        ),
        (
            "Pi is about 3.14 in value. It rose by 2.5% in 2019.",
            ["Pi is about 3.14 in value.", "It rose by 2.5% in 2019."],
        ),
        ("J. R. R. Tolkien wrote it. He was born in 1892.", ["J. R. R. Tolkien wrote it.", "He was born in 1892."]),
        (
            "Fruit, e.g. apples, is cheap. Others, i.e. pears, are not.",
            ["Fruit, e.g. apples, is cheap.", "Others, i.e. pears, are not."],
        ),
        ('He said "Stop." Then he left.', ['He said "Stop."', "Then he left."]),
        ('He wrote "I came. I saw." and left.', ['He wrote "I came. I saw." and left.']),
        ("Is it? Yes! It is.", ["Is it?", "Yes!", "It is."]),
        (
            "John F. Kennedy Jr. spoke. The crowd\ncheered  loudly.",
            ["John F. Kennedy Jr. spoke.", "The crowd cheered loudly."],
        ),
        ("   ", []),
    ],
)
def test_split_sentences(text, expected):
    assert split_sentences(text) == expected


@pytest.mark.parametrize(
    "line, expected",
    [
        (" = Valkyria Chronicles III = ", (1, "Valkyria Chronicles III")),
        (" = = Gameplay = = ", (2, "Gameplay")),
        (" = = = Plot = = = ", (3, "Plot")),
        ("==History==", (2, "History")),
        ("x = y = z", None),
        ("= unbalanced", None),
        ("The sum a = b holds.", None),
    ],
)
def test_heading_title(line, expected):
    assert heading_title(line) == expected


@pytest.mark.parametrize(
    "raw, clean",
    [
        ("a role @-@ playing game", "a role-playing game"),
        ("sold 1 @,@ 000 @,@ 000 copies", "sold 1,000,000 copies"),
        ("it weighs 3 @.@ 5 kg .", "it weighs 3.5 kg."),
        (
            "The game 's battle system , the BliTZ system , is new .",
            "The game's battle system, the BliTZ system, is new.",
        ),
        ("He did n't ( and could n't ) go ; 50 % stayed !", "He didn't (and couldn't) go; 50% stayed!"),
        ('the song " Hello World " was a hit', 'the song "Hello World" was a hit'),
    ],
)
def test_detokenize_wikitext(raw, clean):
    assert detokenize_wikitext(raw) == clean


# ----------------------------------------------------------------------------------------------- filters


def test_filters_count_each_stage_and_keep_first_occurrences():
    docs = [
        [
            "Too short here.",  # 3 words
            "This sentence is long enough to keep.",
            "The U.S. Army, in 1945, left the town.",
            "1 2 3 4 5 6.",  # no letters
            "A {{cite web}} template was left in here.",  # markup
            "This sentence is long enough to keep.",  # exact duplicate
        ],
        [
            "the US army in 1945 left the town",  # near duplicate of doc 0's sentence
            "The U.S. Army, in 1946, left the town.",  # a different year: kept
            " ".join(["word"] * 12),  # too long for max_words=10
        ],
    ]
    kept, counts = filter_sentences(docs, min_words=5, max_words=10)
    assert kept == [
        ["This sentence is long enough to keep.", "The U.S. Army, in 1945, left the town."],
        ["The U.S. Army, in 1946, left the town."],
    ]
    assert counts == {
        "segmented": 9,
        "after_min_words": 8,
        "after_max_words": 7,
        "after_no_letters": 6,
        "after_markup": 5,
        "after_exact_duplicates": 4,
        "after_near_duplicates": 3,
    }


def test_near_duplicate_key_is_language_agnostic():
    assert near_duplicate_key("Ça va très bien, merci !") == near_duplicate_key("ça va TRÈS bien merci")
    assert near_duplicate_key("東京は日本の首都です。") == near_duplicate_key("東京は日本の首都です")
    assert near_duplicate_key("Built in 1901.") != near_duplicate_key("Built in 1902.")


# ----------------------------------------------------------------------------------------------- sampling


def test_split_documents_holds_out_whole_documents():
    sizes = [5, 0, 7, 3, 9, 4, 6, 2]
    train, test = split_documents(sizes, 10, random.Random(0))
    assert not set(train) & set(test)
    assert set(train) | set(test) == {i for i, s in enumerate(sizes) if s}
    held = sum(sizes[i] for i in test)
    assert held >= 10 and any(held - sizes[i] < 10 for i in test)  # stops at the first document that reaches 10
    assert (train, test) == split_documents(sizes, 10, random.Random(0))
    assert split_documents(sizes, 0, random.Random(0))[1] == []


def test_sample_sentences_modes():
    docs = [[f"d{d}s{j}" for j in range(n)] for d, n in enumerate([4, 6, 5, 3])]
    picked = sample_sentences(docs, [0, 2, 3], 7, "sentences", random.Random(1))
    assert len(picked) == len(set(picked)) == 7 and picked == sorted(picked)
    assert {d for d, _ in picked} <= {0, 2, 3}
    assert sample_sentences(docs, [0, 2, 3], 100, "sentences", random.Random(1)) == [
        (d, j) for d in (0, 2, 3) for j in range(len(docs[d]))
    ]
    whole = sample_sentences(docs, [0, 1, 2, 3], 8, "documents", random.Random(1))
    assert len(whole) == 8
    runs = {}
    for d, j in whole:
        runs.setdefault(d, []).append(j)
    assert all(js == list(range(len(js))) for js in runs.values())  # each document contributes a prefix, in order


def test_group_examples_packs_within_documents():
    docs = [["a b c.", "d e.", "f g h i."], ["j k.", "l m n o p q r s t u."]]
    picked = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]
    assert group_examples(docs, picked) == ["a b c.", "d e.", "f g h i.", "j k.", "l m n o p q r s t u."]
    packed = group_examples(docs, picked, block_size=5)
    assert packed == ["a b c. d e.", "f g h i.", "j k.", "l m n o p q r s t u."]  # never across documents
    assert " ".join(packed).split() == " ".join(docs[0] + docs[1]).split()
