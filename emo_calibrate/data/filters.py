"""Sentence filters and duplicate removal, each stage counted for the manifest.

Every filter is language-agnostic: words are whitespace-separated pieces, letters are any Unicode letter, and the
near-duplicate key keeps only letters and digits of the NFKC-normalised, case-folded text.
"""

import hashlib
import re
import unicodedata


__all__ = ["FILTER_STAGES", "exact_key", "filter_sentences", "has_markup", "near_duplicate_key", "word_count"]

# Leftover markup (wiki templates and links, HTML tags, table cells, WikiText's <unk>) marks a sentence as debris.
_MARKUP = re.compile(r"\{\{|\}\}|\[\[|\]\]|<unk>|</?[A-Za-z][A-Za-z0-9]*(?:\s[^<>]*)?/?>|\|\||^\s*[|!]")
# Anything but letters, digits and spaces (in any script): `\w` is `str.isalnum()` plus "_".
_NOT_ALNUM = re.compile(r"[^\w\s]|_")
# Names of the counts written to the manifest, in the order the stages run.
FILTER_STAGES = ("min_words", "max_words", "no_letters", "markup", "exact_duplicates", "near_duplicates")


def word_count(sentence: str) -> int:
    return len(sentence.split())


def has_markup(sentence: str) -> bool:
    return bool(_MARKUP.search(sentence))


def exact_key(sentence: str) -> bytes:
    return hashlib.blake2b(sentence.encode("utf-8"), digest_size=16).digest()


def near_duplicate_key(sentence: str) -> bytes:
    """Hash of the sentence with case, accents' compatibility forms, punctuation and spacing normalised away.

    Example: `"The U.S. Army, in 1945."` and `"the US army in 1945"` share a key; `"... in 1946"` does not.
    """
    text = unicodedata.normalize("NFKC", sentence).casefold()
    # Dropping punctuation outright (not replacing it by a space) keeps "U.S." and "US" together.
    kept = _NOT_ALNUM.sub("", text)
    return hashlib.blake2b(" ".join(kept.split()).encode("utf-8"), digest_size=16).digest()


def filter_sentences(
    documents: list[list[str]], min_words: int, max_words: int
) -> tuple[list[list[str]], dict[str, int]]:
    """Apply the filters of `FILTER_STAGES` in order to the sentences of each document.

    Duplicates are found across the whole source; the first occurrence (in document order) is kept.

    Args:
        documents (`list[list[str]]`): the sentences of each document.
        min_words (`int`), max_words (`int`): bounds on the number of words of a kept sentence.

    Returns:
        The kept sentences of each document (same number of documents, some possibly empty), and a dict with the
        number of sentences before filtering (`segmented`) and after each stage (`after_<stage>`).
    """
    counts = {"segmented": sum(map(len, documents))}
    seen_exact: set[bytes] = set()
    seen_near: set[bytes] = set()

    def first_time(key: bytes, seen: set[bytes]) -> bool:
        if key in seen:
            return False
        seen.add(key)
        return True

    stages = {
        "min_words": lambda s: word_count(s) >= min_words,
        "max_words": lambda s: word_count(s) <= max_words,
        "no_letters": lambda s: any(ch.isalpha() for ch in s),
        "markup": lambda s: not has_markup(s),
        "exact_duplicates": lambda s: first_time(exact_key(s), seen_exact),
        "near_duplicates": lambda s: first_time(near_duplicate_key(s), seen_near),
    }
    for name in FILTER_STAGES:
        keep = stages[name]
        documents = [[s for s in doc if keep(s)] for doc in documents]
        counts[f"after_{name}"] = sum(map(len, documents))
    return documents, counts
