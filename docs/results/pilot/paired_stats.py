"""Paired differences between the models of an `emo-calibrate eval` report (docs/results/pilot/README.md).

The report's ± on perplexity is a bootstrap over documents of each model alone: it mostly measures how much the
documents differ, not how much the models do. Every model sees the same documents and the same prompts, so the
honest test of "model A differs from model B" resamples the PAIRED differences. This script

- re-scores the report's held-out text with each model (same windows as the report) keeping the per-document NLL,
  and bootstraps the perplexity ratio of each model over the base and of each pair of models over documents;
- reads the report's `samples/*.jsonl` and bootstraps the per-prompt difference of rep-4 over prompts (greedy, and
  sampled with the seeds pooled), with win / tie / loss counts.

    python docs/results/pilot/paired_stats.py --report /tmp/results_scratch/eval --output docs/results/pilot/paired_stats.json
"""

import argparse
import json
import os
import re


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--report", required=True, help="Output folder of emo-calibrate eval (results.json).")
    parser.add_argument("--output", required=True, help="JSON file for the paired statistics.")
    parser.add_argument("--bootstrap", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip_perplexity", action="store_true", help="Only the generation statistics.")
    return parser.parse_args(argv)


def paired_bootstrap(values_a, values_b, counts, num_samples, seed):
    """Bootstrap over units of `exp(sum(a - b) / sum(counts))` (a perplexity ratio when a, b are NLL sums)
    or, with `counts=None`, of `mean(a - b)`. Returns the point value and the 2.5 / 97.5 percentiles."""
    import torch

    a = torch.as_tensor(values_a, dtype=torch.float64)
    b = torch.as_tensor(values_b, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, a.numel(), (num_samples, a.numel()), generator=gen)
    diff = a - b
    if counts is None:
        point, samples = diff.mean().item(), diff[idx].mean(1)
    else:
        c = torch.as_tensor(counts, dtype=torch.float64)
        point = torch.exp(diff.sum() / c.sum()).item()
        samples = torch.exp(diff[idx].sum(1) / c[idx].sum(1))
    low, high = torch.quantile(samples, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return {"value": point, "low": low, "high": high}


def per_document_nll(results, threads):
    import torch

    from emo_calibrate.evaluation.metrics import NLLAccumulator
    from emo_calibrate.evaluation.perplexity import score_texts
    from emo_calibrate.evaluation.runner import ModelSpec, load_model
    from emo_calibrate.evaluation.texts import load_eval_documents, pack_short_documents, truncate_words

    torch.set_num_threads(threads)
    s = results["settings"]
    documents = truncate_words(
        pack_short_documents(
            load_eval_documents(s["eval_data"], split=s["split"], text_field=s["text_field"]), s["min_document_words"]
        ),
        s["max_eval_words"],
    )
    out = {}
    for m in results["models"]:
        model, tokenizer = load_model(ModelSpec(m["label"], m["path"], m["kind"], m["base"]), dtype=s["dtype"])
        acc = NLLAccumulator(len(documents))
        score_texts(
            model, tokenizer, documents, [acc], window=s["window"], stride=s["stride"], batch_size=s["batch_size"],
            add_special_tokens=s["add_special_tokens"], desc=m["label"],
        )  # fmt: skip
        total = acc.nll.sum().item()
        # The same text and windows as the report: the corpus NLL must match it.
        if abs(total - m["perplexity"]["nll_sum"]) > 1e-3 * abs(m["perplexity"]["nll_sum"]):
            raise SystemExit(f"{m['label']}: NLL {total} differs from the report's {m['perplexity']['nll_sum']}.")
        out[m["label"]] = (acc.nll.tolist(), acc.tokens.tolist())
        del model
    return out


def per_prompt_rep4(report, labels, tokenizer):
    from emo_calibrate.evaluation.metrics import rep_n

    reps = {}
    for label in labels:
        path = os.path.join(report, "samples", re.sub(r"[^\w.-]", "_", label) + ".jsonl")
        rows = [json.loads(line) for line in open(path, encoding="utf-8")]
        by_mode = {}
        for row in rows:
            # The sample text is the decoded prompt + continuation; rep-4 is scored on the continuation's tokens.
            text = row["model"]
            cont = text[len(row["prefix"]) :] if text.startswith(row["prefix"]) else text
            ids = tokenizer(cont, add_special_tokens=False)["input_ids"]
            by_mode.setdefault(row["mode"], []).append(rep_n(ids, 4))
        reps[label] = by_mode
    return reps


def main(argv=None):
    args = parse_args(argv)
    from transformers import AutoTokenizer

    with open(os.path.join(args.report, "results.json"), encoding="utf-8") as f:
        results = json.load(f)
    labels = [m["label"] for m in results["models"]]
    base = labels[0]
    pairs = [(label, base) for label in labels[1:]]
    pairs += [(a, b) for i, a in enumerate(labels[1:], 1) for b in labels[1:i]]  # every pair of non-base models
    stats = {"report": os.path.abspath(args.report), "bootstrap": args.bootstrap, "pairs": {}}

    first = results["models"][0]
    tokenizer = AutoTokenizer.from_pretrained(first["base"] or first["path"])
    reps = per_prompt_rep4(args.report, labels, tokenizer)
    stats["rep4_mean_rescored"] = {k: {m: sum(v) / len(v) for m, v in d.items()} for k, d in reps.items()}
    nll = None if args.skip_perplexity else per_document_nll(results, args.threads)
    for a, b in pairs:
        entry = {}
        if nll is not None:
            entry["ppl_ratio"] = paired_bootstrap(nll[a][0], nll[b][0], nll[a][1], args.bootstrap, args.seed)
        for mode in reps[a]:
            ra, rb = reps[a][mode], reps[b][mode]
            entry[f"rep4_diff_{mode}"] = paired_bootstrap(ra, rb, None, args.bootstrap, args.seed)
            entry[f"rep4_{mode}_lower_equal_higher"] = [
                sum(x < y for x, y in zip(ra, rb)),
                sum(x == y for x, y in zip(ra, rb)),
                sum(x > y for x, y in zip(ra, rb)),
            ]
        stats["pairs"][f"{a} vs {b}"] = entry
    with open(args.output, "w", encoding="utf-8") as f:
        json.dump(stats, f, indent=2)
    print(json.dumps(stats, indent=2))


if __name__ == "__main__":
    main()
