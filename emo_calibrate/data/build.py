"""Build a calibration set: read, segment, filter, split by document, sample, group, and save with a manifest.

Every check on the input runs before anything is written; the set is written to a temporary folder next to the
target and renamed at the end, so an interrupted run leaves no half-written set.
"""

import hashlib
import importlib.metadata
import json
import logging
import os
import random
import shutil
import statistics
import tempfile
from dataclasses import asdict
from pathlib import Path

from .arguments import DataArguments, DataError
from .filters import filter_sentences
from .sampling import group_examples, sample_sentences, split_documents
from .segment import WIKITEXT_MARKERS, detokenize_wikitext, split_sentences
from .sources import Source, read_source


__all__ = ["MANIFEST", "build_calibration_set", "build_from_arguments", "is_calibration_set", "load_calibration_set"]

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1


def build_calibration_set(source: str | None = None, output_dir: str | os.PathLike | None = None, **options) -> Path:
    """Build a calibration set (the paper's ~25k sentences by default) and save it to `output_dir`.

    Args:
        source (`str`, *optional*):
            A local file or folder, `"wikipedia-excerpt"`, or a hub dataset name (default: WikiText-103 raw).
        output_dir (`str` or `os.PathLike`):
            Folder to write: a `datasets.DatasetDict` (splits `train`, `test`; column `text`) and `manifest.json`.
        **options:
            Any other field of `emo_calibrate.data.DataArguments` (`num_sentences=25000`, `seed=0`,
            `test_size=0.05`, `allow_fewer=False`, `block_size=None`, `tokenizer=None`, `overwrite=False`, ...).

    Returns:
        `Path`: the output folder, loadable with `load_calibration_set` or `datasets.load_from_disk`.
    """
    if output_dir is None:
        raise DataError("build_calibration_set needs output_dir (where to write the set).")
    if source is not None:
        options["source"] = source
    return build_from_arguments(DataArguments(output_dir=os.fspath(output_dir), **options))


def build_from_arguments(args: DataArguments) -> Path:
    """`build_calibration_set` for a ready `DataArguments` (what `emo-calibrate data` calls)."""
    out = Path(args.output_dir).expanduser()
    _check_output(out, args)
    tokenizer = _load_tokenizer(args.tokenizer) if args.tokenizer else None
    source = read_source(args)
    detokenize = _wants_detokenize(source, args.wikitext_detokenize)
    sentences = _segment(source, args.language, detokenize)
    sentences, counts = filter_sentences(sentences, args.min_words, args.max_words)
    counts = {
        "documents": len(source.documents),
        "paragraphs": sum(len(d.paragraphs) for d in source.documents),
        **counts,
    }
    if counts["after_near_duplicates"] == 0:
        raise DataError(
            f"--source {args.source}: no sentence is left after the filters ({counts}); check --min_words/--max_words."
        )

    rng = random.Random(args.seed)
    sizes = [len(s) for s in sentences]
    num_test = args.num_test_sentences
    train_docs, test_docs = split_documents(sizes, num_test, rng)
    if num_test and not train_docs:
        raise DataError(
            f"--source {args.source}: holding out {num_test} sentences by document leaves no training document "
            f"({len(test_docs)} document(s) in all, one document = {source.document_by}). Use a smaller --test_size, "
            "--test_size 0, or a finer --document_by."
        )
    available = sum(sizes[d] for d in train_docs)
    if available < args.num_sentences:
        message = (
            f"--source {args.source} gives {available} training sentences after filtering and holding out "
            f"{sum(sizes[d] for d in test_docs)} sentences of {len(test_docs)} documents, fewer than "
            f"--num_sentences {args.num_sentences}."
        )
        if not args.allow_fewer:
            raise DataError(
                f"{message} Lower --num_sentences, add text, or pass --allow_fewer to take all {available}."
            )
        logger.warning("%s Taking all %d (--allow_fewer).", message, available)
    test_picked = sample_sentences(sentences, test_docs, num_test, args.sampling, rng)
    train_picked = sample_sentences(sentences, train_docs, args.num_sentences, args.sampling, rng)

    length = _length_function(tokenizer) if args.block_size and args.block_unit == "tokens" else None
    splits = {
        "train": group_examples(sentences, train_picked, args.block_size, length),
        "test": group_examples(sentences, test_picked, args.block_size, length),
    }
    counts.update(
        train_pool_documents=len(train_docs),
        test_pool_documents=len(test_docs),
        train_pool_sentences=available,
        test_pool_sentences=sum(sizes[d] for d in test_docs),
        unused_sentences=counts["after_near_duplicates"] - available - sum(sizes[d] for d in test_docs),
    )
    manifest = _manifest(
        args, source, detokenize, counts, splits, {"train": train_picked, "test": test_picked}, tokenizer
    )
    manifest["test_documents"] = [source.documents[d].id for d in sorted({d for d, _ in test_picked})]
    _save(out, splits, manifest, args)
    logger.info(
        "Wrote %s: %d train examples (%d sentences), %d test examples (%d sentences)",
        out,
        len(splits["train"]),
        len(train_picked),
        len(splits["test"]),
        len(test_picked),
    )
    return out


