"""Every guarded bad input gets one clear error (or, where it is harmless, a fix with a log line), raised before the
model is loaded whenever the input is known by then. The cases are listed in docs/troubleshooting.md."""

import collections
import logging
import os
import random
import shutil
import sys

import pytest
import torch
from datasets import Dataset
from tiny_models import build_tokenizer, lora, make_args, nf4, tiny_config
from transformers import AutoModelForCausalLM
from trl import ModelConfig, TrlParser

from emo_calibrate import EMOConfig, EMOTrainer
from emo_calibrate.training import output_space
from emo_calibrate.training import validation as v


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fail the test if SFTTrainer gets as far as loading a model from a path."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was reported")

    monkeypatch.setattr("trl.trainer.sft_trainer.create_model_from_path", refuse)


@pytest.fixture(scope="module")
def odd_models(tmp_path_factory):
    """Folders that are not usable causal LMs: an encoder (BERT), a backbone without LM head, pickle-only weights."""
    from transformers import BertConfig, BertForMaskedLM, LlamaModel

    root = tmp_path_factory.mktemp("odd-models")
    bert = BertForMaskedLM(BertConfig(vocab_size=128, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=32))  # fmt: skip
    bert.save_pretrained(root / "bert")
    LlamaModel(tiny_config()).save_pretrained(root / "backbone")
    llama = AutoModelForCausalLM.from_config(tiny_config())
    llama.save_pretrained(root / "pickle")
    from safetensors.torch import load_file

    torch.save(load_file(root / "pickle" / "model.safetensors"), root / "pickle" / "pytorch_model.bin")
    os.remove(root / "pickle" / "model.safetensors")
    for name in ("bert", "backbone", "pickle"):
        build_tokenizer().save_pretrained(root / name)
    return {"bert": str(root / "bert"), "backbone": str(root / "backbone"), "pickle": str(root / "pickle"),
            "bert_model": bert}  # fmt: skip


# ---- the model ------------------------------------------------------------------------------------------------------


def test_missing_model_path(tmp_path, tiny_dataset, no_model_loading):
    with pytest.raises(ValueError, match="model path .*nope/model does not exist"):
        EMOTrainer(str(tmp_path / "nope" / "model"), args=make_args(tmp_path), train_dataset=tiny_dataset)
    with pytest.raises(ValueError, match="neither a local folder nor in the Hugging Face cache"):
        v.check_model_path("some-org/some-model")  # tests run with HF_HUB_OFFLINE=1
    with pytest.raises(ValueError, match="no config.json"):
        v.check_model_path(str(tmp_path))
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(ValueError, match="holds a PEFT adapter, not a model"):
        v.check_model_path(str(tmp_path))
    with pytest.raises(ValueError, match="is a file"):
        v.check_model_path(str(tmp_path / "adapter_config.json"))


@pytest.mark.parametrize("kind, arch", [("bert", "BertForMaskedLM"), ("backbone", "LlamaModel")])
def test_not_a_causal_lm(tmp_path, tiny_dataset, odd_models, no_model_loading, kind, arch):
    with pytest.raises(ValueError, match=f"is a {arch}, not a causal language model"):
        EMOTrainer(odd_models[kind], args=make_args(tmp_path), train_dataset=tiny_dataset)


def test_not_a_causal_lm_object(tmp_path, tiny_dataset, odd_models):
    with pytest.raises(ValueError, match="BertForMaskedLM, not a causal language model"):
        EMOTrainer(odd_models["bert_model"], args=make_args(tmp_path), train_dataset=tiny_dataset,
                   processing_class=build_tokenizer())  # fmt: skip
    v.check_causal_lm_instance(AutoModelForCausalLM.from_config(tiny_config()))


def test_pickle_weights_are_refused_unless_allowed(tmp_path, tiny_dataset, odd_models, tiny_llama_dir):
    args = make_args(tmp_path, max_steps=1)
    with pytest.raises(ValueError, match="pickle files .*pytorch_model.bin.*use_safetensors"):
        EMOTrainer(odd_models["pickle"], args=args, train_dataset=tiny_dataset)
    allowed = make_args(tmp_path, max_steps=1, model_init_kwargs={"use_safetensors": False})
    EMOTrainer(odd_models["pickle"], args=allowed, train_dataset=tiny_dataset, peft_config=lora()).train()
    # Safe by default: transformers is told not to fall back to pickle weights.
    trainer = EMOTrainer(tiny_llama_dir, args=make_args(tmp_path), train_dataset=tiny_dataset)
    assert trainer.args.model_init_kwargs["use_safetensors"] is True


def test_trust_remote_code_is_off_unless_asked(tmp_path):
    assert EMOConfig(output_dir=str(tmp_path), report_to="none").trust_remote_code is False


