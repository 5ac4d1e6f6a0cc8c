"""EMOTrainer on tiny in-process models: QLoRA on CPU, LoRA bookkeeping, metrics, accumulation, the EMO canary."""

import pytest
import torch
from safetensors.torch import save_file
from tiny_models import lora, make_args, nf4
from training_runs import assert_trained_alike, lora_state
from transformers import AutoModelForCausalLM

from emo_calibrate import EMOConfig, EMOTrainer


def snapshot(model, trainable):
    return {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad == trainable}


@pytest.mark.parametrize("model_fixture", ["tiny_llama_dir", "tiny_tied_dir"])
def test_qlora_on_cpu_trains_every_adapter_and_logs_emo_metrics(request, model_fixture, tmp_path, tiny_dataset):
    path = request.getfixturevalue(model_fixture)
    args = make_args(tmp_path, eval_strategy="steps", eval_steps=3, model_init_kwargs={"device_map": "cpu"})
    trainer = EMOTrainer(
        path, args=args, train_dataset=tiny_dataset, eval_dataset=tiny_dataset.select(range(8)),
        quantization_config=nf4(), peft_config=lora(),
    )  # fmt: skip
    model = trainer.model
    assert model.is_loaded_in_4bit
    frozen_before = snapshot(model, trainable=False)
    lora_before = lora_state(trainer)
    assert len(lora_before) == 2 * 7 * 2  # A and B of 7 linear layers in 2 blocks

    # An evaluation BEFORE training must not break the 4-bit gradients (bitsandbytes' CPU repacking hazard).
    metrics = trainer.evaluate()
    assert {"eval_loss", "eval_mle", "eval_emo", "eval_emd", "eval_emo_ratio", "eval_entropy"} <= set(metrics)
    trainer.train()

    lora_after = lora_state(trainer)
    unchanged = [n for n in lora_before if torch.equal(lora_before[n], lora_after[n])]
    assert not unchanged, f"LoRA tensors that never moved: {unchanged}"
    for name, before in frozen_before.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].detach().float(), before, msg=name)
    # Under LoRA the frozen head IS the cost embedding: read in place, no copy.
    assert trainer._emo_cost is None and trainer._fused_reason is None

    train_logs = [h for h in trainer.state.log_history if "loss" in h and "eval_loss" not in h]
    assert len(train_logs) == 3
    for key in ("mle", "emo", "emd", "emo_ratio", "entropy", "mean_token_accuracy", "num_tokens", "grad_norm"):
        assert all(key in h for h in train_logs), key
    eval_logs = [h for h in trainer.state.log_history if "eval_loss" in h]
    assert eval_logs and "eval_emo" in eval_logs[-1]
    # emo_anchored logs 2 * emo as its loss value; emd is the transport cost without the target mass q_y
    assert train_logs[0]["loss"] == pytest.approx(2 * train_logs[0]["emo"], rel=1e-3)
    assert all(0 <= h["emd"] < h["emo"] for h in train_logs)

    # The saved adapter records how its base was quantised, for a faithful merge (tests/export/test_records.py).
    from emo_calibrate.export.records import read_training_record

    trainer.save_model()
    record = read_training_record(args.output_dir)["quantization"]
    assert record["config"]["load_in_4bit"] and record["config"]["bnb_4bit_quant_type"] == "nf4"


