"""merge_adapter, in the style of PEFT's `_test_merge_layers`.

Adapters are made directly with PEFT on the tiny models (`init_lora_weights=False`, so the adapter is not the identity),
on a 4-bit NF4 base as QLoRA training would, and saved to tmp with the training record `EMOTrainer.save_model` writes.
References are built here independently of the library: the unmerged adapter model on the same base, and PEFT's own
in-memory merge. Adapters trained by `EMOTrainer` itself, and the record's checks: test_records.py.
"""

import json
import os

import pytest
import torch


pytest.importorskip("bitsandbytes")
from tiny_models import nf4_config  # noqa: E402


IDS = torch.tensor([[2, 4, 9, 17, 30, 5, 61, 8, 100, 3, 7, 12], [2, 40, 41, 42, 6, 5, 4, 90, 91, 92, 93, 94]])


def _load(path, quantized=False, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    from emo_calibrate.utils.quantization import disable_cpu_4bit_repacking

    kwargs = {"quantization_config": nf4_config()} if quantized else {}
    # device_map: with a GPU visible, bitsandbytes would otherwise place the 4-bit model on it.
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map="cpu", **kwargs)
    disable_cpu_4bit_repacking(model)
    return model


def _with_adapter(model, adapter_dir):
    from peft import PeftModel

    from emo_calibrate.utils.quantization import disable_cpu_4bit_repacking

    model = PeftModel.from_pretrained(model, adapter_dir)
    disable_cpu_4bit_repacking(model)
    return model


def _logits(model):
    model.eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


def _make_adapter(base_dir, out_dir, quantized=True, seed=0, tokenizer=None):
    from peft import LoraConfig, get_peft_model
    from tiny_models import build_tokenizer

    from emo_calibrate.export.records import save_training_record

    model = _load(base_dir, quantized=quantized)
    if tokenizer is not None and len(tokenizer) > model.config.vocab_size:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    torch.manual_seed(seed)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    model.save_pretrained(out_dir, save_embedding_layers=tokenizer is not None)  # resized vocabularies need them
    (tokenizer or build_tokenizer()).save_pretrained(out_dir)
    save_training_record(model, out_dir)
    return str(out_dir)


@pytest.fixture(scope="module")
def qlora_adapter(tiny_llama_dir, tmp_path_factory):
    return _make_adapter(tiny_llama_dir, tmp_path_factory.mktemp("qlora-adapter"))


@pytest.fixture(scope="module")
def merged_dirs(qlora_adapter, tmp_path_factory):
    """One merge per (merge_base, dtype), shared by the tests that only read the results."""
    from emo_calibrate import merge_adapter

    root = tmp_path_factory.mktemp("merged")
    out = {}
    for merge_base in ("dequantized", "original"):
        for dtype in ("float32", "bfloat16"):
            path = root / f"{merge_base}-{dtype}"
            out[merge_base, dtype] = (path, merge_adapter(qlora_adapter, path, merge_base=merge_base, dtype=dtype))
    return out


def _reference_logits(merge_base, tiny_llama_dir, adapter_dir):
    """The unmerged adapter model on the same base, in float32."""
    return _logits(_with_adapter(_load(tiny_llama_dir, quantized=merge_base == "dequantized"), adapter_dir))


@pytest.mark.parametrize("merge_base", ["dequantized", "original"])
def test_merged_logits_equal_adapter_logits(merged_dirs, merge_base, tiny_llama_dir, qlora_adapter):
    reference = _reference_logits(merge_base, tiny_llama_dir, qlora_adapter)
    path, report = merged_dirs[merge_base, "float32"]
    torch.testing.assert_close(_logits(_load(path)), reference, atol=1e-4, rtol=1e-4)
    # bf16: compare probabilities, as PEFT's 4-bit merge test does (logits have outliers).
    path, report_bf16 = merged_dirs[merge_base, "bfloat16"]
    merged_bf16 = _logits(_load(path, dtype=torch.bfloat16))
    torch.testing.assert_close(merged_bf16.softmax(-1), reference.softmax(-1), atol=2e-2, rtol=0)
    for r in (report, report_bf16):
        assert r.passed and r.parity.num_positions > 0 and r.merge_base == merge_base
    assert report.parity.max_abs_logit_diff < 1e-4 < report_bf16.parity.max_abs_logit_diff


def test_dequantized_reproduces_the_4bit_model_and_original_does_not(merged_dirs):
    dequantized = merged_dirs["dequantized", "float32"][1].parity_vs_trained
    original = merged_dirs["original", "float32"][1].parity_vs_trained
    assert dequantized.mean_kl < 1e-8 and dequantized.max_abs_logit_diff < 1e-4
    assert original.mean_kl > 1e-4  # the quantisation gap the adapter was not trained on


