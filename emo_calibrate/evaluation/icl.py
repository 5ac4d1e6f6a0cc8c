"""Few-shot in-context classification, the EMO paper's downstream protocol (its `icl.py`, built on OpenICL).

For each task: a seeded sample of test items; for each of them `shots` demonstrations retrieved from the rest of
the task (`topk`: most similar by TF-IDF, or `random`); each candidate label scored by the model's log-probability
of it after the filled prompt (perplexity-based inference, `icl_scoring`); the arg-max is the prediction.

`prepare_icl_tasks` does everything that does not depend on the model (tasks, splits, demonstrations) once, so every
compared model answers exactly the same prompts; `evaluate_icl` runs one model on them.
"""

import logging
from collections import Counter
from dataclasses import dataclass

from .icl_retrieval import retrieve_demonstrations, split_test_and_pool
from .icl_scoring import encode_item, max_sequence_length, score_items
from .icl_tasks import ICLTask, fill_template, load_task, split_template
from .metrics import bootstrap_mean


__all__ = ["PreparedTask", "prepare_icl_tasks", "evaluate_icl", "describe_icl_tasks", "task_prompts"]

logger = logging.getLogger(__name__)


@dataclass
class PreparedTask:
    """A task with its test items and their demonstrations, fixed for every model.

    Attributes:
        task (`ICLTask`): the task.
        test (`list[int]`): indices (into `task.examples`) of the test items.
        pool (`list[int]`): indices of the demonstration pool (disjoint from `test`).
        demonstrations (`list[list[int]]`): for each test item, indices of its demonstrations, most relevant first.
    """

    task: ICLTask
    test: list[int]
    pool: list[int]
    demonstrations: list[list[int]]


def prepare_icl_tasks(
    specs: list[str],
    *,
    shots: int = 8,
    retriever: str = "topk",
    max_examples: int = 500,
    template: str | None = None,
    seed: int = 0,
) -> list[PreparedTask]:
    """Load every task of `specs` (built-in names or `name=path`), split it and retrieve the demonstrations."""
    names = [spec.partition("=")[0] for spec in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"Two ICL tasks share a name in {specs}: name local files with name=path.")
    prepared = []
    for spec in specs:
        task = load_task(spec, template)
        test, pool = split_test_and_pool(len(task.examples), max_examples, seed)
        texts = [e.text for e in task.examples]
        found = retrieve_demonstrations([texts[i] for i in test], [texts[j] for j in pool], shots, retriever, seed)
        demonstrations = [[pool[j] for j in row] for row in found]
        prepared.append(PreparedTask(task, test, pool, demonstrations))
        logger.info(
            "ICL task %s: %d test items, %d-item demonstration pool, %d %s demonstrations each",
            task.name,
            len(test),
            len(pool),
            shots,
            retriever,
        )
    return prepared


def task_prompts(prepared: PreparedTask) -> list[dict]:
    """The text of every test item's prompt pieces: demonstrations, head, candidate continuations, gold index."""
    task = prepared.task
    out = []
    for i, demos in zip(prepared.test, prepared.demonstrations):
        example = task.examples[i]
        head, tail = split_template(task.template, example.text)
        candidates = task.candidates(example)
        out.append(
            {
                "item": i,
                "text": example.text,
                "demonstrations": [fill_template(task.template, *_pair(task, j)) for j in demos],
                "head": head,
                "candidates": list(candidates),
                "continuations": [c + tail for c in candidates],
                "gold": candidates.index(example.label),
            }
        )
    return out


def _pair(task: ICLTask, index: int) -> tuple[str, str]:
    example = task.examples[index]
    return example.text, example.label


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)  # ties: the first candidate


def evaluate_icl(
    model,
    tokenizer,
    prepared: list[PreparedTask],
    *,
    batch_size: int = 8,
    add_special_tokens: bool = True,
    bootstrap_seed: int = 0,
    bootstrap_samples: int = 2000,
    show_progress: bool = True,
) -> tuple[dict, list[dict]]:
    """Accuracy of `model` on every prepared task.

    Returns:
        `(results, predictions)`: `results[task]` holds `accuracy` and `accuracy_norm` (length-normalised scores),
        `n`, `ci95` / `ci95_norm` (bootstrap over items), the per-item `correct` / `correct_norm` flags (for paired
        comparisons), the `chance` and `majority` baselines and prompt statistics; `predictions` has one row per
        item with every candidate's score.
    """
    max_length = max_sequence_length(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    results, predictions = {}, []
    for p in prepared:
        prompts = task_prompts(p)
        items = [
            encode_item(
                tokenizer,
                row["demonstrations"],
                row["head"],
                row["continuations"],
                add_special_tokens=add_special_tokens,
                max_length=max_length,
            )
            for row in prompts
        ]
        sums = score_items(model, items, pad_token_id=pad_id, batch_size=batch_size, show_progress=show_progress)
        correct, correct_norm = [], []
        for row, item, scores in zip(prompts, items, sums):
            norm = [s / len(c) for s, c in zip(scores, item.candidates)]
            pred, pred_norm = _argmax(scores), _argmax(norm)
            correct.append(int(pred == row["gold"]))
            correct_norm.append(int(pred_norm == row["gold"]))
            predictions.append(
                {
                    "task": p.task.name,
                    "item": row["item"],
                    "label": row["candidates"][row["gold"]],
                    "prediction": row["candidates"][pred],
                    "prediction_norm": row["candidates"][pred_norm],
                    "scores": dict(zip(row["candidates"], scores)),
                    "num_tokens": [len(c) for c in item.candidates],
                    "shots": item.num_shots,
                }
            )
        acc, acc_norm = (bootstrap_mean(c, bootstrap_samples, bootstrap_seed) for c in (correct, correct_norm))
        gold = Counter(row["gold"] if p.task.labels is None else row["candidates"][row["gold"]] for row in prompts)
        results[p.task.name] = {
            "accuracy": acc["mean"],
            "ci95": [acc["low"], acc["high"]],
            "accuracy_norm": acc_norm["mean"],
            "ci95_norm": [acc_norm["low"], acc_norm["high"]],
            "n": len(correct),
            "chance": sum(1 / len(row["candidates"]) for row in prompts) / len(prompts),
            "majority": max(gold.values()) / len(prompts),
            "mean_shots": sum(it.num_shots for it in items) / len(items),
            "mean_prompt_tokens": sum(len(it.context) for it in items) / len(items),
            "truncated_prompts": sum(it.truncated for it in items),
            "boundary_fallbacks": sum(it.boundary_fallbacks for it in items),
            "correct": correct,
            "correct_norm": correct_norm,
        }
    return results, predictions


def describe_icl_tasks(prepared: list[PreparedTask], shots: int, retriever: str, seed: int) -> dict:
    """What every model was evaluated on, per task (for results.json and the report)."""
    out = {}
    for p in prepared:
        task = p.task
        out[task.name] = {
            "source": task.source,
            "template": task.template,
            "labels": list(task.labels) if task.labels else None,
            "num_items": len(task.examples),
            "num_test": len(p.test),
            "num_pool": len(p.pool),
            "test_label_counts": dict(Counter(task.examples[i].label for i in p.test)),
            "shots": shots,
            "retriever": retriever,
            "seed": seed,
            **task.info,
        }
    return out
