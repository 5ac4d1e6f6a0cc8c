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
from typing import Literal


__all__ = ["MergeArguments", "make_parser", "run"]


@dataclass
class MergeArguments:
    """Arguments of `emo-calibrate merge`: those of `emo_calibrate.merge_adapter`, whose docstring tells more."""

    adapter_path: str = field(
        metadata={"help": "Adapter folder (adapter_config.json), e.g. from emo-calibrate train."}
    )
    output_dir: str = field(metadata={"help": "Folder for the merged model; must be empty unless --overwrite."})
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Base model (folder or id). Default: the adapter's base_model_name_or_path."}
    )
    merge_base: Literal["dequantized", "original"] | None = field(
        default=None,
        metadata={
            "help": "original: the unquantised checkpoint (W + BA). dequantized: the 4-bit base rebuilt as in "
            "training, its codes checked, dequantised (deq(W_4bit) + BA). Default: the base the adapter was trained "
            "on, from its record (emo_training.json); original without a record."
        },
    )
    dtype: Literal["bfloat16", "float16", "float32"] = field(
        default="bfloat16", metadata={"help": "Dtype of the merged weights."}
    )
    device: Literal["cpu", "cuda"] | None = field(
        default=None, metadata={"help": "Default: where the record says the 4-bit base was quantised, else cpu."}
    )
    overwrite: bool = field(default=False, metadata={"help": "Replace a non-empty --output_dir."})
    skip_parity_check: bool = field(
        default=False, metadata={"help": "Do not prove that the merged model is the adapter model (not advised)."}
    )
    allow_code_mismatch: bool = field(
        default=False, metadata={"help": "Merge even if the rebuilt 4-bit codes differ from the adapter's record."}
    )
    parity_max_abs_logit_diff: float | None = field(
        default=None, metadata={"help": "Parity bound on the max abs logit difference. Default: the dtype's."}
    )
    parity_mean_kl: float | None = field(
        default=None, metadata={"help": "Parity bound on the mean KL (nats). Default: the dtype's."}
    )
    bnb_4bit_quant_type: Literal["nf4", "fp4"] | None = field(
        default=None, metadata={"help": "Override the 4-bit type of the rebuilt base. Default: the record's, or nf4."}
    )
    bnb_4bit_use_double_quant: bool | None = field(
        default=None, metadata={"help": "Override double quantisation of the rebuilt base. Default: the record's."}
    )
    max_shard_size: str = field(default="5GB", metadata={"help": "Maximum size of one safetensors shard."})


def make_parser():
    from trl import TrlParser

    return TrlParser((MergeArguments,), prog="emo-calibrate merge", description=__doc__.splitlines()[0])


def run(argv: list[str] | None = None) -> int:
    from emo_calibrate.export.merge import ParityError, merge_adapter

    (args,) = make_parser().parse_args_and_config(argv)
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
