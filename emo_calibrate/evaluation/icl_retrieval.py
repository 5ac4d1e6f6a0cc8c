"""Test items and demonstrations for in-context learning, chosen once per task and shared by every model.

- `split_test_and_pool`: a seeded sample of test items; every other item is the demonstration pool, so the two are
  disjoint by construction.
- `retrieve_demonstrations`: for each test item, `k` pool items, either the most similar ones (`topk`, the paper's
  OpenICL TopkRetriever, most similar first) or a seeded random draw (`random`).

Similarity is the cosine of TF-IDF vectors (scikit-learn) fitted on the pool: it works offline, needs no model, and
does not depend on the model under test, so every compared model sees exactly the same prompts. (OpenICL embeds with
a sentence-transformers model instead, which would need a hub download.) A pool item whose text equals the test
item's is never a demonstration of it, even when a user's file repeats a text.
"""

import random
from collections.abc import Sequence

import numpy as np


__all__ = ["RETRIEVERS", "split_test_and_pool", "retrieve_demonstrations", "tfidf_similarity"]

RETRIEVERS = ("topk", "random")


def split_test_and_pool(num_items: int, max_test: int, seed: int = 0) -> tuple[list[int], list[int]]:
    """A seeded sample of at most `max_test` test items, never more than half the items; the rest is the pool.

    Returns:
        `(test, pool)`: sorted, disjoint lists of item indices that together cover `range(num_items)`.
    """
    if num_items < 2:
        raise ValueError(f"An ICL task needs at least 2 items (test + demonstrations), got {num_items}.")
    order = list(range(num_items))
    random.Random(seed).shuffle(order)
    num_test = max(1, min(max_test, num_items // 2))
    return sorted(order[:num_test]), sorted(order[num_test:])


def tfidf_similarity(queries: Sequence[str], pool: Sequence[str]) -> np.ndarray:
    """Cosine similarity of TF-IDF vectors (unigrams and bigrams, sublinear tf) fitted on `pool`.

    Returns:
        `np.ndarray` of shape `(len(queries), len(pool))`, values in [0, 1] (0 for a query with no pool word).
    """
    from sklearn.feature_extraction.text import TfidfVectorizer

    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
    pool_vectors = vectorizer.fit_transform(pool)  # rows are L2-normalised: the dot product is the cosine
    return (vectorizer.transform(queries) @ pool_vectors.T).toarray()


def retrieve_demonstrations(
    test_texts: Sequence[str], pool_texts: Sequence[str], k: int, method: str = "topk", seed: int = 0
) -> list[list[int]]:
    """`k` demonstrations from the pool for each test text.

    Args:
        test_texts (`Sequence[str]`): the test items.
        pool_texts (`Sequence[str]`): the demonstration pool.
        k (`int`): demonstrations per item (fewer when the pool is smaller).
        method (`str`, *optional*, defaults to `"topk"`): `topk` (most similar first; ties in a seeded random order)
            or `random` (a seeded draw per item, independent of the other items).
        seed (`int`, *optional*, defaults to `0`): seed of the random draw and of the tie-breaking.

    Returns:
        `list[list[int]]`: positions in `pool_texts`, one list per test item; never a pool item with the same text.
    """
    if method not in RETRIEVERS:
        raise ValueError(f"Unknown retriever {method!r}: choose from {list(RETRIEVERS)}.")
    if k < 0:
        raise ValueError(f"The number of demonstrations must be >= 0, got {k}.")
    positions_of: dict[str, list[int]] = {}
    for j, text in enumerate(pool_texts):
        positions_of.setdefault(text, []).append(j)
    if k == 0:
        return [[] for _ in test_texts]
    if method == "random":
        out = []
        for i, text in enumerate(test_texts):
            excluded = set(positions_of.get(text, ()))
            allowed = [j for j in range(len(pool_texts)) if j not in excluded]
            out.append(random.Random(f"{seed}-{i}").sample(allowed, min(k, len(allowed))))
        return out
    tiebreak = np.random.default_rng(seed).permutation(len(pool_texts))
    out = []
    for start in range(0, len(test_texts), 256):  # bounded memory: 256 x pool similarities at a time
        block = test_texts[start : start + 256]
        sims = tfidf_similarity(block, pool_texts)
        for text, row in zip(block, sims):
            row[positions_of.get(text, [])] = -np.inf
            order = np.lexsort((tiebreak, -row))  # by similarity, then by the seeded tie-break
            out.append([int(j) for j in order[: min(k, int(np.isfinite(row).sum()))]])
    return out
