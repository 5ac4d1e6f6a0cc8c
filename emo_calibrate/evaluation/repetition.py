"""Repetition and diversity of generated text, on any sequences of hashable items (token ids or words): rep-n
(Welleck et al. 2020), distinct-n (Li et al. 2016) and the share of sequences that repeat themselves.
"""

from collections.abc import Hashable, Sequence


__all__ = ["distinct_n", "mean_rep_n", "ngrams", "rep_n", "repetition_summary", "sequence_repetition_rate"]


def ngrams(sequence: Sequence[Hashable], n: int) -> list[tuple]:
    """All contiguous n-grams of `sequence`, in order (empty when it is shorter than `n`)."""
    if n < 1:
        raise ValueError(f"n-gram size must be at least 1, got {n}.")
    return [tuple(sequence[i : i + n]) for i in range(len(sequence) - n + 1)]


def rep_n(sequence: Sequence[Hashable], n: int) -> float:
    """Share of repeated n-grams in one sequence, `1 - |unique n-grams| / |n-grams|` (Welleck et al. 2020, seq-rep-n).

    0 for a sequence with no repeated n-gram (or too short to have any), close to 1 for a degenerate loop.
    """
    grams = ngrams(sequence, n)
    return 0.0 if not grams else 1.0 - len(set(grams)) / len(grams)


def mean_rep_n(sequences: Sequence[Sequence[Hashable]], n: int) -> float:
    """`rep_n` averaged over sequences."""
    if not sequences:
        raise ValueError("mean_rep_n needs at least one sequence.")
    return sum(rep_n(s, n) for s in sequences) / len(sequences)


def distinct_n(sequences: Sequence[Sequence[Hashable]], n: int) -> float:
    """Corpus-level distinct-n (Li et al. 2016): unique n-grams over all sequences / total n-grams (0 when none)."""
    grams = [g for s in sequences for g in ngrams(s, n)]
    return 0.0 if not grams else len(set(grams)) / len(grams)


def sequence_repetition_rate(sequences: Sequence[Sequence[Hashable]], n: int = 4) -> float:
    """Share of sequences that repeat at least one n-gram of their own (a coarse degeneration rate)."""
    if not sequences:
        raise ValueError("sequence_repetition_rate needs at least one sequence.")
    return sum(rep_n(s, n) > 0 for s in sequences) / len(sequences)


def repetition_summary(sequences: Sequence[Sequence[Hashable]], ns: Sequence[int] = (1, 2, 3, 4)) -> dict:
    """`rep-n`, `distinct-n` and `seq-rep-n` (sequence repetition rate) for each `n` in `ns`, keyed `rep-4` etc."""
    out = {}
    for n in ns:
        out[f"rep-{n}"] = mean_rep_n(sequences, n)
        out[f"distinct-{n}"] = distinct_n(sequences, n)
        out[f"seq-rep-{n}"] = sequence_repetition_rate(sequences, n)
    return out
