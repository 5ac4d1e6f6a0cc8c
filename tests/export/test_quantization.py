"""The CPU repacking guard of bitsandbytes 4-bit models (the 4-bit record and its hashes: test_records.py)."""

import pytest
import torch
from tiny_models import nf4_config


bnb = pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def wide_tiny_dir(tmp_path_factory):
    """A tiny Llama whose linear layers have out_features divisible by 32.

    bitsandbytes only repacks such weights; on the 16-wide conftest models the repack asserts instead of corrupting.
    """
    from tiny_models import build_tokenizer, tiny_config
    from transformers import AutoModelForCausalLM

    config = tiny_config("llama")
    config.hidden_size, config.intermediate_size, config.head_dim = 64, 128, 16
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("wide-tiny")
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    return str(path)


def _load_4bit(path):
    from transformers import AutoModelForCausalLM

    # device_map: with a GPU visible, bitsandbytes would otherwise place the model on it.
    return AutoModelForCausalLM.from_pretrained(
        path, quantization_config=nf4_config(), dtype=torch.float32, device_map="cpu"
    )


def _dequantized_weights(model) -> dict:
    return {
        name: bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state).clone()
        for name, module in model.named_modules()
        if isinstance(module, bnb.nn.Linear4bit)
    }


def _eval_forward(model):
    model.eval()
    with torch.no_grad():
        model(input_ids=torch.arange(4, 20).view(2, 8))


def test_disable_cpu_4bit_repacking_counts_and_clears_flags(tiny_llama_dir):
    from peft import LoraConfig, get_peft_model

    from emo_calibrate.utils.quantization import disable_cpu_4bit_repacking

    model = _load_4bit(tiny_llama_dir)
    assert disable_cpu_4bit_repacking(model) == 14  # 2 layers x (q, k, v, o, gate, up, down)
    assert all(not m.support_avx512bf16_for_cpu for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
    # Reaches through a PEFT wrapper too.
    assert disable_cpu_4bit_repacking(get_peft_model(model, LoraConfig(target_modules="all-linear"))) == 14


def test_disable_cpu_4bit_repacking_is_a_no_op_without_4bit_layers(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    from emo_calibrate.utils.quantization import disable_cpu_4bit_repacking

    assert disable_cpu_4bit_repacking(AutoModelForCausalLM.from_pretrained(tiny_llama_dir)) == 0


def test_dequantize_stays_exact_after_eval_forward_with_the_fix(wide_tiny_dir):
    from emo_calibrate.utils.quantization import disable_cpu_4bit_repacking

    model = _load_4bit(wide_tiny_dir)
    disable_cpu_4bit_repacking(model)
    before = _dequantized_weights(model)
    _eval_forward(model)
    after = _dequantized_weights(model)
    assert before.keys() == after.keys() and len(before) == 14
    for name in before:
        assert torch.equal(before[name], after[name]), name
    assert not any(
        getattr(m.weight.quant_state, "packing_format_for_cpu", False)
        for m in model.modules()
        if isinstance(m, bnb.nn.Linear4bit)
    )


@pytest.mark.skipif(
    not bnb.functional.has_avx512bf16(),
    reason="the repack only happens on CPUs with AVX512-BF16 (bitsandbytes' has_avx512bf16() is False here)",
)
def test_without_the_fix_an_eval_forward_corrupts_dequantize(wide_tiny_dir):
    """Documents why the fix exists: on AVX512-BF16 CPUs, bitsandbytes 0.50 repacks 4-bit weights in place on the
    first eval/no-grad forward, and `dequantize` then returns garbage. If this test starts failing, bitsandbytes has
    fixed the hazard and `disable_cpu_4bit_repacking` may be dropped."""
    model = _load_4bit(wide_tiny_dir)
    before = _dequantized_weights(model)
    _eval_forward(model)
    assert any(
        m.weight.quant_state.packing_format_for_cpu for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)
    )
    after = _dequantized_weights(model)
    assert any(before[n].shape != after[n].shape or not torch.equal(before[n], after[n]) for n in before)
