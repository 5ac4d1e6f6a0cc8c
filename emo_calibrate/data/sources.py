"""Read a text source into documents of paragraphs, checking every input before any long work.

Source kinds: a local `.txt` (blank-line-separated paragraphs), `.jsonl`, `.csv` or `.parquet` file or a folder of
them; the offline Wikipedia excerpt (`wikipedia-excerpt`); or a Hugging Face hub dataset. WikiText heading lines are
turned into paragraph breaks here (a level-1 heading also opens a new document when documents are split by heading).
"""

import codecs
import csv
import hashlib
import io
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .arguments import DEFAULT_HUB_DATASET, WIKIPEDIA_EXCERPT, DataArguments, DataError
from .segment import heading_title


__all__ = ["SUFFIXES", "Document", "Source", "read_source"]

logger = logging.getLogger(__name__)

SUFFIXES = (".txt", ".jsonl", ".csv", ".parquet")


@dataclass
class Document:
    id: str
    paragraphs: list[str] = field(default_factory=list)


@dataclass
class Source:
    documents: list[Document]
    info: dict  # what the manifest records about the source
    document_by: str  # the grouping actually used


@dataclass
class _Record:
    """One unit of a source: a .txt file, or one table row; `group` is its --document_column value."""

    file: str
    index: int
    text: str
    group: str | None = None


def read_source(args: DataArguments) -> Source:
    """Read `args.source` into documents, raising `DataError` (naming the input and the fix) on bad input."""
    if args.source == WIKIPEDIA_EXCERPT:
        return _read_wikipedia_excerpt(args)
    path = Path(args.source).expanduser()
    if path.exists():
        records, info, tabular = _read_local(path, args)
    elif _looks_like_path(args.source):
        raise DataError(f"--source {args.source}: no such file or folder.")
    else:
        records, info = _read_hub(args)
        tabular = True
    mode = _choose_grouping(records, args, tabular)
    documents = _group(records, mode)
    documents = [d for d in documents if d.paragraphs]
    if not documents:
        raise DataError(f"--source {args.source}: no text found (every file, row or paragraph is empty).")
    logger.info("Read %d documents from %s (one document = %s)", len(documents), args.source, mode)
    return Source(documents=documents, info=info, document_by=mode)


def _looks_like_path(source: str) -> bool:
    return (
        source.startswith((".", "/", "~"))
        or "\\" in source
        or source.lower().endswith(SUFFIXES)
        or source.count("/") > 1
    )


def _read_wikipedia_excerpt(args: DataArguments) -> Source:
    from emo_calibrate.demo.assets import GENSIM, sha256_file, wikipedia_articles, wikipedia_excerpt_path

    path = wikipedia_excerpt_path()
    articles = wikipedia_articles(path)
    documents = [Document(a["title"], a["text"].split("\n")) for a in articles]
    info = {
        "kind": WIKIPEDIA_EXCERPT,
        "package": GENSIM.requirement,
        "member": GENSIM.member,
        "sha256": sha256_file(path),
        "articles": len(articles),
        "licence": "CC BY-SA 3.0 / GFDL (English Wikipedia)",
    }
    return Source(documents=documents, info=info, document_by="article")


# ----------------------------------------------------------------------------------------------- local files