# ---- the tokenizer --------------------------------------------------------------------------------------------------


def test_missing_pad_token_is_fixed_with_eos_and_a_log_line(tmp_path, tiny_llama_dir, tiny_dataset, caplog):
    tokenizer = build_tokenizer()
    tokenizer.pad_token = None
    with caplog.at_level(logging.INFO, logger="emo_calibrate.training.data_checks"):
        trainer = EMOTrainer(tiny_llama_dir, args=make_args(tmp_path, max_steps=1), train_dataset=tiny_dataset,
                             processing_class=tokenizer, peft_config=lora())  # fmt: skip
    assert "no pad token: padding with its eos token '</s>'" in caplog.text
    assert trainer.processing_class.pad_token == "</s>"
    # Padding is masked by length, not by token id: the real eos at the end of each text stays a target.
    rows = [trainer.train_dataset[i] for i in range(2)]
    batch = trainer.data_collator(rows)
    eos = tokenizer.eos_token_id
    for row, labels in zip(rows, batch["labels"].tolist()):
        length = len(row["input_ids"])
        assert labels[length - 1] == eos and all(label == -100 for label in labels[length:])
    trainer.train()


def test_tokenizer_without_pad_or_eos(tmp_path, tiny_llama_dir, tiny_dataset, no_model_loading):
    tokenizer = build_tokenizer()
    tokenizer.pad_token = None
    tokenizer.eos_token = None
    with pytest.raises(ValueError, match="neither a pad token nor an eos token"):
        EMOTrainer(tiny_llama_dir, args=make_args(tmp_path), train_dataset=tiny_dataset, processing_class=tokenizer)


def test_model_folder_without_tokenizer_fails_before_loading_weights(tmp_path, tiny_dataset, no_model_loading):
    folder = tmp_path / "no-tokenizer"
    AutoModelForCausalLM.from_config(tiny_config()).save_pretrained(folder)
    with pytest.raises(ValueError, match="Cannot load a tokenizer from .*processing_class"):
        EMOTrainer(str(folder), args=make_args(tmp_path), train_dataset=tiny_dataset)


# ---- the data -------------------------------------------------------------------------------------------------------


def test_dataset_without_a_text_column(tmp_path, tiny_llama_dir, no_model_loading):
    data = Dataset.from_dict({"content": ["the king"] * 8})
    with pytest.raises(ValueError, match=r"train_dataset has no 'text' column \(its columns: \['content'\]\)"):
        EMOTrainer(tiny_llama_dir, args=make_args(tmp_path), train_dataset=data)
    with pytest.raises(ValueError, match="eval_dataset\\['small'\\] has no 'text' column"):
        EMOTrainer(tiny_llama_dir, args=make_args(tmp_path), train_dataset=Dataset.from_dict({"text": ["a"]}),
                   eval_dataset={"small": data})  # fmt: skip
    with pytest.raises(ValueError, match="train_dataset is empty"):
        EMOTrainer(tiny_llama_dir, args=make_args(tmp_path), train_dataset=Dataset.from_dict({"text": []}))
    with pytest.raises(ValueError, match="holds int64, not text"):
        EMOTrainer(tiny_llama_dir, args=make_args(tmp_path), train_dataset=Dataset.from_dict({"text": [1, 2]}))
    # Formats SFTTrainer prepares itself pass.
    args = make_args(tmp_path)
    v.check_dataset(Dataset.from_dict({"prompt": ["a"], "completion": ["b"]}), args)
    v.check_dataset(Dataset.from_dict({"messages": [[{"role": "user", "content": "a"}]]}), args)
    v.check_dataset(Dataset.from_dict({"content": ["a"]}), args, formatting_func=lambda row: row["content"])


def test_empty_texts(tmp_path, tiny_llama_dir, tiny_dataset, no_model_loading, caplog):
    with pytest.raises(ValueError, match="Every text in train_dataset\\['text'\\] is empty"):
        EMOTrainer(
            tiny_llama_dir, args=make_args(tmp_path), train_dataset=Dataset.from_dict({"text": ["", " \n", None]})
        )
    some = Dataset.from_dict({"text": ["the king", "", "  "] * 4})
    with caplog.at_level(logging.WARNING, logger="emo_calibrate.training.data_checks"):
        v.check_dataset(some, make_args(tmp_path))
    assert "8 of 12 texts in train_dataset['text'] are empty" in caplog.text


