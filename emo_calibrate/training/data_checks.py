"""Checks of the tokenizer and the datasets an `EMOTrainer` gets: before tokenization (`check_dataset`,
`check_tokenizer_padding`) and after (`check_training_targets`: every example must hold a target token). Called by
`validation.validate_trainer_inputs` and `validation.validate_prepared_trainer`.
"""

import logging


logger = logging.getLogger(__name__)

__all__ = ["check_dataset", "check_tokenizer_padding", "check_training_targets", "count_targets"]


# Columns SFTTrainer can prepare without a formatting function (besides `dataset_text_field`).
_PREPARABLE_COLUMNS = ("input_ids", "messages", "conversations")


def check_tokenizer_padding(processing_class) -> None:
    """No pad token is fine when there is an eos token: TRL pads with eos (padding is masked out by length, so eos
    targets are still learnt). With neither, padding is impossible."""
    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    if tokenizer is None or getattr(tokenizer, "pad_token", None) is not None:
        return
    if getattr(tokenizer, "eos_token", None) is not None:
        logger.info("The tokenizer has no pad token: padding with its eos token %r, as TRL does.", tokenizer.eos_token)
        return
    raise ValueError(
        "The tokenizer has neither a pad token nor an eos token, so batches cannot be padded. Set one before "
        "creating the trainer, e.g. `tokenizer.pad_token = tokenizer.unk_token`, or use the model's own tokenizer."
    )


def _blank_texts(dataset, column: str) -> int:
    import pyarrow as pa
    import pyarrow.compute as pc

    blank = 0
    for batch in dataset.select_columns([column]).with_format("arrow").iter(batch_size=10_000):
        values = batch[column]
        if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
            raise ValueError(
                f"Column {column!r} holds {values.type}, not text. Point dataset_text_field at a text column."
            )
        empty = pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(values)), 0)
        blank += pc.sum(pc.fill_null(empty, True)).as_py() or 0
    return blank


def check_dataset(dataset, args, name: str = "train_dataset", formatting_func=None) -> None:
    """Check, before tokenization, that SFTTrainer can read `dataset` and that its texts are not empty."""
    if dataset is None:
        return
    if isinstance(dataset, dict):
        for key, part in dataset.items():
            check_dataset(part, args, f"{name}[{key!r}]", formatting_func)
        return
    columns = getattr(dataset, "column_names", None)
    if columns is None or formatting_func is not None or (args.dataset_kwargs or {}).get("skip_prepare_dataset"):
        return  # unknown columns (streamed), or the user formats the rows: nothing to check before preparation
    if hasattr(dataset, "__len__") and len(dataset) == 0:
        raise ValueError(f"{name} is empty. Pass a dataset with at least one example.")
    field = args.dataset_text_field
    if any(c in columns for c in _PREPARABLE_COLUMNS) or {"prompt", "completion"} <= set(columns):
        return
    if field not in columns:
        raise ValueError(
            f"{name} has no {field!r} column (its columns: {columns}). Rename your text column "
            f"(dataset.rename_column('content', {field!r})), set dataset_text_field to it, or give 'messages' or "
            "'prompt' + 'completion' columns."
        )
    if not hasattr(dataset, "select_columns") or not hasattr(dataset, "__len__"):
        return
    blank = _blank_texts(dataset, field)
    if blank == len(dataset):
        raise ValueError(f"Every text in {name}[{field!r}] is empty, so there is nothing to learn. Check the column.")
    if blank:
        logger.warning(
            "%d of %d texts in %s[%r] are empty: they only teach the model to emit eos. Drop them with "
            "dataset.filter(lambda row: row[%r].strip()).", blank, len(dataset), name, field, field,
        )  # fmt: skip


def count_targets(dataset, ignore_index: int = -100) -> tuple[int, int]:
    """Count the target tokens of a tokenized dataset, by batches of rows in Arrow (no Python loop over tokens).

    A target is a label at position >= 1 that is not `ignore_index` (the logits at t predict the label at t + 1); with
    no `labels` column, every token but the first of a row is one, as for SFTTrainer's collator.

    Returns:
        `tuple[int, int]`: the number of rows without any target, and the number of targets.
    """
    import numpy as np
    import pyarrow.compute as pc

    column = "labels" if "labels" in dataset.column_names else "input_ids"
    without, total = 0, 0
    for batch in dataset.select_columns([column]).with_format("arrow").iter(batch_size=1_000):
        lists = batch[column].combine_chunks()
        values = lists.flatten().to_numpy(zero_copy_only=False)
        parents = pc.list_parent_indices(lists).to_numpy(zero_copy_only=False)
        first = np.ones(len(parents), dtype=bool)
        first[1:] = parents[1:] != parents[:-1]
        target = ~first if column == "input_ids" else (values != ignore_index) & ~first
        counts = np.bincount(parents[target], minlength=len(lists))
        without += int((counts == 0).sum())
        total += int(counts.sum())
    return without, total


def check_training_targets(dataset, name: str = "train_dataset", ignore_index: int = -100) -> None:
    """After tokenization: refuse a dataset without a single target token, warn about examples without one."""
    if dataset is None:
        return
    if isinstance(dataset, dict):
        for key, part in dataset.items():
            check_training_targets(part, f"{name}[{key!r}]", ignore_index)
        return
    if not hasattr(dataset, "__len__") or not hasattr(dataset, "select_columns"):
        return  # streamed: cannot be scanned up front
    if len(dataset) == 0:
        raise ValueError(
            f"{name} is empty after tokenization: every example lost all its target tokens (e.g. prompts longer than "
            "max_length, or empty completions). Raise max_length, shorten the prompts, or check the completions."
        )
    if not {"labels", "input_ids"} & set(dataset.column_names):
        return
    without, total = count_targets(dataset, ignore_index)
    if total == 0:
        raise ValueError(
            f"No token of {name} is a training target: every label is masked (-100) or each example is a single "
            "token. Check the completion/assistant masks (completion_only_loss, assistant_only_loss), the texts, and "
            "max_length."
        )
    if without:
        logger.warning(
            "%d of %d examples of %s have no target token and only cost compute.", without, len(dataset), name
        )
