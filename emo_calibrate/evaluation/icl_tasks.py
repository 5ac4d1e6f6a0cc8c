"""In-context-learning tasks: labeled examples, their prompt template, and where they come from.

A task is a list of `ICLExample(text, label, options)`; `label` is the verbalizer: the word or phrase the model should
produce (`positive`, `location`, ...). A classification task has one closed set of label words, the candidates of
every item; a multiple-choice task gives each item its own `options`.

`--icl_tasks` takes built-in names (see `icl_builtin.BUILTIN_TASKS`) or `name=path` for a local `.jsonl` / `.csv`
file with a `text` and a `label` column and an optional `options` column (a JSON list, or in a CSV cell either a
JSON list or words separated by `|`).

Templates hold `{text}` and `{label}` (in that order), e.g. `Review: {text} It is {label}`. A demonstration is the
template filled with a pool item and its gold label; the test prompt is the template cut just before `{label}`, and
each candidate is scored on the rest of the filled template (the label and whatever follows it).
"""

import csv
import json
import os
from dataclasses import dataclass, field


__all__ = [
    "DEFAULT_TEMPLATE",
    "ICLExample",
    "ICLTask",
    "check_template",
    "fill_template",
    "split_template",
    "load_local_task",
    "parse_task_spec",
    "load_task",
]

DEFAULT_TEMPLATE = "{text}\nAnswer: {label}"  # for local tasks; built-in tasks carry the paper's templates


@dataclass(frozen=True)
class ICLExample:
    """One labeled item: its `text`, its gold `label` word(s), and its own candidate `options` (multiple choice)."""

    text: str
    label: str
    options: tuple[str, ...] | None = None


@dataclass
class ICLTask:
    """A labeled task and how to prompt it.

    Args:
        name (`str`): the name used in reports.
        examples (`list[ICLExample]`): every labeled item; test items and the demonstration pool are drawn from it.
        template (`str`): prompt format with `{text}` and `{label}`.
        labels (`tuple[str, ...]`, *optional*): the candidates of every item (classification); None when each item
            has its own `options`.
        source (`str`, *optional*): provenance, written to the report.
        info (`dict`, *optional*): counts and notes about how the task was built.
    """

    name: str
    examples: list[ICLExample]
    template: str = DEFAULT_TEMPLATE
    labels: tuple[str, ...] | None = None
    source: str = ""
    info: dict = field(default_factory=dict)

    def candidates(self, example: ICLExample) -> tuple[str, ...]:
        return example.options if example.options is not None else self.labels


def check_template(template: str, where: str = "--icl_template") -> str:
    """Return `template` if it holds `{text}` once, then `{label}` once; raise a `ValueError` saying why not."""
    if template.count("{text}") != 1 or template.count("{label}") != 1:
        raise ValueError(
            f"{where} must contain {{text}} once and {{label}} once, e.g. 'Review: {{text}} It is {{label}}'; got "
            f"{template!r}."
        )
    if template.index("{text}") > template.index("{label}"):
        raise ValueError(f"{where} must put {{text}} before {{label}} (the label is what gets scored): {template!r}.")
    return template


def fill_template(template: str, text: str, label: str) -> str:
    """The template with both fields filled (a demonstration). Plain replacement: braces in texts are safe."""
    head, tail = template.split("{label}")
    return head.replace("{text}", text) + label + tail


def split_template(template: str, text: str) -> tuple[str, str]:
    """`(head, tail)`: the template filled with `text` up to `{label}`, and what follows `{label}`."""
    head, tail = template.split("{label}")
    return head.replace("{text}", text), tail


def _options(value, where: str) -> tuple[str, ...] | None:
    if value is None or value == "":
        return None
    if isinstance(value, str):
        value = json.loads(value) if value.lstrip().startswith("[") else [v.strip() for v in value.split("|")]
    if not isinstance(value, list) or len(value) < 2 or not all(isinstance(v, str) and v.strip() for v in value):
        raise ValueError(f"{where}: 'options' must list at least two non-empty strings, got {value!r}.")
    return tuple(value)


