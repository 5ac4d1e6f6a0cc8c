"""Options of SFTConfig / Trainer that would change the loss behind EMO's back stop with one clear error (naming the
option and what to use instead) before the model is loaded."""

import types

import pytest
import torch
from tiny_models import lora, make_args

from emo_calibrate import EMOTrainer


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fails the test if the trainer gets as far as loading the model."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the option was refused")

    monkeypatch.setattr("trl.trainer.sft_trainer.create_model_from_path", refuse)


@pytest.mark.parametrize(
    "option,value,alternative",
    [("loss_type", "dft", "emo_weighting='mle'"), ("label_smoothing_factor", 0.1, "label_smoothing_factor=0")],
)
def test_sft_loss_options_are_refused_by_the_config(tmp_path, option, value, alternative):
    with pytest.raises(ValueError, match=option) as error:
        make_args(tmp_path, **{option: value})
    assert alternative in str(error.value)
    assert make_args(tmp_path, loss_type="nll").loss_type == "nll"


def test_a_plain_sft_config_with_such_an_option_is_refused(tmp_path, tiny_llama_dir, tiny_dataset, no_model_loading):
    from trl import SFTConfig

    sft = SFTConfig(output_dir=str(tmp_path), bf16=False, report_to="none", loss_type="dft")
    with pytest.raises(ValueError, match="loss_type='dft'"):
        EMOTrainer(tiny_llama_dir, args=sft, train_dataset=tiny_dataset)


def test_compute_loss_func_is_refused(tmp_path, tiny_llama_dir, tiny_dataset, no_model_loading):
    with pytest.raises(ValueError, match="compute_loss_func") as error:
        EMOTrainer(
            tiny_llama_dir, args=make_args(tmp_path), train_dataset=tiny_dataset, compute_loss_func=lambda *a, **k: 0
        )
    assert "override compute_loss" in str(error.value)


def test_context_and_sequence_parallelism_are_refused(
    tmp_path, tiny_llama_dir, tiny_dataset, monkeypatch, no_model_loading
):
    args = make_args(tmp_path)
    args.parallelism_config = types.SimpleNamespace(cp_size=2, sp_size=1)
    with pytest.raises(ValueError, match="cp_size=2") as error:
        EMOTrainer(tiny_llama_dir, args=args, train_dataset=tiny_dataset)
    assert "data parallelism" in str(error.value)
    args.parallelism_config = None  # as set by an accelerate config file: through the environment
    monkeypatch.setenv("PARALLELISM_CONFIG_SP_SIZE", "2")
    with pytest.raises(ValueError, match="sp_size=2"):
        EMOTrainer(tiny_llama_dir, args=args, train_dataset=tiny_dataset)


def test_prompt_learning_peft_is_refused(tmp_path, tiny_llama_dir, tiny_dataset, no_model_loading):
    from peft import PromptTuningConfig

    config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    with pytest.raises(ValueError, match="prompt-learning PEFT method") as error:
        EMOTrainer(tiny_llama_dir, args=make_args(tmp_path), train_dataset=tiny_dataset, peft_config=config)
    assert "LoRA" in str(error.value)


def test_batches_with_shift_labels_are_refused(tmp_path, tiny_llama_dir, tiny_dataset):
    trainer = EMOTrainer(tiny_llama_dir, args=make_args(tmp_path), train_dataset=tiny_dataset, peft_config=lora())
    ids = torch.tensor([[2, 5, 6, 7]])
    with pytest.raises(ValueError, match="shift_labels"):
        trainer.compute_loss(trainer.model, {"input_ids": ids, "labels": ids, "shift_labels": ids[:, 1:]})


def test_load_best_model_defaults_to_the_held_out_cross_entropy(tmp_path, tiny_llama_dir, tiny_dataset):
    """Not the loss: with the default target-mass subtraction the EMO loss (2 emo) rises as the model becomes
    confidently right."""
    kwargs = dict(
        load_best_model_at_end=True, eval_strategy="steps", save_strategy="steps", eval_steps=1, save_steps=1
    )
    args = make_args(tmp_path, max_steps=3, emo_guard_max_ppl_ratio=None, **kwargs)
    assert args.metric_for_best_model == "mle" and args.greater_is_better is False
    chosen = make_args(tmp_path, metric_for_best_model="loss", **kwargs)
    assert chosen.metric_for_best_model == "loss"
    trainer = EMOTrainer(
        tiny_llama_dir, args=args, train_dataset=tiny_dataset, eval_dataset=tiny_dataset.select(range(8)),
        peft_config=lora(),
    )  # fmt: skip
    trainer.train()
    evals = [h for h in trainer.state.log_history if "eval_mle" in h]
    assert len(evals) == 3 and all("eval_emd" in h for h in evals)
    best = min(evals, key=lambda h: h["eval_mle"])
    assert trainer.state.best_metric == pytest.approx(best["eval_mle"])
    assert trainer.state.best_model_checkpoint.endswith(f"checkpoint-{best['step']}")