def test_merged_differs_from_base(merged_dirs, tiny_llama_dir):
    base = _logits(_load(tiny_llama_dir))
    assert (_logits(_load(merged_dirs["original", "float32"][0])) - base).abs().max() > 0.1


def test_output_is_a_plain_model_folder(merged_dirs):
    from peft.tuners.tuners_utils import BaseTunerLayer
    from transformers import AutoModelForCausalLM

    for (merge_base, dtype), (path, report) in merged_dirs.items():
        files = set(os.listdir(path))
        assert {"config.json", "generation_config.json", "README.md", "merge_report.json"} <= files
        assert "tokenizer.json" in files and any(f.endswith(".safetensors") for f in files)
        assert not any(f.startswith("adapter_") for f in files)
        config = json.loads((path / "config.json").read_text())
        assert "quantization_config" not in config and config["dtype"] == dtype
        model = AutoModelForCausalLM.from_pretrained(path, dtype="auto")
        assert getattr(model, "hf_quantizer", None) is None and not getattr(model, "is_loaded_in_4bit", False)
        assert all(p.dtype == getattr(torch, dtype) and type(p).__name__ == "Parameter" for p in model.parameters())
        assert not any(isinstance(m, BaseTunerLayer) for m in model.modules())
        assert not any("lora" in name for name, _ in model.named_parameters())
        card = (path / "README.md").read_text()
        assert f"`{merge_base}`" in card and f"{report.parity.mean_kl:.3g}" in card and report.base_model in card
        assert json.loads((path / "merge_report.json").read_text())["parity"]["mean_kl"] == report.parity.mean_kl
        assert not [f for f in os.listdir(path.parent) if f.startswith(".")]  # no stray temp folders
        umask = os.umask(0)
        os.umask(umask)
        assert os.stat(path).st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's private 0o700
        assert all(os.stat(path / f).st_mode & 0o777 == 0o666 & ~umask for f in files)  # servers can read them
        assert report.quantization["bnb_4bit_use_double_quant"] is True


def test_the_summary_and_the_card_state_the_same_facts(merged_dirs):
    """One source (`MergeReport.facts`): the CLI/log summary and the model card say the same, figures included."""
    for path, report in merged_dirs.values():
        card, summary = (path / "README.md").read_text(), report.summary()
        for fact in (f"{report.parity.mean_kl:.3g}", f"{report.parity_vs_trained.max_abs_logit_diff:.3g}", "PASSED",
                     report.merge_base_reason, report.quantization_source, "match: 3 of 3 blocks"):  # fmt: skip
            assert fact in card and fact in summary, fact
        for label, text in report.facts().items():
            assert f"| {label} | {text} |" in card
            assert f"{label}: {text}".replace("`", "").replace("**", "") in summary


def test_a_record_without_emo_settings_is_not_called_missing(merged_dirs):
    """The adapter's record was written without training arguments: the card must not say the record is absent."""
    card = (merged_dirs["original", "float32"][0] / "README.md").read_text()
    assert "has no emo_training.json" not in card
    assert "Unknown: the adapter's emo_training.json records no EMO settings" in card


def test_reload_from_disk_is_identical_to_the_in_memory_merge(merged_dirs, tiny_llama_dir, qlora_adapter):
    in_memory = _with_adapter(_load(tiny_llama_dir), qlora_adapter).merge_and_unload(safe_merge=True)
    reloaded = _load(merged_dirs["original", "float32"][0])
    reloaded_state = reloaded.state_dict()
    for name, tensor in in_memory.state_dict().items():
        assert torch.equal(tensor, reloaded_state[name]), name
    assert torch.equal(_logits(in_memory), _logits(reloaded))


def test_tied_embeddings(tiny_tied_dir, tmp_path):
    from emo_calibrate import merge_adapter

    adapter = _make_adapter(tiny_tied_dir, tmp_path / "adapter")
    report = merge_adapter(adapter, tmp_path / "merged", dtype="float32")
    merged = _load(tmp_path / "merged")
    assert merged.lm_head.weight.data_ptr() == merged.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(
        _logits(merged), _reference_logits("dequantized", tiny_tied_dir, adapter), atol=1e-4, rtol=1e-4
    )
    assert report.parity_vs_trained.mean_kl < 1e-8


