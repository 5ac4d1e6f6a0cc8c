"""The bf16 training path as users run it (Trainer mixed precision, bf16 weights, LoRA on every linear layer).

Every aten op of the training steps is recorded with a `TorchDispatchMode`, for EMOTrainer and, on the same model and
batches, for TRL's own SFTTrainer (the baseline): the vocabulary-sized GEMMs must run in bf16, the (V, d) head must
never be copied to fp32, and the loss must not add fp32 copies of the hidden states beyond what SFTTrainer makes.
"""

import collections

import torch
from tiny_models import build_tokenizer, lora, make_args
from transformers import AutoModelForCausalLM, LlamaConfig, TrainerCallback
from trl import SFTTrainer

from benchmarks.common import vocab_op_recorder  # the one recorder, shared with benchmarks/bench_train_step.py
from emo_calibrate import EMOTrainer


# Sizes chosen so that no other dimension of the model or of the batch equals the vocabulary or the hidden size.
VOCAB, HIDDEN = 1024, 48


class RecordSteps(TrainerCallback):
    def __init__(self, recorder):
        self.recorder = recorder

    def on_step_begin(self, args, state, control, **kwargs):
        self.recorder.new_step()
        self.recorder.__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        self.recorder.__exit__(None, None, None)


def bf16_model():
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=2, eos_token_id=3,
        tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2:
                torch.nn.init.normal_(param, std=0.3 if "embed" in name or "lm_head" in name else 0.1)
    return model.to(torch.bfloat16)


def record(trainer_cls, tmp_path, dataset):
    recorder = vocab_op_recorder(VOCAB, HIDDEN)
    args = make_args(tmp_path / trainer_cls.__name__, use_cpu=True, bf16=True, max_steps=3)
    trainer = trainer_cls(
        bf16_model(), args=args, train_dataset=dataset, processing_class=build_tokenizer(), peft_config=lora(),
        callbacks=[RecordSteps(recorder)],
    )  # fmt: skip
    trainer.train()
    assert len(recorder.steps) == 3
    return recorder.steps


def summary(steps):
    return [
        {
            "vocab GEMM dtypes": dict(step["vocab_gemms"]),
            "fp32 copies of the (V, d) head": step["head_fp32_copies"],
            "fp32 copies of (B, L, d) hidden states": collections.Counter(step["hidden_fp32_copies"]),
        }
        for step in steps
    ]


def test_bf16_training_runs_the_head_in_bf16_without_fp32_copies(tmp_path, tiny_dataset):
    emo, sft = record(EMOTrainer, tmp_path, tiny_dataset), record(SFTTrainer, tmp_path, tiny_dataset)
    print("\nEMOTrainer, per step:", *summary(emo), sep="\n  ")
    print("SFTTrainer, per step:", *summary(sft), sep="\n  ")
    for name, steps in (("EMOTrainer", emo), ("SFTTrainer", sft)):
        for step in steps:
            assert step["vocab_gemms"], f"{name}: no vocabulary GEMM recorded"
            wrong = [dtypes for dtypes in step["vocab_gemms"] if set(dtypes) != {"bfloat16"}]
            assert not wrong, f"{name}: vocabulary GEMMs not in bf16: {wrong}"
    for number, (emo_step, sft_step) in enumerate(zip(emo, sft)):
        assert emo_step["head_fp32_copies"] == []
        # The same fp32 copies of the hidden states as SFTTrainer (RMSNorm's upcast, PEFT casting LoRA inputs to its
        # fp32 adapters, their backward), none per layer from the loss. The first step also checks once, on one
        # example (batch dimension 1), that the fused logits reproduce the model's own.
        batch = [shape for shape in emo_step["hidden_fp32_copies"] if shape[0] > 1]
        assert len(batch) <= len(sft_step["hidden_fp32_copies"])
        if number > 0:
            assert len(batch) == len(emo_step["hidden_fp32_copies"])


def test_bf16_fused_and_reference_paths_agree(tmp_path, tiny_dataset):
    """Under bf16 autocast the fused head (bf16 GEMMs) and the reference loss on the model's logits train alike,
    within bf16 rounding: loss, every token metric and the gradient norm."""
    logs = {}
    for fused in (True, False):
        args = make_args(tmp_path / str(fused), use_cpu=True, bf16=True, emo_fused_head=fused, learning_rate=5e-3)
        trainer = EMOTrainer(
            bf16_model(), args=args, train_dataset=tiny_dataset, processing_class=build_tokenizer(), peft_config=lora()
        )
        trainer.train()
        assert (trainer._fused_reason is None) == fused
        keys = ("loss", "mle", "emo", "emd", "emo_ratio", "entropy", "grad_norm")
        logs[fused] = torch.tensor([[h[k] for k in keys] for h in trainer.state.log_history if "mle" in h])
    print("\nfused:", logs[True].tolist(), "\nreference:", logs[False].tolist())
    torch.testing.assert_close(logs[True], logs[False], rtol=2e-2, atol=2e-2)