def test_every_label_masked(tmp_path, tiny_llama_dir):
    # Prompts longer than max_length: truncation leaves no completion token, SFTTrainer drops every example.
    long_prompt = " ".join(["the king"] * 40)
    data = Dataset.from_dict({"prompt": [long_prompt] * 8, "completion": ["of the city"] * 8})
    with pytest.raises(ValueError, match="train_dataset is empty after tokenization"):
        EMOTrainer(tiny_llama_dir, args=make_args(tmp_path), train_dataset=data)
    # Single-token examples keep a label (so SFTTrainer keeps them) but have nothing to predict.
    single = Dataset.from_dict({"input_ids": [[5], [6]], "labels": [[5], [6]]})
    with pytest.raises(ValueError, match="No token of train_dataset is a training target"):
        EMOTrainer(tiny_llama_dir, args=make_args(tmp_path), train_dataset=single)


def test_count_targets_matches_a_python_loop():
    rng = random.Random(0)
    rows = []
    for _ in range(2500):  # more than one Arrow batch
        n = rng.randint(0, 6)
        rows.append([rng.choice([-100, -100, rng.randint(0, 99)]) for _ in range(n)])
    data = Dataset.from_dict({"input_ids": [[1] * len(r) for r in rows], "labels": rows}).select(range(1, 2500, 2))
    kept = rows[1:2500:2]
    per_row = [sum(label != -100 for label in r[1:]) for r in kept]
    assert v.count_targets(data) == (sum(c == 0 for c in per_row), sum(per_row))
    ids_only = data.remove_columns("labels")
    assert v.count_targets(ids_only) == (sum(len(r) <= 1 for r in kept), sum(max(len(r) - 1, 0) for r in kept))


# ---- recipe and options ---------------------------------------------------------------------------------------------