def test_resized_embeddings_are_carried_over(tiny_llama_dir, tmp_path):
    from tiny_models import build_tokenizer

    from emo_calibrate import merge_adapter

    tokenizer = build_tokenizer()
    tokenizer.add_tokens([f"<new{i}>" for i in range(132 - len(tokenizer))])  # 132 tokens; the model has 128 rows
    adapter = _make_adapter(tiny_llama_dir, tmp_path / "adapter", quantized=False, tokenizer=tokenizer)
    report = merge_adapter(adapter, tmp_path / "merged", merge_base="original", dtype="float32")
    assert report.resize_embeddings_to == report.vocab_size == len(tokenizer)
    base = _load(tiny_llama_dir)
    base.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    torch.testing.assert_close(
        _logits(_load(tmp_path / "merged")), _logits(_with_adapter(base, adapter)), atol=1e-4, rtol=1e-4
    )


# ---- refusals: each is a ValueError naming the problem, raised before anything is written ----


def test_refuses_a_non_empty_output_dir_unless_overwrite(qlora_adapter, tmp_path):
    from emo_calibrate import merge_adapter

    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not empty.*overwrite"):
        merge_adapter(qlora_adapter, out, dtype="float32")
    assert (out / "old.txt").read_text() == "keep me"
    merge_adapter(qlora_adapter, out, dtype="float32", overwrite=True)
    assert not (out / "old.txt").exists() and (out / "config.json").exists()
    assert sorted(os.listdir(tmp_path)) == ["out"]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"merge_base": "requantized"}, "merge_base"),
        ({"dtype": "int8"}, "dtype"),
        ({"device": "tpu"}, "device"),
    ],
)
def test_refuses_bad_arguments(qlora_adapter, tmp_path, kwargs, match):
    from emo_calibrate import merge_adapter

    with pytest.raises(ValueError, match=match):
        merge_adapter(qlora_adapter, tmp_path / "out", **kwargs)
    assert os.listdir(tmp_path) == []


def test_refuses_a_folder_without_adapter(tiny_llama_dir, tmp_path):
    from emo_calibrate import merge_adapter

    with pytest.raises(ValueError, match="adapter_config.json"):
        merge_adapter(tiny_llama_dir, tmp_path / "out")


def test_refuses_to_write_over_the_adapter(qlora_adapter):
    from emo_calibrate import merge_adapter

    with pytest.raises(ValueError, match="would replace the adapter folder"):
        merge_adapter(qlora_adapter, qlora_adapter, overwrite=True)
    assert os.path.isfile(os.path.join(qlora_adapter, "adapter_config.json"))


def test_refuses_a_base_with_another_vocabulary(qlora_adapter, tmp_path):
    from tiny_models import build_tiny_model, build_tokenizer

    from emo_calibrate import merge_adapter

    other = tmp_path / "other-base"
    build_tiny_model(vocab_size=120).save_pretrained(other)
    build_tokenizer().save_pretrained(other)
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        merge_adapter(qlora_adapter, tmp_path / "out", model_name_or_path=str(other))
    assert not (tmp_path / "out").exists()


def test_refuses_a_tokenizer_larger_than_the_embedding(qlora_adapter, tmp_path):
    import shutil

    from transformers import AutoTokenizer

    from emo_calibrate import merge_adapter

    adapter = tmp_path / "adapter"
    shutil.copytree(qlora_adapter, adapter)
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    tokenizer.add_tokens([f"<extra{i}>" for i in range(140 - len(tokenizer))])  # 140 tokens, 128 rows, none saved
    tokenizer.save_pretrained(adapter)
    with pytest.raises(ValueError, match="vocabulary mismatch.*saved no resized embeddings"):
        merge_adapter(adapter, tmp_path / "out")


@pytest.mark.parametrize("merge_base", ["dequantized", "original"])
def test_refuses_a_quantised_base_checkpoint(qlora_adapter, tiny_llama_dir, tmp_path, merge_base):
    import shutil

    from emo_calibrate import merge_adapter

    base = tmp_path / "gptq-base"
    shutil.copytree(tiny_llama_dir, base)
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (base / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="base checkpoint is quantised"):
        merge_adapter(qlora_adapter, tmp_path / "out", model_name_or_path=str(base), merge_base=merge_base)


