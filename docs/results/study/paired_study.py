"""Paired statistics of the calibration study across its `emo-calibrate eval` reports (docs/results.md).

Every model of the study saw the same held-out documents, the same generation prompts and the same ICL items and
demonstrations (all seeded), also across the two evaluation runs. So differences are tested on PAIRED units:

- ICL: per-item correctness, paired bootstrap of the accuracy difference and exact McNemar, per task;
- degeneration: per-prompt rep-4 of the continuations (greedy; sampled where both reports sampled), paired bootstrap;
- perplexity (`--perplexity`): every model re-scores the report's held-out windows, keeping the per-document NLL,
  and the ratio of perplexities is bootstrapped over documents (each total is checked against the report's; the
  per-document NLL is cached in the report folder).

    python docs/results/study/paired_study.py --reports runs/eval_main runs/eval_more --output study_paired.json \
        --pairs mle:base emo:base mle_anchored:base emo:mle mle_s1:base emo_s1:base emo_s1:mle_s1 --perplexity
"""

import argparse
import json
import os
import sys


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))

from emo_calibrate.evaluation.metrics import (  # noqa: E402
    bootstrap_perplexity,
    mcnemar,
    paired_bootstrap_difference,
    perplexity,
    rep_n,
)


def load_reports(folders):
    """`{label: (model entry, report folder, results)}` over every report (a label may appear only once)."""
    models = {}
    for folder in folders:
        with open(os.path.join(folder, "results.json"), encoding="utf-8") as f:
            results = json.load(f)
        for entry in results["models"]:
            if entry["label"] in models:
                raise SystemExit(f"model {entry['label']!r} appears in two reports")
            models[entry["label"]] = (entry, folder, results)
    return models


def icl_pairs(a, b, seed):
    out = {}
    for task, result in a.get("icl", {}).items():  # a report without `--metrics icl` has none
        ca, cb = result["correct"], b["icl"][task]["correct"]
        test = mcnemar(ca, cb)
        diff = paired_bootstrap_difference(ca, cb, seed=seed)
        out[task] = {
            "accuracy": [sum(ca) / len(ca), sum(cb) / len(cb)],
            "difference_points": [100 * diff["difference"], 100 * diff["low"], 100 * diff["high"]],
            "mcnemar_p": test["p_value"],
            "wins_losses": [test["a_only"], test["b_only"]],
        }
    return out


def rep4_by_prompt(folder, label, tokenizer):
    """`{(mode, seed): [rep-4 per prompt]}` from the report's samples file, scored on the continuation's tokens."""
    reps = {}
    with open(os.path.join(folder, "samples", f"{label}.jsonl"), encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            text = row["model"]
            continuation = text[len(row["prefix"]) :] if text.startswith(row["prefix"]) else text
            ids = tokenizer(continuation, add_special_tokens=False)["input_ids"]
            reps.setdefault((row["mode"], row.get("seed")), []).append(rep_n(ids, 4))
    return reps


def per_document_nll(entry, results):
    """Per-document NLL and token counts of one model on its report's windows (checked against the report)."""
    from emo_calibrate.evaluation.metrics import NLLAccumulator
    from emo_calibrate.evaluation.perplexity import score_texts
    from emo_calibrate.evaluation.runner import ModelSpec, load_model
    from emo_calibrate.evaluation.texts import load_eval_documents, pack_short_documents, truncate_words

    s = results["settings"]
    documents = load_eval_documents(s["eval_data"], split=s["split"], text_field=s["text_field"])
    documents = truncate_words(pack_short_documents(documents, s["min_document_words"]), s["max_eval_words"])
    model, tokenizer = load_model(
        ModelSpec(entry["label"], entry["path"], entry["kind"], entry["base"]), dtype=s["dtype"]
    )
    acc = NLLAccumulator(len(documents))
    score_texts(
        model, tokenizer, documents, [acc], window=s["window"], stride=s["stride"], batch_size=s["batch_size"],
        add_special_tokens=s["add_special_tokens"], desc=entry["label"],
    )  # fmt: skip
    expected = entry["perplexity"]["nll_sum"]
    if abs(acc.nll.sum().item() - expected) > 1e-3 * abs(expected):
        raise SystemExit(f"{entry['label']}: NLL {acc.nll.sum().item()} differs from the report's {expected}")
    return acc.nll, acc.tokens


def perplexity_ratio(nll_a, tok_a, nll_b, seed, num_samples=2000):
    """The perplexity ratio a / b, exp(sum(nll_a - nll_b) / sum(tokens)), with a bootstrap over documents: the
    corpus perplexity of the per-document NLL differences, so `bootstrap_perplexity` resamples it as it is."""
    diff = nll_a - nll_b
    spread = bootstrap_perplexity(diff, tok_a, num_samples, seed)
    return [perplexity(diff.sum().item(), tok_a.sum().item()), spread["low"], spread["high"]]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reports", nargs="+", required=True, help="Output folders of emo-calibrate eval.")
    parser.add_argument("--pairs", nargs="+", required=True, help="A:B pairs of model labels (A compared with B).")
    parser.add_argument("--output", required=True, help="JSON file for the statistics.")
    parser.add_argument("--perplexity", action="store_true", help="Also re-score for paired perplexity ratios.")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer

    models = load_reports(args.reports)
    first = next(iter(models.values()))[0]
    tokenizer = AutoTokenizer.from_pretrained(first["base"] or first["path"])
    reps = {label: rep4_by_prompt(folder, label, tokenizer) for label, (_, folder, _) in models.items()}
    nll = {}
    if args.perplexity:
        import torch

        for label, (entry, folder, results) in models.items():
            cache = os.path.join(folder, f"per_document_nll-{label}.pt")  # re-scoring takes minutes per model
            if not os.path.isfile(cache):
                torch.save(per_document_nll(entry, results), cache)
            nll[label] = torch.load(cache)
    stats = {"reports": [os.path.abspath(r) for r in args.reports], "pairs": {}}
    for pair in args.pairs:
        a, b = pair.split(":")
        entry = {"icl": icl_pairs(models[a][0], models[b][0], args.seed), "rep4": {}}
        for key in sorted(set(reps[a]) & set(reps[b]), key=str):
            diff = paired_bootstrap_difference(reps[a][key], reps[b][key], seed=args.seed)
            entry["rep4"][f"{key[0]} seed {key[1]}" if key[0] == "sample" else key[0]] = {
                "mean": [sum(reps[a][key]) / len(reps[a][key]), sum(reps[b][key]) / len(reps[b][key])],
                "difference": [diff["difference"], diff["low"], diff["high"]],
                "lower_equal_higher": [
                    sum(x < y for x, y in zip(reps[a][key], reps[b][key])),
                    sum(x == y for x, y in zip(reps[a][key], reps[b][key])),
                    sum(x > y for x, y in zip(reps[a][key], reps[b][key])),
                ],
            }
        if nll:
            entry["perplexity_ratio"] = perplexity_ratio(nll[a][0], nll[a][1], nll[b][0], args.seed)
        stats["pairs"][pair] = entry
    with open(args.output, "w", encoding="utf-8") as f:
        json.dump(stats, f, indent=2)
    print(json.dumps(stats, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