def test_unknown_recipe_keys_and_flags_are_rejected(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("output_dir: out\nmodel_name_or_path: x\nlora_rank: 8\n")
    with pytest.raises(ValueError, match="Unknown arguments from config file.*lora_rank"):
        TrlParser((EMOConfig, ModelConfig)).parse_args_and_config(["--config", str(recipe)])
    with pytest.raises(ValueError, match="not used by the HfArgumentParser.*--emo_wieghting"):
        TrlParser((EMOConfig, ModelConfig)).parse_args_and_config(["--output_dir", "o", "--emo_wieghting", "mle"])


def test_new_emo_option_is_documented():
    from dataclasses import fields

    field = {f.name: f for f in fields(EMOConfig)}["emo_max_nonfinite_steps"]
    assert "emo_max_nonfinite_steps" in EMOConfig.__doc__ and field.metadata["help"]


# ---- hardware -------------------------------------------------------------------------------------------------------


def test_bf16_without_support(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="bf16=True was asked for, but no GPU with bfloat16 support.*use_cpu=True"):
        EMOConfig(output_dir=str(tmp_path), report_to="none", bf16=True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla T4")
    monkeypatch.setattr("transformers.utils.is_torch_bf16_gpu_available", lambda: False)
    with pytest.raises(ValueError, match=r"this GPU \(Tesla T4\) has no bfloat16 support.*fp16=True"):
        EMOConfig(output_dir=str(tmp_path), report_to="none")  # bf16 unset means bf16 on a GPU


def test_fp16_on_cpu(tmp_path, tiny_llama_dir, tiny_dataset, no_model_loading):
    with pytest.raises(ValueError, match="fp16=True was asked for, but training runs on the CPU"):
        EMOTrainer(tiny_llama_dir, args=make_args(tmp_path, fp16=True), train_dataset=tiny_dataset)


def test_4bit_without_bitsandbytes(tmp_path, tiny_llama_dir, tiny_dataset, no_model_loading, monkeypatch):
    import bitsandbytes

    monkeypatch.setattr(bitsandbytes, "supported_torch_devices", {"cuda"})
    with pytest.raises(ValueError, match="no backend for the 'cpu' device"):
        EMOTrainer(tiny_llama_dir, args=make_args(tmp_path), train_dataset=tiny_dataset, quantization_config=nf4())
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now raises ImportError
    args = make_args(tmp_path, model_init_kwargs={"quantization_config": {"load_in_4bit": True}})
    with pytest.raises(ValueError, match="needs bitsandbytes, which cannot be imported"):
        EMOTrainer(tiny_llama_dir, args=args, train_dataset=tiny_dataset)
    v.check_quantization(None, "cpu")  # nothing asked, nothing checked


# ---- the output folder ----------------------------------------------------------------------------------------------


def test_output_dir_not_writable(tmp_path, tiny_llama_dir, tiny_dataset, no_model_loading, monkeypatch):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="cannot be created: .*file is a file"):
        EMOTrainer(tiny_llama_dir, args=make_args(tmp_path, output_dir=str(tmp_path / "file" / "out")),
                   train_dataset=tiny_dataset)  # fmt: skip

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(output_space.tempfile, "mkstemp", denied)  # the tests run as root, which chmod cannot stop
    with pytest.raises(ValueError, match="is not writable \\(Permission denied"):
        EMOTrainer(tiny_llama_dir, args=make_args(tmp_path), train_dataset=tiny_dataset)


def test_not_enough_disk_space(tmp_path, tiny_llama_dir, tiny_dataset, monkeypatch):
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(output_space.shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    args = make_args(tmp_path, save_strategy="steps", save_steps=1, save_total_limit=2)
    with pytest.raises(ValueError, match="GiB free, but this run needs about .* up to 3 checkpoints"):
        EMOTrainer(tiny_llama_dir, args=args, train_dataset=tiny_dataset, peft_config=lora())


@pytest.mark.parametrize("use_lora", [True, False], ids=["lora", "full"])
def test_disk_estimate_matches_the_files_written(tmp_path, tiny_tied_dir, tiny_dataset, use_lora):
    from safetensors import safe_open

    args = make_args(tmp_path, max_steps=3, save_strategy="steps", save_steps=1, save_total_limit=1)
    model = tiny_tied_dir if use_lora else AutoModelForCausalLM.from_pretrained(tiny_tied_dir)
    trainer = EMOTrainer(model, args=args, train_dataset=tiny_dataset, peft_config=lora() if use_lora else None)
    estimate = v.estimate_output_bytes(trainer)
    assert estimate["checkpoints"] == 2  # one kept, plus the new one written before the old one is deleted
    trainer.train()
    checkpoint = os.path.join(args.output_dir, "checkpoint-3")
    weights_file = "adapter_model.safetensors" if use_lora else "model.safetensors"
    with safe_open(os.path.join(checkpoint, weights_file), framework="pt") as handle:
        weights = sum(handle.get_tensor(k).nbytes for k in handle.keys())
    optimizer = torch.load(os.path.join(checkpoint, "optimizer.pt"), weights_only=True)["state"]
    moments = sum(t.nbytes for state in optimizer.values() for k, t in state.items() if k != "step")
    assert estimate["weights"] == weights
    assert estimate["optimizer"] == moments
    assert estimate["total"] < shutil.disk_usage(tmp_path).free


# ---- sharding and PEFT methods the EMO loss path cannot serve ------------------------------------------------------


@pytest.mark.parametrize(
    "options, env",
    [({"fsdp": "full_shard", "fsdp_config": {"version": 1}}, {}), ({}, {"ACCELERATE_USE_FSDP": "true"})],
    ids=["fsdp_config_version_1", "accelerate_launch_default_fsdp1"],
)
def test_fsdp1_is_refused_before_loading(options, env, monkeypatch, tmp_path, tiny_llama_dir, tiny_dataset,
                                         no_model_loading):  # fmt: skip
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("FSDP_VERSION", raising=False)
    with pytest.raises(ValueError, match="FSDP version 1 was requested.*FSDP2 only.*fsdp_version: 2"):
        EMOTrainer(tiny_llama_dir, args=make_args(tmp_path, **options), train_dataset=tiny_dataset, peft_config=lora())


def test_fsdp_that_accelerate_would_silently_turn_into_ddp_is_refused(tmp_path, tiny_llama_dir, tiny_dataset,
                                                                     no_model_loading):  # fmt: skip
    """On the CPU (or in one plain process) accelerate 1.15 drops the FSDP plugin without a word."""
    args = make_args(tmp_path, fsdp="full_shard", fsdp_config={"version": 2}, use_cpu=True)
    with pytest.raises(ValueError, match=r"FSDP was requested.*distributed type NO.*silently drop FSDP"):
        EMOTrainer(tiny_llama_dir, args=args, train_dataset=tiny_dataset, peft_config=lora())


def _prompt_learning_configs():
    from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig

    return [
        PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
        PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
        PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=16),
    ]


@pytest.mark.parametrize("index", range(3), ids=["prompt_tuning", "prefix_tuning", "p_tuning"])
def test_prompt_learning_peft_is_refused_before_loading(index, tmp_path, tiny_llama_dir, tiny_dataset,
                                                        no_model_loading):  # fmt: skip
    config = _prompt_learning_configs()[index]
    with pytest.raises(ValueError, match=rf"{type(config).__name__} is a prompt-learning PEFT method.*LoRA"):
        EMOTrainer(tiny_llama_dir, args=make_args(tmp_path), train_dataset=tiny_dataset, peft_config=config)


def test_a_model_already_wrapped_for_prompt_tuning_is_refused(tmp_path, tiny_llama_dir, tiny_dataset):
    from peft import get_peft_model

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), _prompt_learning_configs()[0])
    with pytest.raises(ValueError, match="PromptTuningConfig is a prompt-learning PEFT method"):
        EMOTrainer(model, args=make_args(tmp_path), train_dataset=tiny_dataset, processing_class=build_tokenizer())
