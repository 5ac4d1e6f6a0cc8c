"""Held-out text for evaluation: load documents from files, folders or a saved calibration set, and bound their size.

Sources (`load_eval_documents`):
- a saved `datasets` folder (`save_to_disk`): a `DatasetDict` uses its `split` (default `test`, the held-out split
  that `emo-calibrate data` writes), a `Dataset` is used whole; one row of `text_field` = one document;
- a `.txt` file: the whole file is one document (paragraphs are its lines);
- a `.jsonl` file: one document per line, read from `text_field`;
- a `.csv` / `.parquet` file: one document per row (`text_field`);
- a folder of such files: all of them, in sorted file order.

Rows shorter than `min_document_words` (e.g. the one-sentence rows of a calibration set) are joined with their
neighbours into pseudo-documents, so perplexity windows get real context and generation prompts can be cut.
"""

import json
import logging
import os
import re
from collections.abc import Sequence


__all__ = ["load_eval_documents", "pack_short_documents", "truncate_words"]

logger = logging.getLogger(__name__)

_FILE_TYPES = (".txt", ".jsonl", ".csv", ".parquet")


def _read_utf8(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as err:
        with open(path, "rb") as f:
            line = f.read()[: err.start].count(b"\n") + 1
        raise ValueError(f"{path}: not valid UTF-8 (line {line}). Re-encode the file as UTF-8.") from err


def _column(rows, text_field: str, where: str) -> list[str]:
    if text_field not in rows.column_names:
        raise ValueError(
            f"{where} has no column {text_field!r} (columns: {rows.column_names}). Pass --text_field with the "
            "name of the column that holds the text."
        )
    return [t for t in rows[text_field] if isinstance(t, str)]


def _load_file(path: str, text_field: str) -> list[str]:
    if path.endswith(".txt"):
        return [_read_utf8(path)]
    if path.endswith(".jsonl"):
        docs = []
        for n, line in enumerate(_read_utf8(path).splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}, line {n}: not valid JSON ({err.msg}).") from err
            if not isinstance(row, dict) or not isinstance(row.get(text_field), str):
                raise ValueError(f"{path}, line {n}: no string field {text_field!r}. Pass --text_field.")
            docs.append(row[text_field])
        return docs
    from datasets import load_dataset

    builder = "csv" if path.endswith(".csv") else "parquet"
    return _column(load_dataset(builder, data_files=path, split="train"), text_field, path)


def load_eval_documents(source: str, *, split: str = "test", text_field: str = "text") -> list[str]:
    """Read the held-out documents of `source` (see the module docstring for the accepted sources).

    Returns:
        `list[str]`: non-blank documents, in source order.

    Raises:
        `ValueError`/`FileNotFoundError` naming the source and the fix, when it is missing, empty, has no such
        split or column, or is not UTF-8.
    """
    if not os.path.exists(source):
        raise FileNotFoundError(
            f"Evaluation text {source!r} does not exist. Pass a file, a folder or a saved dataset."
        )
    if os.path.isdir(source) and (
        os.path.exists(os.path.join(source, "dataset_dict.json")) or os.path.exists(os.path.join(source, "state.json"))
    ):
        from datasets import DatasetDict, load_from_disk

        data = load_from_disk(source)
        if isinstance(data, DatasetDict):
            if split not in data:
                raise ValueError(f"{source} has no split {split!r} (splits: {list(data)}). Pass --split.")
            data = data[split]
        docs = _column(data, text_field, f"{source} [{split}]")
    elif os.path.isdir(source):
        files = sorted(
            os.path.join(root, name)
            for root, _, names in os.walk(source)
            for name in names
            if name.endswith(_FILE_TYPES)
        )
        if not files:
            raise ValueError(f"Folder {source} holds no {'/'.join(_FILE_TYPES)} files and is not a saved dataset.")
        docs = [doc for path in files for doc in _load_file(path, text_field)]
    elif source.endswith(_FILE_TYPES):
        docs = _load_file(source, text_field)
    else:
        raise ValueError(f"Unsupported evaluation text {source!r}: use a {'/'.join(_FILE_TYPES)} file or a folder.")
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise ValueError(f"Evaluation text {source!r} is empty.")
    return docs


def pack_short_documents(documents: Sequence[str], min_words: int) -> list[str]:
    """Join consecutive documents (with a space) until each has at least `min_words` words; `min_words <= 0` is a no-op.

    A trailing remainder shorter than `min_words` is appended to the previous pseudo-document.
    """
    if min_words <= 0:
        return list(documents)
    packed, current, words = [], [], 0
    for doc in documents:
        current.append(doc.strip())
        words += len(doc.split())
        if words >= min_words:
            packed.append(" ".join(current))
            current, words = [], 0
    if current:
        if packed:
            packed[-1] = packed[-1] + " " + " ".join(current)
        else:
            packed.append(" ".join(current))
    return packed


def truncate_words(documents: Sequence[str], max_words: int | None) -> list[str]:
    """Keep whole documents in order until `max_words` whitespace words; cut the last one at a word boundary.

    The original spacing and newlines of the kept text are preserved, so word counts stay exact.
    """
    if max_words is None or max_words <= 0:
        return list(documents)
    kept, budget = [], max_words
    for doc in documents:
        n = len(doc.split())
        if n <= budget:
            kept.append(doc)
            budget -= n
        else:
            if budget > 0:
                ends = [m.end() for m in re.finditer(r"\S+", doc)]
                kept.append(doc[: ends[budget - 1]])
            break
        if budget == 0:
            break
    return kept
