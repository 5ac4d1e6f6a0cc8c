"""Perplexity-based scoring of candidate labels after a shared few-shot prompt.

Each item has one prompt (demonstrations + the test text up to `{label}`) and several candidate continuations (each
label word and what follows it in the template). The score of a candidate is the summed log-probability of its
tokens given the prompt; dividing by its token count gives the length-normalised score.

Tokenisation at the boundary: a label after `It is` normally carries its leading space (`Ġpositive`, one token, not
`Ġ` + `positive`). So trailing spaces of the prompt move into the continuation, the prompt is tokenized alone, and a
candidate's tokens are those that follow the prompt's tokens in the tokenization of prompt + continuation. When
that joint tokenization does not start with the prompt's tokens (a merge across the boundary), the continuation is
tokenized on its own instead, and the item counts one `boundary_fallbacks`.

Speed: the prompt is shared by all candidates, so it runs once per item: a batch of left-padded prompts gives the
first candidate token's log-probabilities (only the last position's logits are computed) and a KV cache; the rest of
every candidate then runs on that cache, all candidates of the batch together. This matches a full forward of each
prompt + candidate (tests/evaluation/test_icl.py checks both against each other).
"""

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm


__all__ = ["EncodedItem", "build_context", "encode_item", "max_sequence_length", "score_items"]


@dataclass
class EncodedItem:
    """Token ids of one item: its shared prompt and each candidate continuation.

    Attributes:
        context (`list[int]`): the prompt, special tokens (e.g. BOS) included.
        candidates (`list[list[int]]`): the tokens of each candidate, in candidate order; each holds at least one.
        num_shots (`int`): demonstrations kept in the prompt (fewer than asked when it had to fit the model).
        boundary_fallbacks (`int`): candidates tokenized on their own (see the module docstring).
        truncated (`bool`): the prompt lost its first tokens to fit even without demonstrations.
    """

    context: list[int]
    candidates: list[list[int]]
    num_shots: int
    boundary_fallbacks: int = 0
    truncated: bool = False


def build_context(demonstrations: Sequence[str], head: str, separator: str = "\n") -> str:
    """The prompt text: the filled demonstrations, one per line (as OpenICL), then the test item's template head."""
    return "".join(d + separator for d in demonstrations) + head


def _split_trailing_spaces(context: str) -> tuple[str, str]:
    stripped = context.rstrip(" \t")
    return stripped, context[len(stripped) :]


def encode_item(
    tokenizer,
    demonstrations: Sequence[str],
    head: str,
    continuations: Sequence[str],
    *,
    add_special_tokens: bool = True,
    max_length: int | None = None,
) -> EncodedItem:
    """Tokenize one item's prompt and candidate continuations (see the module docstring for the boundary).

    Args:
        tokenizer: the model's tokenizer.
        demonstrations (`Sequence[str]`): filled demonstrations, most relevant first.
        head (`str`): the test item's template up to `{label}`.
        continuations (`Sequence[str]`): each candidate label followed by the template's tail.
        add_special_tokens (`bool`, *optional*, defaults to `True`): let the tokenizer add BOS etc. to the prompt.
        max_length (`int`, *optional*): most tokens prompt + candidate may hold; demonstrations are dropped from the
            least relevant end until it fits, then the prompt's first tokens (after a BOS) if it must.
    """
    demonstrations = list(demonstrations)
    while True:
        context, spaces = _split_trailing_spaces(build_context(demonstrations, head))
        context_ids = tokenizer(context, add_special_tokens=add_special_tokens)["input_ids"]
        candidates, fallbacks = [], 0
        for continuation in continuations:
            joint = tokenizer(context + spaces + continuation, add_special_tokens=add_special_tokens)["input_ids"]
            tail = joint[len(context_ids) :]
            if joint[: len(context_ids)] != context_ids or not tail:
                tail = tokenizer(spaces + continuation, add_special_tokens=False)["input_ids"]
                fallbacks += 1
            if not tail:
                raise ValueError(f"The candidate {continuation!r} tokenizes to nothing.")
            candidates.append(tail)
        longest = max(len(c) for c in candidates)
        if max_length is None or len(context_ids) + longest <= max_length or not demonstrations:
            break
        demonstrations.pop()
    truncated = False
    if max_length is not None and len(context_ids) + longest > max_length:
        keep = max_length - longest
        if keep < 2:
            raise ValueError(f"A candidate of {longest} tokens leaves no room for a prompt in {max_length} tokens.")
        bos = context_ids[:1] if context_ids[:1] == [tokenizer.bos_token_id] else []
        context_ids = bos + context_ids[len(context_ids) - keep + len(bos) :]
        truncated = True
    return EncodedItem(context_ids, candidates, len(demonstrations), fallbacks, truncated)


