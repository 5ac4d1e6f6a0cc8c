"""Sliding-window scoring of held-out documents: perplexity per token and per word.

Each document is tokenized on its own and cut into windows of at most `window` tokens whose starts are `stride`
tokens apart. Every token is a target at most once, predicted with the context inside its window:

- `stride == window` gives non-overlapping blocks, the `exp(mean eval loss)` of the paper's `run_clm`-style
  evaluation; the first token of each block has no context and is not scored.
- `stride < window` scores every token but the first of the document, each with at least `window - stride` tokens
  of context; it costs about `window / stride` times more forward passes and gives a lower (better) perplexity.

The same pass feeds any number of accumulators (`NLLAccumulator`, `CalibrationAccumulator` from `metrics.py`), so
perplexity and calibration come from one forward pass per window.
"""

import logging
from collections.abc import Sequence
from typing import Protocol

import torch
from tqdm.auto import tqdm

from .metrics import NLLAccumulator, count_words


__all__ = [
    "window_spans",
    "encode_documents",
    "score_documents",
    "score_texts",
    "evaluate_perplexity",
    "TokenAccumulator",
]

logger = logging.getLogger(__name__)


class TokenAccumulator(Protocol):
    def update(self, logits: torch.Tensor, targets: torch.Tensor, doc_index: torch.Tensor) -> None: ...


def window_spans(num_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows over a sequence of `num_tokens` tokens.

    Args:
        num_tokens (`int`): length of the tokenized document.
        window (`int`): most tokens a window holds (the model sees them all).
        stride (`int`): distance between window starts, `1 <= stride <= window`.

    Returns:
        `list[tuple[int, int, int]]`: `(begin, end, first_target)` per window: the window holds tokens
        `[begin, end)` and scores tokens `[first_target, end)`. Scored ranges are disjoint and, for
        `stride < window`, cover `[1, num_tokens)`.
    """
    if window < 2:
        raise ValueError(f"window must hold at least 2 tokens, got {window}.")
    if not 1 <= stride <= window:
        raise ValueError(f"stride must be between 1 and the window ({window}), got {stride}.")
    spans, prev_end = [], 1  # token 0 has no context: never a target
    for begin in range(0, max(num_tokens - 1, 0), stride):
        end = min(begin + window, num_tokens)
        first = max(prev_end, begin + 1)
        if first < end:
            spans.append((begin, end, first))
        prev_end = end
        if end == num_tokens:
            break
    return spans


def encode_documents(tokenizer, documents: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
    """Token ids of each document with the tokenizer's own special tokens (e.g. a Llama BOS) unless turned off."""
    return [tokenizer(doc, add_special_tokens=add_special_tokens)["input_ids"] for doc in documents]


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def score_documents(
    model,
    token_ids: Sequence[Sequence[int]],
    accumulators: Sequence[TokenAccumulator],
    *,
    window: int = 512,
    stride: int = 512,
    batch_size: int = 4,
    pad_token_id: int = 0,
    show_progress: bool = True,
    desc: str = "scoring",
) -> int:
    """Run `model` over sliding windows of every document and feed the scored positions to `accumulators`.

    Args:
        model: a causal LM (`PreTrainedModel` or `PeftModel`) returning `.logits` of shape `(b, T, V)`.
        token_ids: the token ids of each document.
        accumulators: objects with `update(logits (N, V), targets (N,), doc_index (N,))`; `N` counts only the
            scored positions of the batch.
        window, stride: see `window_spans`.
        batch_size: windows per forward pass.
        pad_token_id: id used to right-pad the batch (masked out, so its value does not matter).
        show_progress: show a tqdm bar over batches.

    Returns:
        `int`: the number of scored tokens.
    """
    jobs = [(d, *span) for d, ids in enumerate(token_ids) for span in window_spans(len(ids), window, stride)]
    if not jobs:
        raise ValueError("No token can be scored: every document is shorter than 2 tokens.")
    was_training = model.training
    model.eval()
    device = _model_device(model)
    scored = 0
    batches = range(0, len(jobs), batch_size)
    for start in tqdm(batches, desc=desc, disable=not show_progress, unit="batch"):
        batch = jobs[start : start + batch_size]
        width = max(end - begin for _, begin, end, _ in batch)
        input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        # target_mask[i, t] marks that shifted logits row t (predicting token t + 1 of window i) is scored
        target_mask = torch.zeros((len(batch), width - 1), dtype=torch.bool)
        doc_of_row = torch.zeros(len(batch), dtype=torch.long)
        for i, (doc, begin, end, first) in enumerate(batch):
            input_ids[i, : end - begin] = torch.tensor(token_ids[doc][begin:end])
            attention_mask[i, : end - begin] = 1
            target_mask[i, first - begin - 1 : end - begin - 1] = True
            doc_of_row[i] = doc
        logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
        rows = logits[:, :-1][target_mask.to(device)]  # (N, V)
        targets = input_ids[:, 1:][target_mask].to(device)  # (N,)
        doc_index = doc_of_row.unsqueeze(1).expand_as(target_mask)[target_mask]
        for acc in accumulators:
            acc.update(rows, targets, doc_index)
        scored += targets.numel()
        del logits, rows
    model.train(was_training)
    return scored


def score_texts(
    model,
    tokenizer,
    documents: Sequence[str],
    accumulators: Sequence[TokenAccumulator],
    *,
    window: int = 512,
    stride: int = 512,
    batch_size: int = 4,
    add_special_tokens: bool = True,
    show_progress: bool = True,
    desc: str = "scoring",
) -> int:
    """Tokenize `documents` with `tokenizer` and run `score_documents` on them; returns the scored token count."""
    return score_documents(
        model,
        encode_documents(tokenizer, documents, add_special_tokens),
        accumulators,
        window=window,
        stride=stride,
        batch_size=batch_size,
        pad_token_id=tokenizer.pad_token_id or 0,
        show_progress=show_progress,
        desc=desc,
    )


def evaluate_perplexity(
    model,
    tokenizer,
    documents: Sequence[str],
    *,
    window: int = 512,
    stride: int = 512,
    batch_size: int = 4,
    add_special_tokens: bool = True,
    show_progress: bool = True,
) -> dict:
    """Token and word perplexity of `model` on `documents` (see the module docstring for the windowing).

    Returns:
        `dict` with `token` and `word` perplexity, `nll_sum`, `num_tokens`, `num_words`, document-bootstrap
        spreads `token_std`/`word_std` (plus 95% `*_low`/`*_high`), and `per_document` (`nll`, `tokens`, `words`
        of each document, for paired comparisons).
    """
    acc = NLLAccumulator(len(documents), [count_words(d) for d in documents])
    kwargs = dict(window=window, stride=stride, batch_size=batch_size, add_special_tokens=add_special_tokens)
    score_texts(model, tokenizer, documents, [acc], show_progress=show_progress, desc="perplexity", **kwargs)
    return acc.compute()
