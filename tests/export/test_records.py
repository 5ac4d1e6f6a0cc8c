"""The training record `EMOTrainer.save_model` writes next to an adapter, and how `merge_adapter` uses it.

Adapters here are trained by `EMOTrainer` itself (2 fp32 steps, as the demo recipe trains), on the tiny Llama
unquantised and in NF4, so the record is the one users get. References are built independently: the trained model in
memory, or the 4-bit base loaded here with PEFT's adapter attached.
"""

import importlib.util
import json
import os
import shutil
import sys

import pytest
import torch
from tiny_models import build_tiny_model_dir, lora, make_args, nf4_config, tiny_text_dataset


needs_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")
IDS = torch.tensor([[2, 4, 9, 17, 30, 5, 61, 8, 100, 3, 7, 12], [2, 40, 41, 42, 6, 5, 4, 90, 91, 92, 93, 94]])


def _train(base_dir, tmp_path, **kwargs):
    from emo_calibrate import EMOTrainer

    args = make_args(tmp_path, max_steps=2, learning_rate=1e-2, dataloader_pin_memory=False, **kwargs.pop("args", {}))
    trainer = EMOTrainer(
        base_dir, args=args, train_dataset=tiny_text_dataset(8), peft_config=lora(init_lora_weights=False), **kwargs
    )
    trainer.train()
    trainer.save_model()
    return trainer


@pytest.fixture(scope="module")
def fp32_run(tiny_llama_dir, tmp_path_factory):
    """An adapter trained on the unquantised fp32 base, and its logits as trained."""
    trainer = _train(tiny_llama_dir, tmp_path_factory.mktemp("fp32-run"))
    return trainer.args.output_dir, _logits(trainer.model)


@pytest.fixture(scope="module")
def qlora_run(tiny_llama_dir, tmp_path_factory):
    """An adapter trained on the NF4 + double-quant base, loaded on CPU as a CPU QLoRA run does."""
    pytest.importorskip("bitsandbytes")
    trainer = _train(
        tiny_llama_dir,
        tmp_path_factory.mktemp("qlora-run"),
        quantization_config=nf4_config(),
        args={"model_init_kwargs": {"device_map": "cpu"}},
    )
    return trainer.args.output_dir


def _logits(model):
    model.eval()
    with torch.no_grad():
        return model(input_ids=IDS.to(model.device)).logits.float().cpu()


def _load(path, quantized=False):
    from transformers import AutoModelForCausalLM

    from emo_calibrate.utils.quantization import disable_cpu_4bit_repacking

    extra = {"quantization_config": nf4_config()} if quantized else {}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, device_map="cpu", **extra)
    disable_cpu_4bit_repacking(model)
    return model


def _copy(adapter, tmp_path):
    return shutil.copytree(adapter, tmp_path / "adapter")


def _edit_record(adapter, edit):
    path = adapter / "emo_training.json"
    record = json.loads(path.read_text())
    edit(record)
    path.write_text(json.dumps(record))


# ---- an adapter trained on an unquantised base --------------------------------------------------------------------


def test_an_fp32_adapter_merges_by_default_into_its_fp32_base(fp32_run, tmp_path):
    """Issue 15: the default merge never invents a quantisation; fp32 merge == the model as trained."""
    from emo_calibrate import merge_adapter

    adapter, trained_logits = fp32_run
    record = json.loads(open(os.path.join(adapter, "emo_training.json")).read())
    assert record["quantization"] is None and record["base_dtype"] == "float32"
    assert record["settings"]["emo_weighting"] == "emo_anchored" and record["settings"]["global_step"] == 2

    report = merge_adapter(adapter, tmp_path / "merged", dtype="float32")
    assert (report.merge_base, report.trained_base, report.quantization) == ("original", "unquantised", None)
    assert report.code_check is None and report.parity_vs_trained.mean_kl < 1e-10
    merged = _logits(_load(tmp_path / "merged"))
    assert (merged - trained_logits).abs().max() < 1e-4  # the dequantized default was off by ~6e-3 here
    assert (merged - _logits(_load(report.base_model))).abs().max() > 0.1  # and the adapter did something
    card = (tmp_path / "merged" / "README.md").read_text()
    assert "the unquantised base" in card and "`emo_weighting`: emo_anchored" in card
    saved = json.loads((tmp_path / "merged" / "merge_report.json").read_text())
    assert saved["trained_base"] == "unquantised" and saved["quantization"] is None


