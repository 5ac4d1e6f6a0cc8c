"""Short EMOTrainer runs and how tests compare them: a batch x accumulation layout, two runs that must train alike."""

import torch
from tiny_models import lora, make_args, tiny_text_dataset
from transformers import AutoModelForCausalLM

from emo_calibrate import EMOTrainer


LOGGED = ("loss", "grad_norm", "mle", "emo", "emd", "entropy")


def train_logs(model_dir, output_dir, batch, accumulation, accepts_loss_kwargs=True, steps=3):
    """The logged values of `steps` optimizer steps, and the target tokens of each micro-batch."""
    from pathlib import Path

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if not accepts_loss_kwargs:
        model.accepts_loss_kwargs = False  # as many *ForConditionalGeneration classes declare
    # use_cpu=True: under torchrun without it, the Trainer would not run distributed on a machine without GPU
    args = make_args(
        Path(output_dir), per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
        max_steps=steps, use_cpu=True, bf16=False,
    )  # fmt: skip
    trainer = EMOTrainer(model, args=args, train_dataset=tiny_text_dataset(), peft_config=lora())
    assert trainer.model_accepts_loss_kwargs  # the EMO loss always has the window's tokens counted
    tokens = []
    log_metrics = trainer._log_token_metrics

    def spy(mode, result, inputs):
        tokens.append(int(result.num_tokens))
        return log_metrics(mode, result, inputs)

    trainer._log_token_metrics = spy
    trainer.train()
    logs = [{key: h[key] for key in LOGGED} for h in trainer.state.log_history if "mle" in h]
    lora_sum = sum(float(p.detach().double().sum()) for n, p in trainer.model.named_parameters() if "lora_" in n)
    world = trainer.args.world_size
    return {"logs": logs, "tokens": tokens, "lora": lora_sum, "world_size": world}


def as_table(logs):
    return torch.tensor([[h[key] for key in LOGGED] for h in logs], dtype=torch.float64)


def lora_state(trainer):
    return {n: p.detach().float().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}


def assert_trained_alike(first, second, keys=("loss", "mle", "emo", "emd", "grad_norm")):
    """Two trained EMOTrainers logged the same values and reached the same LoRA weights (fp32 rounding apart)."""
    logs = [torch.tensor([[h[k] for k in keys] for h in t.state.log_history if "mle" in h]) for t in (first, second)]
    torch.testing.assert_close(logs[0], logs[1], rtol=1e-4, atol=1e-5)
    second_state = lora_state(second)
    for name, value in lora_state(first).items():
        torch.testing.assert_close(value, second_state[name], rtol=1e-3, atol=1e-5, msg=name)