def _check_output(out: Path, args: DataArguments) -> None:
    if out.exists() and not out.is_dir():
        raise DataError(f"--output_dir {out} is a file; choose a folder path.")
    if out.exists() and not args.overwrite:
        raise DataError(
            f"--output_dir {out} already exists; pass --overwrite to replace it, or choose another folder."
        )
    source = Path(args.source).expanduser()
    if source.exists() and (out.resolve() == source.resolve() or out.resolve() in source.resolve().parents):
        raise DataError(f"--output_dir {out} contains the source {source}; writing there would replace the source.")


def _load_tokenizer(name: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name)
    except Exception as err:  # noqa: BLE001 - any failure means the same thing to the user
        raise DataError(f"--tokenizer {name}: cannot load it ({type(err).__name__}: {err}).") from None


def _length_function(tokenizer):
    return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _wants_detokenize(source: Source, option: str) -> bool:
    if option != "auto":
        return option == "yes"
    return any(marker in p for d in source.documents for p in d.paragraphs for marker in WIKITEXT_MARKERS)


def _segment(source: Source, language: str, detokenize: bool) -> list[list[str]]:
    from tqdm.auto import tqdm

    sentences = []
    for document in tqdm(source.documents, desc="Segmenting", unit="doc", leave=False):
        paragraphs = [detokenize_wikitext(p) for p in document.paragraphs] if detokenize else document.paragraphs
        sentences.append([s for p in paragraphs for s in split_sentences(p, language)])
    return sentences


def _split_statistics(examples: list[str], picked, tokenizer) -> dict:
    words = [len(e.split()) for e in examples]
    stats = {
        "examples": len(examples),
        "sentences": len(picked),
        "documents": len({d for d, _ in picked}),
        "words": sum(words),
    }
    if tokenizer is not None:
        tokens = [len(ids) for ids in tokenizer(examples, add_special_tokens=False)["input_ids"]] if examples else []
        stats["tokens"] = _summary(tokens)
    return stats


def _summary(values: list[int]) -> dict:
    if not values:
        return {"total": 0}
    ordered = sorted(values)
    return {
        "total": sum(values),
        "mean": round(statistics.fmean(values), 2),
        "min": ordered[0],
        "median": statistics.median_low(ordered),
        "p95": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))],
        "max": ordered[-1],
    }


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _manifest(args, source, detokenize, counts, splits, picked, tokenizer) -> dict:
    options = {k: v for k, v in asdict(args).items() if k not in ("output_dir", "overwrite", "source")}
    return {
        "manifest_version": MANIFEST_VERSION,
        "source": {"name": args.source, **source.info},
        "document_by": source.document_by,
        "seed": args.seed,
        "options": options,
        "segmenter": {"name": "sentencex", "version": _version("sentencex"), "language": args.language},
        "wikitext_detokenized": detokenize,
        "counts": counts,
        "splits": {name: _split_statistics(splits[name], picked[name], tokenizer) for name in splits},
        "tokenizer": None if tokenizer is None else {"name": args.tokenizer, "class": type(tokenizer).__name__},
        "versions": {p: _version(p) for p in ("emo_calibrate", "datasets")},
        "text_sha256": {name: hashlib.sha256("\n".join(splits[name]).encode()).hexdigest() for name in splits},
    }


def _save(out: Path, splits: dict[str, list[str]], manifest: dict, args: DataArguments) -> None:
    from datasets import Dataset, DatasetDict, Features, Value

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    tmp.chmod(0o755)
    try:
        features = Features({"text": Value("string")})  # explicit, so an empty test split still has its column
        dataset = DatasetDict({name: Dataset.from_dict({"text": t}, features=features) for name, t in splits.items()})
        # One shard per split (a set is a few MB): an empty split then still saves a loadable file.
        dataset.save_to_disk(str(tmp), num_shards={name: 1 for name in splits})
        if args.jsonl:
            for name, texts in splits.items():
                with open(tmp / f"{name}.jsonl", "w", encoding="utf-8") as f:
                    f.writelines(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        if out.exists():  # --overwrite: move the old set aside first, so a failure never loses both
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def is_calibration_set(path: str | os.PathLike) -> bool:
    """True if `path` is a folder written by `build_calibration_set` (a saved DatasetDict with a manifest)."""
    path = Path(path)
    return (path / "dataset_dict.json").is_file() and (path / MANIFEST).is_file()


def load_calibration_set(path: str | os.PathLike):
    """Load a calibration set written by `build_calibration_set` (or `emo-calibrate data`) as a `DatasetDict`.

    The result has splits `train` and `test` with one column, `text`: pass `dataset["train"]` to `SFTTrainer`.
    """
    from datasets import load_from_disk

    path = Path(path).expanduser()
    if not (path / "dataset_dict.json").is_file():
        raise DataError(
            f"{path} is not a calibration set (no dataset_dict.json in it). Build one with "
            f"`emo-calibrate data --source SOURCE --output_dir {path}`."
        )
    dataset = load_from_disk(str(path))
    if "train" not in dataset or "text" not in dataset["train"].column_names:
        raise DataError(f"{path} has no `train` split with a `text` column; rebuild it with `emo-calibrate data`.")
    return dataset
