"""`emo-calibrate merge`: merge a (Q)LoRA adapter into its base model for deployment.

    # the adapter's base, dequantised exactly as trained (the default), bf16 weights:
    emo-calibrate merge --adapter_path runs/emo-smollm2 --output_dir runs/emo-smollm2-merged
    # the original unquantised checkpoint instead, fp32, on a GPU:
    emo-calibrate merge --adapter_path runs/emo-smollm2 --output_dir merged --merge_base original --dtype float32 \
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
    merge_base: str = field(
        default="dequantized",
        metadata={
            "help": "`dequantized`: load the base in 4-bit as in training, dequantise, merge (reproduces the trained "
            "model). `original`: merge into the unquantised checkpoint (W + BA; the adapter was trained against the "
            "4-bit weights, the report shows the cost).",
            "choices": ["dequantized", "original"],
        },
    )
    dtype: str = field(
        default="bfloat16",
        metadata={"help": "Dtype of the merged weights.", "choices": ["bfloat16", "float16", "float32"]},
    )
    device: str = field(default="cpu", metadata={"help": "Device the merge runs on.", "choices": ["cpu", "cuda"]})
    overwrite: bool = field(default=False, metadata={"help": "Replace a non-empty --output_dir."})
    skip_parity_check: bool = field(
        default=False,
        metadata={
            "help": "Do not compare the merged model with the adapter model before writing it. Not recommended: "
            "the check is what proves the merged model is the one you trained."
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
            "help": "Override the 4-bit type used in training. None: the adapter's record, else nf4.",
            "choices": ["nf4", "fp4"],
        },
    )
    bnb_4bit_use_double_quant: bool | None = field(
        default=None,
        metadata={"help": "Override double quantisation used in training. None: the adapter's record, else true."},
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
    try:
        report = merge_adapter(
            args.adapter_path,
            args.output_dir,
            model_name_or_path=args.model_name_or_path,
            merge_base=args.merge_base,
            dtype=args.dtype,
            device=args.device,
            overwrite=args.overwrite,
            check_parity=not args.skip_parity_check,
            parity_max_abs_logit_diff=args.parity_max_abs_logit_diff,
            parity_mean_kl=args.parity_mean_kl,
            bnb_4bit_quant_type=args.bnb_4bit_quant_type,
            bnb_4bit_use_double_quant=args.bnb_4bit_use_double_quant,
            max_shard_size=args.max_shard_size,
        )
    except (ValueError, ParityError) as err:
        print(f"emo-calibrate merge: error: {err}", file=sys.stderr)
        return 2 if isinstance(err, ValueError) else 1
    print(report.summary())
    print(f"merged model written to {report.output_dir}")
    return 0