def _rows(path: str):
    if path.endswith(".jsonl"):
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield f"{path} line {number}", json.loads(line)
                    except json.JSONDecodeError as err:
                        raise ValueError(f"{path} line {number} is not JSON: {err}") from err
    elif path.endswith(".csv"):
        with open(path, encoding="utf-8", newline="") as f:
            for number, row in enumerate(csv.DictReader(f), 2):
                yield f"{path} row {number}", row
    else:
        raise ValueError(f"ICL task file {path} must be a .jsonl or .csv file with 'text' and 'label' columns.")


def load_local_task(name: str, path: str, template: str | None = None) -> ICLTask:
    """Read a task from a `.jsonl` / `.csv` file with `text`, `label` and optional `options` columns.

    Exact duplicate texts are kept once (a duplicate would be its own demonstration); a text that appears with two
    different labels is dropped. Raises a `ValueError` naming the file and row for a missing or bad field.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"ICL task {name}: {path} is not a file (expected name=path/to/task.jsonl or .csv).")
    examples, seen, conflicting, num_rows = [], {}, set(), 0
    for where, row in _rows(path):
        num_rows += 1
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected an object with 'text' and 'label', got {row!r}.")
        text, label = row.get("text"), row.get("label")
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{where}: no non-empty string 'text' (columns: {sorted(row)}).")
        if isinstance(label, (int, float)) and not isinstance(label, bool):
            label = str(label)
        if not isinstance(label, str) or not label.strip():
            raise ValueError(f"{where}: no non-empty 'label' (the word the model should produce).")
        options = _options(row.get("options"), where)
        if options is not None and label not in options:
            raise ValueError(f"{where}: the label {label!r} is not one of its options {list(options)}.")
        example = ICLExample(text.strip(), label.strip(), options)
        if example.text in seen:
            if seen[example.text] != (example.label, example.options):
                conflicting.add(example.text)
            continue
        seen[example.text] = (example.label, example.options)
        examples.append(example)
    examples = [e for e in examples if e.text not in conflicting]
    with_options = sum(e.options is not None for e in examples)
    if with_options not in (0, len(examples)):
        raise ValueError(f"{path}: either every row has 'options' (multiple choice) or none has (classification).")
    labels = None
    if not with_options:
        labels = tuple(dict.fromkeys(e.label for e in examples))  # first-appearance order
        if all(label.lstrip("-").isdigit() for label in labels):
            raise ValueError(
                f"{path}: every label is a number ({list(labels)[:6]}): give the label WORDS the model should "
                "produce (e.g. positive / negative), not class ids."
            )
        if len(labels) < 2:
            raise ValueError(f"{path}: a classification task needs at least two distinct labels, got {list(labels)}.")
    if len(examples) < 4:
        raise ValueError(f"{path}: {len(examples)} usable rows; an ICL task needs test items AND demonstrations.")
    info = {"rows": num_rows, "duplicate_rows": num_rows - len(seen), "conflicting_texts": len(conflicting)}
    return ICLTask(name, examples, check_template(template or DEFAULT_TEMPLATE), labels, source=path, info=info)


def parse_task_spec(spec: str) -> tuple[str, str | None]:
    """`"trec"` -> `("trec", None)`; `"mine=data/mine.jsonl"` -> `("mine", "data/mine.jsonl")`."""
    name, sep, path = spec.partition("=")
    if not name or (sep and not path):
        raise ValueError(f"--icl_tasks entry {spec!r}: use a built-in task name or name=path/to/file.jsonl.")
    return name, (path or None)


def load_task(spec: str, template: str | None = None) -> ICLTask:
    """Resolve one `--icl_tasks` entry: a built-in task (fetched and cached on first use) or a local file."""
    from .icl_builtin import BUILTIN_TASKS, load_builtin_task

    name, path = parse_task_spec(spec)
    if path is not None:
        return load_local_task(name, path, template)
    if name not in BUILTIN_TASKS:
        raise ValueError(
            f"Unknown ICL task {name!r}: built-in tasks are {sorted(BUILTIN_TASKS)}; for your own data pass "
            f"{name}=path/to/file.jsonl (columns text, label[, options])."
        )
    return load_builtin_task(name, template)