def test_a_base_saved_in_4bit_is_used_as_is_by_dequantized_only(qlora_adapter, tiny_llama_dir, tmp_path):
    from tiny_models import build_tokenizer

    from emo_calibrate import merge_adapter

    base4 = tmp_path / "base-4bit"
    _load(tiny_llama_dir, quantized=True).save_pretrained(base4)
    build_tokenizer().save_pretrained(base4)
    report = merge_adapter(qlora_adapter, tmp_path / "out", model_name_or_path=str(base4), dtype="float32")
    assert report.quantization_source.startswith("base checkpoint") and report.parity_vs_trained.mean_kl < 1e-8
    with pytest.raises(ValueError, match="base checkpoint is quantised"):
        merge_adapter(qlora_adapter, tmp_path / "out2", model_name_or_path=str(base4), merge_base="original")


# ---- atomicity and the parity gate ----


def test_a_failure_mid_write_leaves_nothing(qlora_adapter, tmp_path, monkeypatch):
    import emo_calibrate.export.merge as merge_module

    def fail(report):
        folder = next(tmp_path.glob(".out.merging-*"))
        assert any(f.suffix == ".safetensors" for f in folder.iterdir())  # the weights are already written
        raise OSError("disk full")

    monkeypatch.setattr(merge_module, "model_card", fail)
    with pytest.raises(OSError, match="disk full"):
        merge_module.merge_adapter(qlora_adapter, tmp_path / "out", dtype="float32")
    assert os.listdir(tmp_path) == []
    # With --overwrite, a failure leaves the previous output untouched.
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("previous model")
    with pytest.raises(OSError, match="disk full"):
        merge_module.merge_adapter(qlora_adapter, tmp_path / "out", dtype="float32", overwrite=True)
    assert os.listdir(tmp_path) == ["out"] and os.listdir(tmp_path / "out") == ["old.txt"]


def test_a_corrupted_merge_fails_parity_and_writes_nothing(qlora_adapter, tmp_path, monkeypatch):
    from peft.tuners.lora import LoraModel

    from emo_calibrate import merge_adapter
    from emo_calibrate.export.merge import ParityError

    real_merge = LoraModel.merge_and_unload

    def corrupted(self, *args, **kwargs):  # PEFT's merge, then one layer's weights negated
        merged = real_merge(self, *args, **kwargs)
        with torch.no_grad():
            merged.model.layers[0].mlp.down_proj.weight.mul_(-1.0)
        return merged

    monkeypatch.setattr(LoraModel, "merge_and_unload", corrupted)
    with pytest.raises(ParityError, match="parity check failed") as info:
        merge_adapter(qlora_adapter, tmp_path / "out", dtype="float32")
    assert not info.value.report.passed and info.value.report.parity.mean_kl > 1e-6
    assert os.listdir(tmp_path) == []


def test_a_zero_tolerance_fails_and_skipping_the_check_does_not(qlora_adapter, tmp_path):
    from emo_calibrate import merge_adapter
    from emo_calibrate.export.merge import ParityError

    with pytest.raises(ParityError, match="FAILED"):
        merge_adapter(qlora_adapter, tmp_path / "out", parity_max_abs_logit_diff=0.0, parity_mean_kl=0.0)
    assert os.listdir(tmp_path) == []
    report = merge_adapter(qlora_adapter, tmp_path / "out", check_parity=False)
    assert report.parity is None and report.passed
    assert "**Skipped**" in (tmp_path / "out" / "README.md").read_text()


def test_without_a_record_the_default_is_the_original_base_and_dequantized_assumes_nf4(qlora_adapter, tmp_path):
    """An adapter without a record (e.g. plain PEFT): the default invents no quantisation; dequantized must be asked."""
    import shutil

    from emo_calibrate import merge_adapter

    adapter = tmp_path / "adapter"
    shutil.copytree(qlora_adapter, adapter)
    os.remove(adapter / "emo_training.json")
    with pytest.raises(ValueError, match="no 4-bit base is involved"):
        merge_adapter(adapter, tmp_path / "out", bnb_4bit_quant_type="fp4")  # never silently ignored
    report = merge_adapter(adapter, tmp_path / "out", dtype="float32")
    assert (report.merge_base, report.trained_base, report.quantization) == ("original", "unknown", None)
    assert "merge_base='dequantized'" in report.merge_base_reason and report.code_check is None
    report = merge_adapter(adapter, tmp_path / "out2", merge_base="dequantized", dtype="float32")
    assert report.quantization_source.startswith("assumed") and report.trained_dtype == "float32"
    assert report.quantization["bnb_4bit_quant_type"] == "nf4" and report.quantization["bnb_4bit_use_double_quant"]
    # NF4 + double quantisation, loaded in float32: exactly how the adapter's base was quantised, so it is rebuilt
    assert report.parity_vs_trained.mean_kl < 1e-8 and report.code_check["status"] == "not recorded"
    report = merge_adapter(
        adapter, tmp_path / "out3", merge_base="dequantized", dtype="float32", bnb_4bit_use_double_quant=False
    )
    assert not report.quantization["bnb_4bit_use_double_quant"] and report.quantization_source.endswith("+ overrides")
    assert report.passed  # and another 4-bit base: the override is not ignored
    assert (_logits(_load(tmp_path / "out3")) - _logits(_load(tmp_path / "out2"))).abs().max() > 1e-4