def max_sequence_length(model, tokenizer) -> int | None:
    """The longest input the model takes: its position limit, or the tokenizer's when that is smaller and real."""
    limits = [getattr(model.config, "max_position_embeddings", None)]
    if getattr(tokenizer, "model_max_length", None) and tokenizer.model_max_length < 1_000_000:
        limits.append(tokenizer.model_max_length)
    limits = [x for x in limits if x]
    return min(limits) if limits else None


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def _score_batch(model, items: list[EncodedItem], pad_id: int, max_rows: int) -> list[list[float]]:
    device = _device(model)
    width = max(len(it.context) for it in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for b, it in enumerate(items):
        ids[b, width - len(it.context) :] = torch.tensor(it.context)
        mask[b, width - len(it.context) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # (B, V): predicts each candidate's first token
    scores = [[first[b, cand[0]].item() for cand in it.candidates] for b, it in enumerate(items)]
    # Candidates of two or more tokens: run their tokens but the last on the prompt cache, all rows together.
    rows = [(b, c) for b, it in enumerate(items) for c, cand in enumerate(it.candidates) if len(cand) > 1]
    chunks = [rows[i : i + max_rows] for i in range(0, len(rows), max_rows)]
    lengths = mask.sum(-1)
    for chunk in chunks:
        cache = out.cache if len(chunks) == 1 else copy.deepcopy(out.cache)
        item_of_row = torch.tensor([b for b, _ in chunk], device=device)
        cache.batch_select_indices(item_of_row)  # (rows, ...): each row's copy of its item's prompt cache
        cands = [items[b].candidates[c] for b, c in chunk]
        steps = max(len(cand) for cand in cands) - 1
        inp = torch.full((len(chunk), steps), pad_id, dtype=torch.long)
        tgt = torch.zeros((len(chunk), steps), dtype=torch.long)
        cand_mask = torch.zeros((len(chunk), steps), dtype=torch.long)
        for r, cand in enumerate(cands):
            inp[r, : len(cand) - 1] = torch.tensor(cand[:-1])
            tgt[r, : len(cand) - 1] = torch.tensor(cand[1:])
            cand_mask[r, : len(cand) - 1] = 1
        inp, tgt, cand_mask = inp.to(device), tgt.to(device), cand_mask.to(device)
        full_mask = torch.cat([mask[item_of_row], cand_mask], dim=1)
        pos = lengths[item_of_row, None] + torch.arange(steps, device=device)
        logits = model(input_ids=inp, attention_mask=full_mask, position_ids=pos, cache=cache, use_cache=True).logits
        logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
        rest = (logp * cand_mask).sum(-1).tolist()
        for (b, c), value in zip(chunk, rest):
            scores[b][c] += value
    return scores


def score_items(
    model,
    items: Sequence[EncodedItem],
    *,
    pad_token_id: int,
    batch_size: int = 8,
    max_rows: int = 64,
    show_progress: bool = True,
    desc: str = "icl",
) -> list[list[float]]:
    """Summed log-probability (nats) of every candidate of every item, in item and candidate order.

    Args:
        model: a causal LM in eval mode (plain or PEFT-wrapped) that accepts `position_ids`, `cache` and
            `logits_to_keep`.
        items (`Sequence[EncodedItem]`): from `encode_item`.
        pad_token_id (`int`): id used for padding (masked out).
        batch_size (`int`, *optional*, defaults to `8`): prompts per forward pass (items of similar length are
            batched together).
        max_rows (`int`, *optional*, defaults to `64`): candidate rows per forward pass on the prompt cache.
        show_progress (`bool`, *optional*, defaults to `True`): a progress bar over items.
    """
    order = sorted(range(len(items)), key=lambda i: -len(items[i].context))
    scores: list[list[float] | None] = [None] * len(items)
    with tqdm(total=len(items), desc=desc, unit="item", disable=not show_progress) as bar:
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            for i, s in zip(batch, _score_batch(model, [items[i] for i in batch], pad_token_id, max_rows)):
                scores[i] = s
            bar.update(len(batch))
    return scores