def test_the_record_holds_what_the_perplexity_budget_did(tiny_llama_dir, tmp_path):
    trainer = _train(tiny_llama_dir, tmp_path, args={"emo_guard_max_ppl_ratio": 1.05, "emo_guard_holdout": 2})
    record = json.loads((tmp_path / "out" / "emo_training.json").read_text())
    budget = record["perplexity_budget"]
    assert budget == json.loads(json.dumps(trainer.perplexity_budget.record()))
    assert budget["heldout"] == {
        "source": "automatic", "rows": 2, "method": "2 contiguous spans of rows", "documents": 2, "train_rows": 6,
        "seed": 0, "size": 2,
    }  # fmt: skip
    assert budget["max_ppl_ratio"] == 1.05 and budget["start_ppl"] > 1 and budget["summary"]
    assert record["settings"]["emo_guard_holdout"] == 2 and record["settings"]["emo_guard_eval_steps"] == 0.1


def test_dequantized_is_refused_for_an_adapter_trained_unquantised(fp32_run, tmp_path):
    from emo_calibrate import merge_adapter

    with pytest.raises(ValueError, match="trained on an unquantised base.*merge_base='original'"):
        merge_adapter(fp32_run[0], tmp_path / "out", merge_base="dequantized")
    assert os.listdir(tmp_path) == []


# ---- an adapter trained on a 4-bit base ---------------------------------------------------------------------------


@needs_bnb
def test_the_4bit_record_holds_device_version_and_block_hashes(qlora_run, tiny_llama_dir):
    from importlib.metadata import version

    from emo_calibrate.export.records import block_hashes

    record = json.loads(open(os.path.join(qlora_run, "emo_training.json")).read())
    quantization = record["quantization"]
    assert quantization["config"]["bnb_4bit_quant_type"] == "nf4" and quantization["config"]["load_in_4bit"]
    assert quantization["load_dtype"] == "float32" and quantization["device"] == "cpu"
    assert quantization["bitsandbytes"] == version("bitsandbytes") and quantization["torch"] == torch.__version__
    hashes = quantization["block_sha256"]
    # First, middle and last of the 14 Linear4bit layers, named as in the plain model (no PEFT prefix).
    assert list(hashes) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj",
                            "model.layers.1.mlp.down_proj"]  # fmt: skip
    assert all(len(digest) == 64 for digest in hashes.values())
    # The same base quantised again gives the same codes; one changed code byte or absmax value changes the hash.
    base = _load(tiny_llama_dir, quantized=True)
    assert block_hashes(base) == hashes
    layer = base.model.layers[0].self_attn.q_proj
    layer.weight.data[0, 0] ^= 1
    assert block_hashes(base)["model.layers.0.self_attn.q_proj"] != hashes["model.layers.0.self_attn.q_proj"]
    layer.weight.data[0, 0] ^= 1
    layer.weight.quant_state.state2.absmax.mul_(1.0001)
    assert block_hashes(base)["model.layers.0.self_attn.q_proj"] != hashes["model.layers.0.self_attn.q_proj"]


@needs_bnb
def test_a_4bit_adapter_merges_by_default_into_its_rebuilt_4bit_base(qlora_run, tiny_llama_dir, tmp_path):
    from peft import PeftModel

    from emo_calibrate import merge_adapter
    from emo_calibrate.utils.quantization import disable_cpu_4bit_repacking

    report = merge_adapter(qlora_run, tmp_path / "merged", dtype="float32")
    assert (report.merge_base, report.trained_base, report.device) == ("dequantized", "4-bit", "cpu")
    assert report.code_check["status"] == "match" and report.code_check["blocks"] == 3
    assert report.parity_vs_trained.mean_kl < 1e-8
    trained = PeftModel.from_pretrained(_load(tiny_llama_dir, quantized=True), qlora_run)
    disable_cpu_4bit_repacking(trained)
    torch.testing.assert_close(_logits(_load(tmp_path / "merged")), _logits(trained), atol=1e-4, rtol=1e-4)
    assert "match: 3 of 3 blocks" in (tmp_path / "merged" / "README.md").read_text()


