"""Held-out split by document, deterministic sampling of sentences, and grouping into training examples.

Everything draws from one `random.Random(seed)` in a fixed order, so the same source and seed give the same set.
A sentence is addressed as `(document index, sentence index)`.
"""

import bisect
import random
from collections.abc import Callable, Sequence
from typing import Literal


__all__ = ["group_examples", "sample_sentences", "split_documents"]

Selection = list[tuple[int, int]]


def split_documents(sizes: Sequence[int], num_test: int, rng: random.Random) -> tuple[list[int], list[int]]:
    """Choose held-out documents: whole documents, in random order, until they hold at least `num_test` sentences.

    Args:
        sizes (`Sequence[int]`): number of sentences of each document (documents with none are left out of both).
        num_test (`int`): sentences wanted in the held-out split (0: no held-out document).
        rng (`random.Random`): the source of randomness.

    Returns:
        `(train, test)`: sorted document indices; they never overlap.
    """
    order = [i for i in range(len(sizes)) if sizes[i] > 0]
    rng.shuffle(order)
    test, held = [], 0
    for index in order:
        if held >= num_test:
            break
        test.append(index)
        held += sizes[index]
    train = sorted(set(order) - set(test))
    return train, sorted(test)


def sample_sentences(
    documents: Sequence[Sequence[str]],
    chosen: Sequence[int],
    n: int,
    mode: Literal["sentences", "documents"],
    rng: random.Random,
) -> Selection:
    """Pick `n` sentences (or all, if fewer) from the documents `chosen`.

    `sentences` draws uniformly without replacement and returns them in document order; `documents` takes whole
    documents in random order (the last one cut to fit), keeping each document's sentences contiguous.
    """
    if mode == "documents":
        order = list(chosen)
        rng.shuffle(order)
        picked: Selection = []
        for doc in order:
            if len(picked) >= n:
                break
            picked += [(doc, j) for j in range(min(len(documents[doc]), n - len(picked)))]
        return picked
    # Flat numbering of the pool; rng.sample over a range never builds the pool itself.
    offsets, total = [], 0
    for doc in chosen:
        offsets.append(total)
        total += len(documents[doc])
    flat = range(total) if total <= n else sorted(rng.sample(range(total), n))
    picked = []
    for k in flat:
        slot = bisect.bisect_right(offsets, k) - 1
        picked.append((chosen[slot], k - offsets[slot]))
    return picked


def group_examples(
    documents: Sequence[Sequence[str]],
    picked: Selection,
    block_size: int | None = None,
    length: Callable[[str], int] | None = None,
) -> list[str]:
    """Turn picked sentences into example texts.

    Without `block_size`, each sentence is one example. With it, consecutive picked sentences of the same document
    are joined (by a space) while the example's `length` stays within `block_size`; a sentence longer than the block
    is an example of its own (never cut). Sentences of different documents are never joined. A sentence is measured
    as it appears in the example: alone when it opens one, with the joining space in front otherwise (a tokenizer
    may split "Endangered" into two tokens but " Endangered" into one).
    """
    if block_size is None:
        return [documents[d][j] for d, j in picked]
    length = length or (lambda s: len(s.split()))
    examples: list[str] = []
    current: list[str] = []
    used, current_doc = 0, None
    for d, j in picked:
        sentence = documents[d][j]
        if current and (d != current_doc or used + length(" " + sentence) > block_size):
            examples.append(" ".join(current))
            current, used = [], 0
        used += length(" " + sentence) if current else length(sentence)
        current.append(sentence)
        current_doc = d
    if current:
        examples.append(" ".join(current))
    return examples
