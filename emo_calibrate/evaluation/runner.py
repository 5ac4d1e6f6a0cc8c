"""Thin runner: load each model (plain, merged, base + adapter, GGUF), run the metric groups, write the report.

Everything that can be checked cheaply (model paths, adapter bases, the text source, the ICL tasks, the output
folder) is checked before the first model is loaded; the ICL test items and demonstrations are chosen then too, once
for all models. All outputs go to a temporary folder next to `output_dir`, renamed at the end.
"""

import gc
import json
import logging
import os
import re
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict

import torch

from .arguments import TEXT_METRICS, EvalArguments
from .generation import Featurizer, cut_prompts, evaluate_generation, reference_tokens
from .loading import ModelSpec, check_loadable, find_trainer_state, load_model, parse_model_spec
from .metrics import CalibrationAccumulator, NLLAccumulator, count_words
from .perplexity import score_texts
from .repetition import repetition_summary
from .texts import load_eval_documents, pack_short_documents, truncate_words


__all__ = [
    "ModelSpec",
    "parse_model_spec",
    "check_loadable",
    "load_model",
    "atomic_output_dir",
    "find_trainer_state",
    "evaluate_model",
    "run_evaluation",
]

logger = logging.getLogger(__name__)


def evaluate_model(
    model,
    tokenizer,
    documents,
    prompts,
    args: EvalArguments,
    featurizer=None,
    reference_features=None,
    icl_tasks=None,
):
    """Run the metric groups of `args.metrics` on one loaded model; returns its results entry (without samples).

    `icl_tasks` are the `PreparedTask`s of `icl.prepare_icl_tasks` (the same for every model); the per-item ICL
    predictions come back under `icl_predictions`, for the caller to write out.
    """
    entry, seconds = {}, {}
    if {"perplexity", "calibration"} & set(args.metrics):
        start = time.perf_counter()
        nll = NLLAccumulator(len(documents), [count_words(d) for d in documents])
        calib = CalibrationAccumulator(args.calibration_bins, num_documents=len(documents))
        accumulators = [a for a, g in ((nll, "perplexity"), (calib, "calibration")) if g in args.metrics]
        score_texts(
            model,
            tokenizer,
            documents,
            accumulators,
            window=args.window,
            stride=args.stride,
            batch_size=args.batch_size,
            add_special_tokens=args.add_special_tokens,
        )
        if "perplexity" in args.metrics:
            entry["perplexity"] = nll.compute(args.bootstrap_samples, seed=args.seed)
        if "calibration" in args.metrics:
            entry["calibration"] = calib.compute()
        seconds["perplexity_calibration"] = time.perf_counter() - start
    if "generation" in args.metrics:
        start = time.perf_counter()
        entry["generation"] = evaluate_generation(
            model,
            tokenizer,
            prompts,
            seeds=args.seeds,
            decoding=args.decoding,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.generation_batch_size,
            featurizer=featurizer,
            reference_features=reference_features,
        )
        entry["generation"]["human"] = repetition_summary(reference_tokens(tokenizer, prompts, args.max_new_tokens))
        seconds["generation"] = time.perf_counter() - start
    if "downstream" in args.metrics:
        from .lm_eval_adapter import run_lm_eval

        start = time.perf_counter()
        entry["downstream"] = run_lm_eval(
            model,
            tokenizer,
            args.lm_eval_tasks,
            include_path=args.lm_eval_include_path,
            num_fewshot=args.lm_eval_num_fewshot,
            limit=int(args.lm_eval_limit) if args.lm_eval_limit and args.lm_eval_limit >= 1 else args.lm_eval_limit,
            batch_size=args.lm_eval_batch_size,
        )
        seconds["downstream"] = time.perf_counter() - start
    if "icl" in args.metrics:
        from .icl import evaluate_icl

        start = time.perf_counter()
        entry["icl"], entry["icl_predictions"] = evaluate_icl(
            model,
            tokenizer,
            icl_tasks,
            batch_size=args.icl_batch_size,
            add_special_tokens=args.add_special_tokens,
            bootstrap_seed=args.seed,
            bootstrap_samples=args.bootstrap_samples,
        )
        seconds["icl"] = time.perf_counter() - start
    entry["seconds"] = seconds
    return entry