def _list_files(path: Path) -> list[Path]:
    if path.is_file():
        if path.suffix.lower() not in SUFFIXES:
            raise DataError(
                f"{path}: unsupported file type {path.suffix!r}; use {', '.join(SUFFIXES)} (or a folder of them)."
            )
        return [path]
    files = sorted(
        p
        for p in path.rglob("*")
        if p.is_file()
        and p.suffix.lower() in SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    if not files:
        raise DataError(f"{path}: the folder holds no {', '.join(SUFFIXES)} file.")
    return files


def _read_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    if not data.strip():
        raise DataError(f"{path} is empty: give a file with text, or remove it from the folder.")
    return data


def _decode(path: Path, data: bytes) -> str:
    body = data[len(codecs.BOM_UTF8) :] if data.startswith(codecs.BOM_UTF8) else data
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as err:
        line = body[: err.start].count(b"\n") + 1
        raise DataError(
            f"{path}: line {line} is not valid UTF-8 (byte 0x{body[err.start]:02x}). Convert the file to UTF-8 first, "
            f"e.g. `iconv -f latin1 -t utf-8 {path.name} > {path.stem}.utf8{path.suffix}` if it is Latin-1."
        ) from None


def _read_local(path: Path, args: DataArguments) -> tuple[list[_Record], dict, bool]:
    files = _list_files(path)
    root = path if path.is_dir() else path.parent
    records: list[_Record] = []
    file_info = []
    for file in files:
        data = _read_bytes(file)
        name = str(file.relative_to(root))
        suffix = file.suffix.lower()
        if suffix == ".txt":
            new = [_Record(name, 0, _decode(file, data))]
        elif suffix == ".jsonl":
            new = _jsonl_records(file, name, _decode(file, data), args)
        elif suffix == ".csv":
            new = _csv_records(file, name, _decode(file, data), args)
        else:
            new = _parquet_records(file, name, data, args)
        if not any(r.text.strip() for r in new):
            raise DataError(f"{file} has no text" + (f" in column {args.text_column!r}." if suffix != ".txt" else "."))
        records += new
        file_info.append({"path": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    listing = "".join(f"{f['sha256']}  {f['path']}\n" for f in file_info)
    info = {
        "kind": "local",
        "path": str(path.resolve()),
        "sha256": hashlib.sha256(listing.encode()).hexdigest() if path.is_dir() else file_info[0]["sha256"],
        "files": file_info,
    }
    tabular = any(f.suffix.lower() != ".txt" for f in files)
    if tabular:
        info["text_column"] = args.text_column
    if args.document_column and not tabular:
        raise DataError(
            f"--document_column {args.document_column} needs a .jsonl, .csv or .parquet source; {path} holds .txt files."
        )
    return records, info, tabular


def _text_value(value, where: str, column: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(
            f"{where}: {column!r} is a {type(value).__name__}, not a string. Choose the text column with --text_column."
        )
    return value


def _missing_column(where: str, column: str, available, option: str = "--text_column") -> DataError:
    return DataError(
        f"{where} has no column {column!r} (it has: {', '.join(map(str, available))}). Choose it with {option}."
    )


def _jsonl_records(file: Path, name: str, text: str, args: DataArguments) -> list[_Record]:
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{file}: line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(
                f"{where} is not valid JSON ({err.msg}); a .jsonl file has one JSON object per line."
            ) from None
        if not isinstance(row, dict):
            raise DataError(
                f"{where} is a JSON {type(row).__name__}, not an object with a {args.text_column!r} field."
            )
        records.append(_row_record(row, where, name, number, args))
    return records


def _csv_records(file: Path, name: str, text: str, args: DataArguments) -> list[_Record]:
    csv.field_size_limit(max(csv.field_size_limit(), min(sys.maxsize, 2**31 - 1)))  # long paragraphs in one cell
    reader = csv.DictReader(io.StringIO(text, newline=""))
    records = []
    try:
        for row in reader:
            records.append(_row_record(row, f"{file}: line {reader.line_num}", name, reader.line_num, args))
    except csv.Error as err:
        raise DataError(f"{file}: line {reader.line_num} is not valid CSV ({err}).") from None
    return records


def _row_record(row: dict, where: str, name: str, index: int, args: DataArguments) -> _Record:
    for column, option in ((args.text_column, "--text_column"), (args.document_column, "--document_column")):
        if column and column not in row:
            raise _missing_column(where, column, row.keys(), option)
    group = str(row[args.document_column]) if args.document_column else None
    return _Record(name, index, _text_value(row[args.text_column], where, args.text_column), group)


def _parquet_records(file: Path, name: str, data: bytes, args: DataArguments) -> list[_Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{file} is not a readable Parquet file ({err}).") from None
    for column, option in ((args.text_column, "--text_column"), (args.document_column, "--document_column")):
        if column and column not in table.column_names:
            raise _missing_column(str(file), column, table.column_names, option)
    if not (
        pa.types.is_string(table.schema.field(args.text_column).type)
        or pa.types.is_large_string(table.schema.field(args.text_column).type)
    ):
        raise DataError(
            f"{file}: column {args.text_column!r} holds {table.schema.field(args.text_column).type}, not text. Choose it with --text_column."
        )
    texts = table.column(args.text_column).to_pylist()
    groups = table.column(args.document_column).to_pylist() if args.document_column else [None] * len(texts)
    return [
        _Record(name, i, t or "", None if g is None and not args.document_column else str(g))
        for i, (t, g) in enumerate(zip(texts, groups))
    ]


# ----------------------------------------------------------------------------------------------- hub datasets


def _read_hub(args: DataArguments) -> tuple[list[_Record], dict]:
    import datasets

    config = args.source_config
    if config is None and args.source in (DEFAULT_HUB_DATASET[0], "wikitext"):
        config = DEFAULT_HUB_DATASET[1]
    label = "/".join(x for x in (args.source, config, args.source_split) if x)
    logger.info("Loading the hub dataset %s", label)
    try:
        ds = datasets.load_dataset(args.source, config, split=args.source_split, revision=args.source_revision)
    except Exception as err:  # noqa: BLE001 - offline, unknown name, bad config: all end the same way for the user
        raise DataError(
            f"--source {args.source}: not a local file or folder, and loading it as a Hugging Face dataset "
            f"({label}) failed: {type(err).__name__}: {err}\nWithout hub access, use a local corpus "
            f"(--source path/to/file_or_folder) or the offline Wikipedia excerpt (--source {WIKIPEDIA_EXCERPT})."
        ) from None
    for column, option in ((args.text_column, "--text_column"), (args.document_column, "--document_column")):
        if column and column not in ds.column_names:
            raise _missing_column(f"The hub dataset {label}", column, ds.column_names, option)
    texts = ds[args.text_column]
    groups = ds[args.document_column] if args.document_column else [None] * len(texts)
    records = [
        _Record(label, i, _text_value(t, f"{label} row {i}", args.text_column), None if g is None else str(g))
        for i, (t, g) in enumerate(zip(texts, groups))
    ]
    info = {
        "kind": "hub",
        "name": args.source,
        "config": config,
        "split": args.source_split,
        "revision": args.source_revision,
        "resolved_revision": _hub_revision(args.source, args.source_revision),
        "fingerprint": getattr(ds, "_fingerprint", None),
        "text_column": args.text_column,
        "rows": len(ds),
    }
    return records, info


def _hub_revision(name: str, revision: str | None) -> str | None:
    """The commit sha of a hub dataset, when the hub answers (None offline)."""
    try:
        from huggingface_hub import HfApi

        return HfApi().dataset_info(name, revision=revision).sha
    except Exception:  # noqa: BLE001 - only informative for the manifest
        return None


# ----------------------------------------------------------------------------------------------- documents


def _choose_grouping(records: list[_Record], args: DataArguments, tabular: bool) -> str:
    if args.document_by != "auto":
        return args.document_by
    if args.document_column:
        return "column"
    for record in records:
        if any((h := heading_title(line)) is not None and h[0] == 1 for line in record.text.splitlines()):
            return "heading"
    if not tabular and len({r.file for r in records}) > 1:
        return "file"
    return "row"


def _paragraphs(text: str):
    """Yield paragraphs of `text` (blank-line separated; heading lines break paragraphs) and `(1, title)` headings."""
    current: list[str] = []
    for line in text.splitlines():
        heading = heading_title(line)
        if heading is not None or not line.strip():
            if current:
                yield " ".join(current)
                current = []
            if heading is not None and heading[0] == 1:
                yield heading
            continue
        current.append(line.strip())
    if current:
        yield " ".join(current)


def _group(records: list[_Record], mode: str) -> list[Document]:
    documents: list[Document] = []
    by_key: dict[str, Document] = {}
    seen_ids: dict[str, int] = {}

    def new_document(doc_id: str) -> Document:
        seen_ids[doc_id] = seen_ids.get(doc_id, 0) + 1
        document = Document(doc_id if seen_ids[doc_id] == 1 else f"{doc_id} #{seen_ids[doc_id]}")
        documents.append(document)
        return document

    current, current_file, paragraph_count = None, None, 0
    for record in records:
        if mode == "column":
            current = by_key.get(record.group) or by_key.setdefault(record.group, new_document(record.group))
        elif mode == "row" or record.file != current_file:
            # A new file starts a new document; under `heading`, text before its first heading is one of its own.
            current = new_document(record.file) if mode == "file" else None
        current_file = record.file
        for part in _paragraphs(record.text):
            if isinstance(part, tuple):
                if mode == "heading":
                    current = new_document(part[1])
                continue
            if current is None:
                paragraph_count += 1
                row_id = f"paragraph {paragraph_count}" if record.file.endswith(".txt") else f"row {record.index}"
                current = new_document(f"{record.file}:{row_id}" if mode == "row" else record.file)
            current.paragraphs.append(part)
            if mode == "row" and record.file.endswith(".txt"):
                current = None  # each .txt paragraph is a document of its own
    return documents
