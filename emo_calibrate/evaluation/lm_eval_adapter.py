"""Downstream scores through EleutherAI's lm-evaluation-harness (`pip install lm-eval`, in the `eval` extra).

Any harness task runs on an already-loaded model, so a base model, a base + LoRA adapter (`PeftModel`) and a merged
model are scored by exactly the same code: the model object goes to `lm_eval.models.huggingface.HFLM`. Tasks are
harness task names (`hellaswag`, `arc_easy`, ...; they download their data from the hub) or the names of tasks
defined in YAML files under `include_path` (local data works offline, e.g. `dataset_path: json` with
`dataset_kwargs: {data_files: {test: /path/data.jsonl}}`).

The paper's own downstream protocol (8-shot in-context learning with retrieved demonstrations, OpenICL) is not a
harness task; the harness' few-shot tasks are the practical stand-in.
"""

import logging
from collections.abc import Sequence


__all__ = ["run_lm_eval"]

logger = logging.getLogger(__name__)


def run_lm_eval(
    model,
    tokenizer,
    tasks: Sequence[str],
    *,
    include_path: str | None = None,
    include_defaults: bool = True,
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    batch_size: int = 8,
    max_length: int | None = None,
    bootstrap_iters: int = 1000,
    seed: int = 1234,
) -> dict[str, dict[str, float]]:
    """Run harness `tasks` on `model` and return their numeric metrics.

    Args:
        model: a loaded causal LM (`PreTrainedModel` or `PeftModel`), already on its device.
        tokenizer: its tokenizer.
        tasks: harness task (or group) names.
        include_path: a folder of custom task YAML files.
        include_defaults: also index the harness' built-in tasks (set `False` to use only `include_path`, faster).
        num_fewshot: few-shot examples per prompt (the task's default when `None`).
        limit: evaluate only this many (int) or this share (float < 1) of each task's examples, for quick checks.
        batch_size: requests per forward pass.
        max_length: context length (the model's when `None`).
        bootstrap_iters: resamples for the standard errors (0 turns them off).
        seed: seed of the harness' random, numpy and torch generators and of few-shot sampling.

    Returns:
        `dict`: task name -> {metric name (e.g. `acc,none`) -> value}; standard errors appear as `*_stderr,*`.
    """
    if not tasks:
        raise ValueError("run_lm_eval needs at least one task name.")
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise ImportError("Downstream evaluation needs lm-eval: pip install 'emo_calibrate[eval]'.") from err

    manager = TaskManager(include_path=include_path, include_defaults=include_defaults)
    missing = [t for t in tasks if t not in manager.all_tasks]
    if missing:
        where = f" or in {include_path}" if include_path else ""
        raise ValueError(
            f"Unknown lm-eval task(s) {missing}: not a harness task{where}. Check the spelling or --lm_eval_include_path."
        )
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
    out = simple_evaluate(
        model=lm,
        tasks=list(tasks),
        task_manager=manager,
        num_fewshot=num_fewshot,
        limit=limit,
        log_samples=False,
        bootstrap_iters=bootstrap_iters,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    scores = {}
    for task, metrics in out["results"].items():
        scores[task] = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and k != "sample_len"}
    return scores