def _resolve_featurizer(args: EvalArguments, specs: list[ModelSpec], device: str) -> Featurizer | None:
    choice = args.featurizer
    if choice == "none" or "generation" not in args.metrics:
        return None
    if choice == "auto":
        try:
            return Featurizer("gpt2-large", max_length=args.mauve_max_length, device=device)
        except Exception as err:  # offline / no cache: any local model will do, but say so
            logger.warning(
                "gpt2-large (the paper's MAUVE featurizer) cannot be loaded (%s); using the base model.", err
            )
            choice = "base"
    if choice == "base":
        first = specs[0]
        base = parse_model_spec(first.base) if first.kind == "adapter" else first
        if base.kind == "gguf":
            folder, name = os.path.split(os.path.abspath(base.path))
            return Featurizer(folder, max_length=args.mauve_max_length, device=device, gguf_file=name)
        return Featurizer(base.path, max_length=args.mauve_max_length, device=device)
    return Featurizer(choice, max_length=args.mauve_max_length, device=device)


def _file_name(label: str) -> str:
    return re.sub(r"[^\w.-]", "_", label)


def _write_jsonl(path: str, rows) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


@contextmanager
def atomic_output_dir(output_dir: str, overwrite: bool):
    """Yield a temporary folder next to `output_dir`; on success it replaces `output_dir`, on error it is removed."""
    parent = os.path.dirname(os.path.abspath(output_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(output_dir))}.tmp-", dir=parent)
    try:
        yield tmp
        if os.path.exists(output_dir):
            if not overwrite:
                raise FileExistsError(f"{output_dir} appeared while evaluating; pass --overwrite to replace it.")
            old = tmp + ".old"
            os.rename(output_dir, old)
            os.rename(tmp, output_dir)
            shutil.rmtree(old)
        else:
            os.rename(tmp, output_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_evaluation(args: EvalArguments) -> dict:
    """Evaluate every model of `args.models` on `args.eval_data` and write the report to `args.output_dir`.

    Returns:
        `dict`: the content of `results.json` (settings, featurizer, per-model results, `paired` differences).
    """
    from .paired import paired_statistics
    from .report import dumps_results, write_report

    if not args.models:
        raise ValueError("No model to evaluate: pass --models MODEL [MODEL ...].")
    text_metrics = [m for m in args.metrics if m in TEXT_METRICS]
    if text_metrics and not args.eval_data:
        raise ValueError(
            f"No held-out text for {text_metrics}: pass --eval_data (a saved calibration set, a file or a folder), "
            "or choose --metrics without them (e.g. --metrics icl)."
        )
    if os.path.exists(args.output_dir) and not args.overwrite:
        raise FileExistsError(f"{args.output_dir} exists: pass --overwrite to replace it, or another --output_dir.")
    if args.lm_eval_include_path and not os.path.isdir(args.lm_eval_include_path):
        raise FileNotFoundError(f"--lm_eval_include_path {args.lm_eval_include_path} is not a folder.")
    specs = [parse_model_spec(m, args.base_model) for m in args.models]
    for spec in specs:
        check_loadable(spec)
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"Two models share a label in {labels}: name them with label=path.")
    all_documents = []
    if text_metrics:
        all_documents = pack_short_documents(
            load_eval_documents(args.eval_data, split=args.split, text_field=args.text_field), args.min_document_words
        )
    # The word budget bounds the perplexity pass; prompts may come from any held-out document.
    documents = truncate_words(all_documents, args.max_eval_words) if all_documents else []
    prompts = []
    if "generation" in args.metrics:
        prompts = cut_prompts(
            all_documents,
            prefix_words=args.prefix_words,
            continuation_words=args.continuation_words,
            num_prompts=args.num_prompts,
        )
        if not prompts:
            raise ValueError(
                f"No paragraph of {args.eval_data} has the {args.prefix_words + args.continuation_words + 10} words a "
                "generation prompt needs: lower --prefix_words/--continuation_words, raise --max_eval_words, or "
                "drop generation from --metrics."
            )
        if len(prompts) < args.num_prompts:
            logger.warning("Only %d generation prompts could be cut (asked for %d).", len(prompts), args.num_prompts)
    icl_tasks = None
    if "icl" in args.metrics:  # model-independent: the same test items and demonstrations for every model
        from .icl import prepare_icl_tasks

        icl_tasks = prepare_icl_tasks(
            args.icl_tasks,
            shots=args.icl_shots,
            retriever=args.icl_retriever,
            max_examples=args.icl_max_examples,
            template=args.icl_template,
            seed=args.icl_seed,
        )
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    featurizer = _resolve_featurizer(args, specs, device)
    if featurizer is not None and len(prompts) < 100:
        logger.warning(
            "MAUVE from %d prompts clusters into %d buckets and is coarse (values near 1 say little); use a few "
            "hundred prompts for MAUVE to discriminate, and read rep-n and perplexity meanwhile.",
            len(prompts),
            max(2, round(len(prompts) / 10)),
        )
    reference_features = featurizer([p.reference for p in prompts]) if featurizer else None

    results = {
        "settings": asdict(args),
        "featurizer": featurizer.name if featurizer else None,
        "num_documents": len(documents),
        "num_words": sum(count_words(d) for d in documents),
        "num_prompts": len(prompts),
        "device": device,
        "models": [],
    }
    if icl_tasks is not None:
        from .icl import describe_icl_tasks

        results["icl_tasks"] = describe_icl_tasks(icl_tasks, args.icl_shots, args.icl_retriever, args.icl_seed)
    with atomic_output_dir(args.output_dir, args.overwrite) as tmp:
        if prompts:
            os.makedirs(os.path.join(tmp, "samples"))
        if icl_tasks is not None:
            from .icl import task_prompts

            os.makedirs(os.path.join(tmp, "icl"))
            for prepared in icl_tasks:  # what every model was asked, for inspection
                path = os.path.join(tmp, "icl", f"prompts-{_file_name(prepared.task.name)}.jsonl")
                _write_jsonl(path, task_prompts(prepared))
        for spec in specs:
            logger.info("Evaluating %s (%s: %s)", spec.label, spec.kind, spec.path)
            model, tokenizer = load_model(spec, dtype=args.dtype, device=device)
            entry = {"label": spec.label, "path": spec.path, "kind": spec.kind, "base": spec.base}
            entry.update(
                evaluate_model(
                    model, tokenizer, documents, prompts, args, featurizer, reference_features, icl_tasks=icl_tasks
                )
            )
            if "icl_predictions" in entry:
                path = os.path.join(tmp, "icl", f"predictions-{_file_name(spec.label)}.jsonl")
                _write_jsonl(path, entry.pop("icl_predictions"))
            if prompts:
                samples = entry["generation"].pop("samples", {})
                rows = [
                    {"mode": mode, "seed": seed, "prefix": prompt.prefix, "human": prompt.reference, "model": text}
                    for mode, by_seed in samples.items()
                    for seed, texts in by_seed.items()
                    for prompt, text in zip(prompts, texts)
                ]
                _write_jsonl(os.path.join(tmp, "samples", _file_name(spec.label) + ".jsonl"), rows)
            entry["trainer_state"] = find_trainer_state(spec.path)
            results["models"].append(entry)
            del model
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        if len(results["models"]) > 1:  # every model against the first, on the same documents, prompts and items
            results["paired"] = paired_statistics(results)
        with open(os.path.join(tmp, "results.json"), "w", encoding="utf-8") as f:
            f.write(dumps_results(results) + "\n")
        write_report(results, tmp)
    return results
