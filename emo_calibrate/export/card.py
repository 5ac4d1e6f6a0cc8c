"""The model card (`README.md`) of a merged model: `huggingface_hub.ModelCard` from a Jinja template."""

import os

from .records import RECORD_NAME, describe_code_check


__all__ = ["model_card"]

_TEMPLATE = """---
{{ card_data }}
---

# {{ title }} + EMO adapter (merged)

A LoRA adapter trained with emo_calibrate (EMO, Earth Mover Distance Optimization, Ren et al., ICLR 2024) merged into \
its base model: a plain `transformers` checkpoint, loaded without PEFT or bitsandbytes.

| | |
| --- | --- |
| base model | `{{ r.base_model }}` |
| adapter | `{{ r.adapter_path }}` |
| trained on | the {{ r.trained_base }} base ({{ r.quantization_source }}) |
| merge base | `{{ r.merge_base }}`: {{ "deq(W_4bit) + s·BA" if r.merge_base == "dequantized" else "W + s·BA" }} \
({{ r.merge_base_reason }}) |
| dtype | `{{ r.dtype }}` (merged on {{ r.device }}) |
| vocabulary | {{ r.vocab_size }}{{ " (resized by the adapter)" if r.resized_embeddings }} |
{% if r.quantization %}| 4-bit settings | `{{ r.quantization | tojson }}` |
{% endif %}{% if code_check %}| 4-bit codes vs the record | {{ code_check }} |
{% endif %}
## EMO training settings

{% for key, value in r.emo_settings.items() %}- `{{ key }}`: {{ value }}
{% else %}Unknown: the adapter folder has no {{ record_name }} (written by `EMOTrainer.save_model`), so the EMO \
settings, the precision and the base the adapter was trained on are not recorded.
{% endfor %}
## Parity check

{% if not r.parity %}**Skipped** at merge time: the merged weights were not verified against the adapter model.
{% else %}Fixed prompts, every position's next-token distribution; merged model reloaded from this folder. Tolerance: \
max abs logit diff ≤ {{ "%.3g" % r.tolerance.max_abs_logit_diff }}, mean KL ≤ {{ "%.3g" % r.tolerance.mean_kl }}.

| compared with | max abs logit diff | mean KL (nats) | max KL | positions |
| --- | --- | --- | --- | --- |
{% for name, p in rows %}| {{ name }} | {{ "%.3g" % p.max_abs_logit_diff }} | {{ "%.3g" % p.mean_kl }} | \
{{ "%.3g" % p.max_kl }} | {{ p.num_positions }} |
{% endfor %}{% endif %}"""


def model_card(report):
    """A `huggingface_hub.ModelCard` for a `MergeReport`: base, adapter, training record, merge base, parity."""
    from huggingface_hub import ModelCard, ModelCardData

    r = report.to_dict()
    rows = []
    if report.parity is not None:
        rows.append((f"unmerged adapter on the {report.merge_base} base (gated)", r["parity"]))
    if report.parity_vs_trained is not None:
        rows.append((f"adapter on the {report.trained_base} base, as trained", r["parity_vs_trained"]))
    data = ModelCardData(
        base_model=report.base_model,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["emo_calibrate", "emo", "merged-lora"],
    )
    return ModelCard.from_template(
        data,
        template_str=_TEMPLATE,
        r=r,
        title=os.path.basename(report.base_model.rstrip("/")) or report.base_model,
        code_check=describe_code_check(report.code_check) if report.code_check else None,
        rows=rows,
        record_name=RECORD_NAME,
    )