# ---- CLI ----


def test_cli_help(capsys):
    from emo_calibrate.cli.main import main

    with pytest.raises(SystemExit) as info:
        main(["merge", "--help"])
    assert info.value.code == 0
    help_text = capsys.readouterr().out
    for option in ("--adapter_path", "--merge_base", "--dtype", "--device", "--overwrite", "--skip_parity_check"):
        assert option in help_text


def test_cli_run_and_refusal(qlora_adapter, tmp_path, capsys, caplog):
    import logging

    from emo_calibrate.cli.main import main

    caplog.set_level(logging.INFO)

    config = tmp_path / "merge.yaml"
    config.write_text(f"adapter_path: {qlora_adapter}\noutput_dir: {tmp_path / 'out'}\ndtype: bfloat16\n")
    assert main(["merge", "--config", str(config), "--dtype", "float32"]) == 0  # the command line wins
    assert "PASSED" in capsys.readouterr().out
    assert not any("PASSED" in record.getMessage() for record in caplog.records)  # printed once, not logged again
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "float32"
    argv = ["merge", "--adapter_path", qlora_adapter, "--output_dir", str(tmp_path / "out")]
    assert main(argv) == 2
    assert "not empty" in capsys.readouterr().err


# ---- GPU: the same merge with bitsandbytes' CUDA kernels ----


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("merge_base", ["dequantized", "original"])
def test_merge_on_cuda(qlora_adapter, tiny_llama_dir, tmp_path, merge_base):
    """The adapter's base was quantised on CPU; merging on CUDA re-quantises it there (docs/merge.md, open question)."""
    from emo_calibrate import merge_adapter

    kwargs = dict(merge_base=merge_base, dtype="float32", device="cuda")
    try:
        report = merge_adapter(qlora_adapter, tmp_path / "out", **kwargs)
    except ValueError as err:  # CUDA's NF4 codes differ from the CPU's for this base: refused, with the fix
        assert merge_base == "dequantized" and "--device cpu" in str(err)
        report = merge_adapter(qlora_adapter, tmp_path / "out", allow_code_mismatch=True, **kwargs)
        assert report.code_check["status"] == "mismatch"
    print(f"NF4 codes, CPU (record) vs CUDA (merge): {report.code_check and report.code_check['status']}")
    assert report.passed and report.parity.mean_kl < 1e-6
    if merge_base == "dequantized":  # the reference "as trained" is re-quantised on CUDA too: it cannot see the codes
        assert report.parity_vs_trained.mean_kl < 1e-6
    reference = _reference_logits(merge_base, tiny_llama_dir, qlora_adapter)  # adapter model on CPU
    probabilities = _logits(_load(tmp_path / "out")).softmax(-1)
    torch.testing.assert_close(probabilities, reference.softmax(-1), atol=1e-2, rtol=0)


# ---- the real demo model ----


@pytest.mark.slow
def test_real_demo_model(tmp_path):
    """SmolLM2-135M: a LoRA with small random B on its NF4 base, merged with the defaults (dequantized, bf16)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    from emo_calibrate import merge_adapter
    from emo_calibrate.demo.assets import smollm2_path
    from emo_calibrate.export.records import save_training_record

    base = str(smollm2_path())
    model = get_peft_model(_load(base, quantized=True), LoraConfig(r=8, target_modules="all-linear"))
    torch.manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    model.save_pretrained(tmp_path / "adapter")
    AutoTokenizer.from_pretrained(base).save_pretrained(tmp_path / "adapter")
    save_training_record(model, tmp_path / "adapter")
    del model

    report = merge_adapter(tmp_path / "adapter", tmp_path / "merged")
    assert report.passed and report.merge_base == "dequantized" and report.dtype == "bfloat16"
    assert report.code_check["status"] == "match"
    assert report.vocab_size == 49152 and report.parity.num_positions > 50
    assert report.parity_vs_trained.mean_kl < 1e-2  # bf16 rounding only: the same function as trained
    merged = _load(tmp_path / "merged", dtype=torch.bfloat16)
    assert merged.lm_head.weight.data_ptr() == merged.model.embed_tokens.weight.data_ptr()  # still tied
