"""Entry point of the `emo-calibrate` command.

Each subcommand is a module of `emo_calibrate.cli` exposing `run(argv: list[str] | None) -> int`. Modules are imported
only when their subcommand runs, so `emo-calibrate --help` stays fast and never imports torch.
"""

import importlib
import sys


# name -> (module, one-line summary shown by `emo-calibrate --help`)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "train": (
        "emo_calibrate.cli.train",
        "Calibrate a model with EMO (LoRA / QLoRA) from a YAML recipe; no arguments runs the offline demo.",
    ),
    "data": ("emo_calibrate.cli.data", "Build a calibration set (~25k sentences, manifest) from a text source."),
    "eval": ("emo_calibrate.cli.eval", "Compare models on held-out text: perplexity, calibration, MAUVE, lm-eval."),
    "merge": ("emo_calibrate.cli.merge", "Merge an adapter into its base model for deployment (verified, atomic)."),
}

USAGE = """usage: emo-calibrate <command> [options]

Calibrate pretrained causal language models with EMO (Earth Mover Distance Optimization, Ren et al., ICLR 2024)
on Hugging Face TRL + PEFT.

commands:
{commands}

Run `emo-calibrate <command> --help` for the options of a command.
"""


def _usage() -> str:
    width = max(len(name) for name in SUBCOMMANDS)
    lines = [f"  {name:<{width}}  {summary}" for name, (_, summary) in SUBCOMMANDS.items()]
    return USAGE.format(commands="\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"emo-calibrate: unknown command {name!r}. Choose one of: {', '.join(SUBCOMMANDS)}.", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    return int(module.run(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
