"""`emo-calibrate merge`: merge a (Q)LoRA adapter into its base model for deployment.

    # into the base the adapter was trained on (its record says which; see docs/merge.md), bf16 weights:
    emo-calibrate merge --adapter_path runs/emo-smollm2 --output_dir runs/emo-smollm2-merged
    # a QLoRA adapter into the original unquantised checkpoint instead, fp32, on a GPU:
    emo-calibrate merge --adapter_path runs/emo-qlora --output_dir merged --merge_base original --dtype float32 \
        --device cuda
    # from a YAML file, with command-line overrides:
    emo-calibrate merge --config merge.yaml --overwrite
"""

import sys
from dataclasses import dataclass, field


__all__ = ["MergeArguments", "make_parser", "run"]


@dataclass
class MergeArguments:
    """Arguments of `emo-calibrate merge` (see `emo_calibrate.merge_adapter` for the full story)."""

    adapter_path: str = field(
        metadata={"help": "Adapter folder written by `emo-calibrate train` / `save_pretrained` (adapter_config.json)."}
    )
    output_dir: str = field(
        metadata={"help": "Folder for the merged model. Refused if it exists and is not empty, unless --overwrite."}
    )
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Base model (folder or id). Default: `base_model_name_or_path` of the adapter's config."},
    )
    merge_base: str | None = field(
        default=None,
        metadata={
            "help": "`original`: merge into the unquantised checkpoint (W + BA). `dequantized`: rebuild the base in "
            "4-bit as in training, check its codes against the adapter's record, dequantise, merge (deq(W_4bit) + "
            "BA). Default: the base the adapter was trained on, from its record (emo_training.json); `original` "
            "without a record.",
            "choices": ["dequantized", "original"],
        },
    )
    dtype: str = field(
        default="bfloat16",
        metadata={"help": "Dtype of the merged weights.", "choices": ["bfloat16", "float16", "float32"]},
    )
    device: str | None = field(
        default=None,
        metadata={
            "help": "Device the merge runs on. Default: where the adapter's record says its 4-bit base was quantised "
            "(when available here), else cpu.",
            "choices": ["cpu", "cuda"],
        },
    )
    overwrite: bool = field(default=False, metadata={"help": "Replace a non-empty --output_dir."})
    skip_parity_check: bool = field(
        default=False,
        metadata={
            "help": "Do not compare the merged model with the adapter model before writing it. Not recommended: "
            "the check is what proves the merged model is the one you trained."
        },
    )
    allow_code_mismatch: bool = field(
        default=False,
        metadata={
            "help": "Merge even if the rebuilt 4-bit codes differ from the adapter's record (the base is then not "
            "the one trained on); the card and report record the difference. Without it such a merge stops (exit 2)."
        },
    )
    parity_max_abs_logit_diff: float | None = field(
        default=None,
        metadata={"help": "Parity tolerance on the max absolute logit difference; None: the dtype's (docs/merge.md)."},
    )
    parity_mean_kl: float | None = field(
        default=None,
        metadata={"help": "Parity tolerance on the mean KL of next-token distributions (nats); None: the dtype's."},
    )
    bnb_4bit_quant_type: str | None = field(
        default=None,
        metadata={
            "help": "Override the 4-bit type of the rebuilt base. None: the adapter's record, else nf4.",
            "choices": ["nf4", "fp4"],
        },
    )
    bnb_4bit_use_double_quant: bool | None = field(
        default=None,
        metadata={"help": "Override double quantisation of the rebuilt base. None: the adapter's record, else true."},
    )
    max_shard_size: str = field(default="5GB", metadata={"help": "Maximum size of one safetensors shard."})


def make_parser():
    from trl import TrlParser

    return TrlParser((MergeArguments,), prog="emo-calibrate merge", description=__doc__.splitlines()[0])


def run(argv: list[str] | None = None) -> int:
    import logging

    from emo_calibrate.export.merge import ParityError, merge_adapter

    (args,) = make_parser().parse_args_and_config(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    kwargs = vars(args).copy()
    kwargs["check_parity"] = not kwargs.pop("skip_parity_check")
    try:
        report = merge_adapter(**kwargs)
    except (ValueError, ParityError) as err:  # refusals exit with 2, a failed parity check with 1
        print(f"emo-calibrate merge: error: {err}", file=sys.stderr)
        return 2 if isinstance(err, ValueError) else 1
    print(report.summary())
    print(f"merged model written to {report.output_dir}")
    return 0