def test_gradient_accumulation_gives_the_same_losses(tiny_llama_dir, tmp_path, tiny_dataset):
    """Batch 4 x accumulation 1 and batch 2 x accumulation 2 log the same losses and reach the same adapter."""
    runs = {}
    for batch, accumulation in [(4, 1), (2, 2)]:
        args = make_args(
            tmp_path / f"{batch}x{accumulation}",
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulation,
        )
        trainer = EMOTrainer(tiny_llama_dir, args=args, train_dataset=tiny_dataset, peft_config=lora())
        trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        runs[batch] = (losses, lora_state(trainer))
    torch.testing.assert_close(torch.tensor(runs[4][0]), torch.tensor(runs[2][0]), rtol=1e-5, atol=1e-6)
    for name, value in runs[4][1].items():
        torch.testing.assert_close(value, runs[2][1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_emo_shapes_the_update(tiny_llama_dir, tmp_path, tiny_dataset):
    """Canary: with the same seed and data, the MLE-only weighting trains a different adapter than EMO."""
    adapters = {}
    for weighting in ("emo_anchored", "mle"):
        args = make_args(tmp_path / weighting, emo_weighting=weighting)
        trainer = EMOTrainer(tiny_llama_dir, args=args, train_dataset=tiny_dataset, peft_config=lora())
        trainer.train()
        adapters[weighting] = lora_state(trainer)
    differences = [(adapters["emo_anchored"][n] - adapters["mle"][n]).abs().max().item() for n in adapters["mle"]]
    assert max(differences) > 1e-3


@pytest.mark.parametrize("weighting", ["emo_anchored", "mle_anchored"])
def test_fused_and_reference_paths_train_identically(tiny_tied_dir, tmp_path, tiny_dataset, weighting):
    trainers = {}
    for fused in (True, False):
        args = make_args(tmp_path / str(fused), emo_fused_head=fused, emo_weighting=weighting)
        trainers[fused] = EMOTrainer(tiny_tied_dir, args=args, train_dataset=tiny_dataset, peft_config=lora())
        assert (trainers[fused]._fused_reason is None) == fused
        trainers[fused].train()
    assert_trained_alike(trainers[True], trainers[False])


def test_full_finetuning_keeps_the_pretrained_cost_embedding(tiny_tied_dir, tmp_path, tiny_dataset):
    """With a trained head, 'frozen' keeps a copy of the head as it was before training; 'adaptive' follows it."""
    model = AutoModelForCausalLM.from_pretrained(tiny_tied_dir)
    initial_head = model.get_output_embeddings().weight.detach().clone()
    trainer = EMOTrainer(model, args=make_args(tmp_path), train_dataset=tiny_dataset)
    trainer.train()
    assert not torch.equal(model.get_output_embeddings().weight.detach(), initial_head)
    torch.testing.assert_close(trainer._emo_cost, initial_head)

    adaptive = EMOTrainer(
        AutoModelForCausalLM.from_pretrained(tiny_tied_dir),
        args=make_args(tmp_path / "adaptive", emo_cost_embedding="adaptive"),
        train_dataset=tiny_dataset,
    )
    assert adaptive._emo_cost is None


def test_external_cost_embedding_of_another_width(tiny_llama_dir, tmp_path, tiny_dataset):
    vocab = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).config.vocab_size
    wide = tmp_path / "cost.safetensors"
    save_file({"lm_head.weight": torch.randn(vocab, 48)}, str(wide))
    args = make_args(tmp_path, emo_cost_embedding=str(wide), max_steps=2)
    trainer = EMOTrainer(tiny_llama_dir, args=args, train_dataset=tiny_dataset, peft_config=lora())
    assert trainer._emo_cost.shape == (vocab, 48)
    trainer.train()
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in trainer.state.log_history if "loss" in h)

    wrong = tmp_path / "wrong.safetensors"
    save_file({"lm_head.weight": torch.randn(vocab + 1, 16)}, str(wrong))
    with pytest.raises(ValueError, match="same tokenizer and vocabulary"):
        EMOTrainer(tiny_llama_dir, args=make_args(tmp_path, emo_cost_embedding=str(wrong)), train_dataset=tiny_dataset)


def test_model_folder_as_cost_embedding(tiny_llama_dir, tiny_tied_dir, tmp_path, tiny_dataset):
    """A model folder with the same vocabulary (here the tied model, whose head is its input embedding)."""
    trainer = EMOTrainer(
        tiny_llama_dir, args=make_args(tmp_path, emo_cost_embedding=tiny_tied_dir), train_dataset=tiny_dataset
    )
    tied = AutoModelForCausalLM.from_pretrained(tiny_tied_dir)
    torch.testing.assert_close(trainer._emo_cost, tied.get_input_embeddings().weight.detach())


def test_vocabulary_mismatch_is_a_clear_error(tiny_llama_dir, tmp_path, tiny_dataset):
    from tiny_models import build_tiny_model
    from transformers import AutoTokenizer

    small = build_tiny_model("llama", vocab_size=64)  # 64 output rows for a tokenizer of 193 tokens
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tokenizer.add_tokens([f"extra{i}" for i in range(80)])
    with pytest.raises(ValueError, match="resize_token_embeddings"):
        EMOTrainer(small, args=make_args(tmp_path), train_dataset=tiny_dataset, processing_class=tokenizer)


def test_lora_on_lm_head_is_refused(tiny_llama_dir, tmp_path, tiny_dataset):
    with pytest.raises(ValueError, match="lm_head"):
        EMOTrainer(
            tiny_llama_dir,
            args=make_args(tmp_path),
            train_dataset=tiny_dataset,
            peft_config=lora(target_modules=["q_proj", "lm_head"]),
        )


def test_plain_sft_config_is_converted(tiny_llama_dir, tmp_path, tiny_dataset):
    from trl import SFTConfig

    sft = SFTConfig(output_dir=str(tmp_path), bf16=False, report_to="none", max_steps=1, learning_rate=1e-3)
    trainer = EMOTrainer(tiny_llama_dir, args=sft, train_dataset=tiny_dataset, peft_config=lora())
    assert isinstance(trainer.args, EMOConfig)
    assert trainer.args.learning_rate == 1e-3 and trainer.args.emo_weighting == "mle_anchored"


def test_moe_router_aux_loss_is_added_and_logged(tmp_path, tiny_dataset):
    from tiny_models import build_tokenizer
    from transformers import MixtralConfig

    config = MixtralConfig(
        vocab_size=128, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, router_aux_loss_coef=0.02,
        output_router_logits=True, pad_token_id=0, bos_token_id=2, eos_token_id=3,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    trainer = EMOTrainer(model, args=make_args(tmp_path, max_steps=2), train_dataset=tiny_dataset,
                         processing_class=build_tokenizer())  # fmt: skip
    assert trainer.aux_loss_enabled
    trainer.train()
    for log in [h for h in trainer.state.log_history if "loss" in h]:
        assert log["aux_loss"] > 0
        assert log["loss"] == pytest.approx(2 * log["emo"] + 0.02 * log["aux_loss"], rel=1e-4)
