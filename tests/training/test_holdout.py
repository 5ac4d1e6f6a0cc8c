"""The perplexity budget's automatic held-out split: whole documents, seeded, small, never a neighbour of a training
row it can avoid."""

import pytest
from datasets import Dataset

from emo_calibrate.training.holdout import HOLDOUT_MAX_ROWS, hold_out


def _runs(indices: list[int]) -> list[list[int]]:
    """Maximal runs of consecutive indices."""
    runs = []
    for i in indices:
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def test_rows_sharing_a_document_id_are_held_out_together():
    data = Dataset.from_dict({"text": [f"s{i}" for i in range(100)], "doc_id": [i // 10 for i in range(100)]})
    train, held, info = hold_out(data, 0.2, seed=3)
    assert len(held) == 20 and len(set(held["doc_id"])) == 2 and not set(held["doc_id"]) & set(train["doc_id"])
    assert (info.source, info.method, info.documents, info.rows, info.train_rows, info.seed) == (
        "automatic", "document column 'doc_id'", 2, 20, 80, 3,
    )  # fmt: skip
    assert hold_out(data, 0.2, seed=3)[1]["text"] == held["text"]  # same seed, same rows
    assert hold_out(data, 0.2, seed=4)[1]["text"] != held["text"]


def test_sentences_without_ids_are_held_out_as_contiguous_spans():
    # one sentence per row, consecutive rows of one article (what `emo-calibrate data` writes); `id` names rows only
    data = Dataset.from_dict({"text": [f"sentence {i}" for i in range(5000)], "id": list(range(5000))})
    train, held, info = hold_out(data, 0.02, seed=0)
    indices = sorted(held["id"])
    assert len(held) == 100 == info.rows and len(train) == 4900
    assert len(_runs(indices)) <= 8 and info.method == "8 contiguous spans of rows"  # not 100 scattered rows
    assert not set(indices) & set(train["id"])


def test_the_fraction_is_capped_and_a_number_is_taken_as_rows():
    data = Dataset.from_dict({"text": ["x"] * 60_000})
    assert len(hold_out(data, 0.02, seed=0)[1]) == HOLDOUT_MAX_ROWS  # 2 % would be 1200 rows
    assert len(hold_out(data, 1500, seed=0)[1]) == 1500  # an explicit number of rows is used as given
    tiny = Dataset.from_dict({"text": ["a", "b", "c"]})
    assert len(hold_out(tiny, 0.02, seed=0)[1]) == 1 and len(hold_out(tiny, 5, seed=0)[0]) == 1  # one row stays


@pytest.mark.parametrize("rows", [0, 1])
def test_what_cannot_be_split_is_none(rows):
    assert hold_out(Dataset.from_dict({"text": ["a"] * rows}), 0.02, seed=0) is None
    streaming = Dataset.from_dict({"text": ["a", "b", "c"]}).to_iterable_dataset()
    assert hold_out(streaming, 0.02, seed=0) is None
