"""The held-out split of the perplexity budget when the data has none: whole documents, seeded, small.

A held-out row must not have a neighbour in the training data, or held-out perplexity measures memorisation:

- with a document column (`document`, `document_id`, `doc_id`, `title` or `id`, whose values repeat), whole
  documents are held out;
- without one, rows are held out as a few contiguous spans. Rows that are whole documents (a `.jsonl` of articles)
  stay whole documents; rows that are consecutive sentences of one article (what `emo-calibrate data` writes) leak
  only at the two ends of each span, not at every held-out row as a random choice of rows would.
"""

import math
import random
from dataclasses import asdict, dataclass


__all__ = ["DOCUMENT_COLUMNS", "HOLDOUT_MAX_ROWS", "HoldOut", "hold_out"]

DOCUMENT_COLUMNS = ("document", "document_id", "doc_id", "title", "id")
HOLDOUT_MAX_ROWS = 1000  # cap of a fractional hold-out: ten evaluations of it stay cheap next to training
_MAX_SPANS = 8  # spans of an id-less hold-out: enough to sample several places, few enough to leak little


@dataclass(frozen=True)
class HoldOut:
    """How the budget's held-out split was made (written to `emo_training.json`).

    Args:
        source (`str`): `"automatic"` (held out of the training data here) or `"given"` (the user's eval split).
        rows (`int`, *optional*): held-out rows (before tokenization / packing).
        method (`str`, *optional*): how rows were grouped, e.g. `"document column 'title'"` or `"4 contiguous spans"`.
        documents (`int`, *optional*): documents (or spans) held out.
        train_rows (`int`, *optional*): rows left for training.
        seed (`int`, *optional*): the seed of the choice (`data_seed`, else `seed`).
        size (`float`, *optional*): `emo_guard_holdout` as asked (a fraction of the rows, or a number of rows).
    """

    source: str
    rows: int | None = None
    method: str | None = None
    documents: int | None = None
    train_rows: int | None = None
    seed: int | None = None
    size: float | None = None

    def record(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        if self.source == "given":
            return f"the given eval split ({self.rows} rows)" if self.rows is not None else "the given eval split"
        return f"{self.rows} rows held out automatically ({self.method}, seed {self.seed})"


def _target_rows(num_rows: int, size: float) -> int:
    rows = min(math.ceil(size * num_rows), HOLDOUT_MAX_ROWS) if size < 1 else int(size)
    return min(max(rows, 1), num_rows - 1)


def _document_column(dataset) -> str | None:
    """The first document column with repeated values and at least two documents (unique values name rows)."""
    for name in DOCUMENT_COLUMNS:
        if name in dataset.column_names:
            values = dataset[name]
            try:
                if 1 < len(set(values)) < len(values):
                    return name
            except TypeError:  # unhashable values (lists, dicts) name no document
                continue
    return None


def _by_document(values: list, target: int, rng: random.Random) -> list[int]:
    """Row indices of whole documents, in a seeded random order, up to `target` rows (at least one document)."""
    groups: dict = {}
    for index, value in enumerate(values):
        groups.setdefault(value, []).append(index)
    order = list(groups.values())
    rng.shuffle(order)
    chosen, total = [], 0
    for rows in order[:-1]:  # the last document always stays for training
        if total + len(rows) <= target:
            chosen += rows
            total += len(rows)
    return chosen or min(order[:-1], key=len)


def _by_spans(num_rows: int, target: int, rng: random.Random) -> tuple[list[int], int]:
    """Row indices of up to `_MAX_SPANS` contiguous spans of `target` rows in all, placed at seeded random blocks."""
    spans = min(_MAX_SPANS, target)
    while num_rows // math.ceil(target / spans) < spans:  # too many spans to fit side by side
        spans -= 1
    length = math.ceil(target / spans)
    shorter = spans * length - target  # that many spans are one row shorter, so the total is exactly `target`
    starts = sorted(rng.sample(range(num_rows // length), spans))
    rows = [s * length + k for i, s in enumerate(starts) for k in range(length - (i < shorter))]
    return rows, spans


def hold_out(dataset, size: float, seed: int):
    """Hold out whole documents of `dataset` for the perplexity budget.

    Args:
        dataset (`datasets.Dataset`): the training data, one row per example.
        size (`float`): a fraction of the rows (`< 1`, capped at `HOLDOUT_MAX_ROWS` rows) or a number of rows.
        seed (`int`): the same seed holds out the same rows.

    Returns:
        `tuple` or `None`: (train `Dataset`, held-out `Dataset`, `HoldOut`), or None when `dataset` cannot be split
        (an `IterableDataset`, or fewer than 2 rows).
    """
    from datasets import Dataset

    if not isinstance(dataset, Dataset) or len(dataset) < 2:
        return None
    target, rng = _target_rows(len(dataset), size), random.Random(seed)
    column = _document_column(dataset)
    if column is not None:
        values = dataset[column]
        held = sorted(_by_document(values, target, rng))
        documents, method = len({values[i] for i in held}), f"document column {column!r}"
    else:
        held, documents = _by_spans(len(dataset), target, rng)
        method = f"{documents} contiguous span{'s' if documents > 1 else ''} of rows"
    kept = sorted(set(range(len(dataset))) - set(held))
    info = HoldOut("automatic", len(held), method, documents, len(kept), seed, size)
    return dataset.select(kept), dataset.select(held), info
