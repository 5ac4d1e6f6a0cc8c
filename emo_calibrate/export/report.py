"""`MergeReport`: one merge from its inputs (resolved by plan.py) to its results (filled in by merge.py).

`facts()` is the one source of what is said about a merge: `summary()` prints it as text (`emo-calibrate merge`), the
model card (`README.md`, a `huggingface_hub.ModelCard`) as a table; `to_dict()` is `merge_report.json`.
"""

import os
from dataclasses import asdict, dataclass, field

from .parity import ParityResult
from .records import describe_code_check


__all__ = ["MergeReport", "model_card"]


@dataclass
class MergeReport:
    """What a merge was asked to do, what it did, and how faithful the result is.

    Attributes:
        adapter_path / output_dir / base_model / dtype / device / tokenizer_source (`str`): the resolved inputs: the
            merged weights' dtype, the device the merge runs on, the folder the tokenizer comes from.
        merge_base (`str`): `"dequantized"` or `"original"`; `merge_base_reason` says why (default rule or request).
        trained_base (`str`): what the adapter was trained on: `"4-bit"`, `"unquantised"`, `"unknown"` (no record) or
            `"other quantisation"`; `trained_dtype` the dtype its weights were loaded in (else `dtype`).
        quantization (`dict | None`): the `BitsAndBytesConfig` that rebuilds the trained 4-bit base (None when the
            checkpoint is itself 4-bit or no 4-bit base is involved); `quantization_source` says where it came from.
        resize_embeddings_to (`int | None`): rows of the embeddings the adapter saved when it resized the vocabulary.
        training_record (`dict | None`): the adapter's `emo_training.json` (records.py); `emo_settings` its settings.
        code_check (`dict | None`): the rebuilt 4-bit codes against the record (`records.check_codes`).
        parity (`ParityResult | None`): merged model (reloaded from disk) vs the unmerged adapter model on the same
            merge base and dtype, the gated check with bounds `tolerance`; None when skipped.
        parity_vs_trained (`ParityResult | None`): merged model vs the adapter on the base as trained (4-bit with
            float32 compute, or the unquantised base in its training dtype); reported, not gated.
        vocab_size (`int`) / seconds (`dict`): rows of the merged embedding; wall time per phase.
    """

    adapter_path: str
    output_dir: str
    base_model: str
    merge_base: str
    merge_base_reason: str
    dtype: str
    device: str
    trained_base: str
    trained_dtype: str
    quantization: dict | None
    quantization_source: str
    tokenizer_source: str
    resize_embeddings_to: int | None = None
    training_record: dict | None = None
    code_check: dict | None = None
    vocab_size: int | None = None
    parity: ParityResult | None = None
    parity_vs_trained: ParityResult | None = None
    tolerance: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.parity is None or self.parity.within(**self.tolerance)

    @property
    def emo_settings(self) -> dict:
        return (self.training_record or {}).get("settings") or {}

    def to_dict(self) -> dict:
        return asdict(self)

    def facts(self) -> dict[str, str]:
        """What the summary and the model card say about this merge: label -> Markdown text (facts that do not apply
        to this merge are left out)."""
        formula = "deq(W_4bit) + s·BA" if self.merge_base == "dequantized" else "W + s·BA"
        bnb = ", ".join(f"{k}={v}" for k, v in (self.quantization or {}).items() if k.startswith("bnb_4bit"))
        gated = "**Skipped**: the merged weights were not verified against the adapter model"
        if self.parity is not None:
            t, verdict = self.tolerance, "PASSED" if self.passed else "FAILED"
            gated = (
                f"vs the unmerged adapter on the {self.merge_base} base: {_figures(self.parity)}; tolerance "
                f"{t['max_abs_logit_diff']:.3g} / {t['mean_kl']:.3g}: {verdict}"
            )
        facts = {
            "base model": f"`{self.base_model}`",
            "adapter": f"`{self.adapter_path}`",
            "trained on": f"the {self.trained_base} base ({self.quantization_source})",
            "merge base": f"`{self.merge_base}`: {formula} ({self.merge_base_reason})",
            "dtype": f"`{self.dtype}` (merged on {self.device})",
            "vocabulary": f"{self.vocab_size}" + (" (resized by the adapter)" if self.resize_embeddings_to else ""),
            "4-bit settings": bnb and f"{bnb}, load_dtype={self.trained_dtype}",
            "4-bit codes vs the record": self.code_check and describe_code_check(self.code_check),
            "parity check": gated,
            f"vs the adapter as trained ({self.trained_base} base)": self.parity_vs_trained
            and _figures(self.parity_vs_trained),
        }
        return {label: text for label, text in facts.items() if text}

    def summary(self) -> str:
        """The facts as plain text, one per line, and the time per phase."""
        lines = [f"{label}: {text}".replace("`", "").replace("**", "") for label, text in self.facts().items()]
        return "\n".join([*lines, "time: " + ", ".join(f"{k} {v:.1f}s" for k, v in self.seconds.items())])


def _figures(p: ParityResult) -> str:
    return (
        f"max abs logit diff {p.max_abs_logit_diff:.3g}, mean KL {p.mean_kl:.3g} nats (max {p.max_kl:.3g}) over "
        f"{p.num_positions} positions"
    )


_TEMPLATE = """---
{{ card_data }}
---

# {{ title }} + EMO adapter (merged)

A LoRA adapter trained with emo_calibrate (EMO, Earth Mover Distance Optimization, Ren et al., ICLR 2024) merged into \
its base model: a plain `transformers` checkpoint, loaded without PEFT or bitsandbytes. The parity figures compare \
every position's next-token distribution on fixed prompts, with the merged model reloaded from this folder.

| | |
| --- | --- |
{% for label, text in report.facts().items() %}| {{ label }} | {{ text }} |
{% endfor %}
## EMO training settings

{% for key, value in report.emo_settings.items() %}- `{{ key }}`: {{ value }}
{% else %}{% if report.training_record %}Unknown: the adapter's emo_training.json records no EMO settings (it was \
saved without the training arguments).{% else %}Unknown: the adapter folder has no emo_training.json (written by \
`EMOTrainer.save_model`), so the EMO settings, the precision and the base the adapter was trained on are not recorded.\
{% endif %}
{% endfor %}"""


def model_card(report: MergeReport):
    """The `huggingface_hub.ModelCard` of a merged model: its facts as a table, and the EMO settings of its record."""
    from huggingface_hub import ModelCard, ModelCardData

    tags = ["emo_calibrate", "emo", "merged-lora"]
    data = ModelCardData(
        base_model=report.base_model, library_name="transformers", pipeline_tag="text-generation", tags=tags
    )
    title = os.path.basename(report.base_model.rstrip("/")) or report.base_model
    return ModelCard.from_template(data, template_str=_TEMPLATE, title=title, report=report)