@needs_bnb
def test_a_tampered_record_is_refused_then_merged_with_the_flag(qlora_run, tmp_path, capsys):
    from emo_calibrate import merge_adapter
    from emo_calibrate.cli.main import main

    adapter = _copy(qlora_run, tmp_path)
    layer = "model.layers.1.self_attn.q_proj"

    def tamper(record):  # as if training had quantised on a GPU whose codes differ from the CPU's
        record["quantization"]["device"] = "cuda"
        record["quantization"]["block_sha256"][layer] = "0" * 64

    _edit_record(adapter, tamper)
    out = tmp_path / "merged"
    with pytest.raises(
        ValueError, match=r"not the one the adapter .* was trained on: MISMATCH: 1 of 3 blocks"
    ) as info:
        merge_adapter(adapter, out, dtype="float32")
    message = str(info.value)
    assert "--device cuda" in message and "--allow_code_mismatch" in message and "Nothing was written" in message
    assert sorted(os.listdir(tmp_path)) == ["adapter"]
    assert main(["merge", "--adapter_path", str(adapter), "--output_dir", str(out)]) == 2  # a refusal
    assert "--device cuda" in capsys.readouterr().err

    report = merge_adapter(adapter, out, dtype="float32", allow_code_mismatch=True)
    assert report.code_check["status"] == "mismatch" and report.code_check["differing"] == [layer]
    assert report.code_check["recorded"]["device"] == "cuda" and report.code_check["merge"]["device"] == "cpu"
    assert f"MISMATCH: 1 of 3 blocks differ ({layer}" in (out / "README.md").read_text()
    assert json.loads((out / "merge_report.json").read_text())["code_check"]["differing"] == [layer]


@needs_bnb
def test_a_base_whose_codes_differ_is_refused(qlora_run, tmp_path):
    from emo_calibrate import merge_adapter

    other = build_tiny_model_dir(tmp_path / "other-base", seed=1)  # same architecture and vocabulary, other weights
    with pytest.raises(ValueError, match="MISMATCH: 3 of 3 blocks.*pass the checkpoint the adapter was trained on"):
        merge_adapter(qlora_run, tmp_path / "out", model_name_or_path=other)
    assert not (tmp_path / "out").exists()


# ---- old adapters, and no pickle ----------------------------------------------------------------------------------


def test_an_adapter_without_a_record_still_merges_and_the_card_says_what_is_unknown(fp32_run, tmp_path):
    from emo_calibrate import merge_adapter

    adapter = _copy(fp32_run[0], tmp_path)
    os.remove(adapter / "emo_training.json")
    report = merge_adapter(adapter, tmp_path / "merged", dtype="float32")
    assert (report.merge_base, report.trained_base, report.emo_settings) == ("original", "unknown", {})
    assert report.passed and report.parity_vs_trained is None
    card = (tmp_path / "merged" / "README.md").read_text()
    assert "Unknown: the adapter folder has no emo_training.json" in card and "pass merge_base='dequantized'" in card


@needs_bnb
def test_a_legacy_quantization_record_still_merges_into_its_4bit_base(qlora_run, tmp_path):
    """emo_calibrate 0.1 wrote quantization_config.json (a BitsAndBytesConfig and its load dtype), no hashes."""
    from emo_calibrate import merge_adapter

    adapter = _copy(qlora_run, tmp_path)
    record = json.loads((adapter / "emo_training.json").read_text())["quantization"]
    (adapter / "quantization_config.json").write_text(json.dumps({**record["config"], "_load_dtype": "float32"}))
    os.remove(adapter / "emo_training.json")
    report = merge_adapter(adapter, tmp_path / "merged", dtype="float32")
    assert (report.merge_base, report.trained_base) == ("dequantized", "4-bit")
    assert "legacy" in report.quantization_source and report.code_check["status"] == "not recorded"
    assert report.parity_vs_trained.mean_kl < 1e-8 and report.emo_settings == {}


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch exploited",))


_OPENED: list = []


def _audit(event, args):
    if (event == "open" and str(args[0]).endswith("training_args.bin")) or event.startswith("pickle."):
        _OPENED.append((event, args))


sys.addaudithook(_audit)  # audit hooks cannot be removed; this one only appends to a list


@pytest.mark.parametrize("with_record", [True, False])
def test_a_malicious_training_args_bin_is_never_opened(fp32_run, tmp_path, monkeypatch, with_record):
    from emo_calibrate import merge_adapter

    adapter = _copy(fp32_run[0], tmp_path)
    monkeypatch.chdir(tmp_path)
    torch.save({"learning_rate": 1.0, "payload": _Exploit()}, adapter / "training_args.bin")
    if not with_record:
        os.remove(adapter / "emo_training.json")
    _OPENED.clear()
    merge_adapter(adapter, tmp_path / "merged", dtype="float32")
    assert _OPENED == [] and not (tmp_path / "exploited").exists()


def test_a_damaged_record_is_refused_before_loading(fp32_run, tmp_path):
    from emo_calibrate import merge_adapter

    adapter = _copy(fp32_run[0], tmp_path)
    (adapter / "emo_training.json").write_text("{")
    with pytest.raises(ValueError, match="cannot read .*emo_training.json.*delete it"):
        merge_adapter(adapter, tmp_path / "merged")
    assert sorted(os.listdir(tmp_path)) == ["adapter"]
