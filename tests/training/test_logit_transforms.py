"""Models whose head soft-caps or scales its logits (Gemma 2, Cohere, Granite) train on the fused head, which applies
the same transform, exactly like the reference loss on the model's own logits. A transform the config does not
reveal is caught by the one-time check, and the loss falls back to the reference path, saying so once."""

import logging

import pytest
import torch
from tiny_models import build_tiny_model, build_tokenizer, lora, make_args
from training_runs import assert_trained_alike

from emo_calibrate import EMOTrainer
from emo_calibrate.losses import emo_loss, fused_linear_emo_loss, output_logit_transform


@pytest.mark.parametrize("arch", ["gemma2", "cohere", "granite"])
def test_fused_head_reproduces_the_models_own_logits(arch):
    """The fused loss on the backbone's last hidden state equals the reference loss on the model's logits."""
    model = build_tiny_model(arch)
    scale, softcap = output_logit_transform(model)
    assert (scale, softcap) != (1.0, None)
    batch = torch.randint(4, 128, (3, 11), generator=torch.Generator().manual_seed(0))
    logits = model(input_ids=batch).logits
    hidden = model.base_model(input_ids=batch).last_hidden_state[:, :-1].reshape(-1, 16)
    weight = model.get_output_embeddings().weight
    reference = emo_loss(logits, batch, weight.detach())
    fused = fused_linear_emo_loss(
        hidden, weight, batch[:, 1:].reshape(-1), logit_scale=scale, logit_softcap=softcap, chunk_size=7
    )
    for field in ("loss", "mle", "emo", "emd", "entropy"):
        torch.testing.assert_close(getattr(fused, field), getattr(reference, field), rtol=1e-5, atol=1e-6)
    # the transform matters at this scale: ignoring it would give another loss
    plain = fused_linear_emo_loss(hidden, weight, batch[:, 1:].reshape(-1))
    assert not torch.allclose(plain.mle, reference.mle, rtol=1e-3)


@pytest.mark.parametrize("arch", ["gemma2", "cohere", "granite"])
def test_trainer_fused_equals_trainer_reference(arch, tmp_path, tiny_dataset):
    trainers = {}
    for fused in (True, False):
        args = make_args(tmp_path / str(fused), emo_fused_head=fused)
        trainers[fused] = EMOTrainer(
            build_tiny_model(arch), args=args, train_dataset=tiny_dataset, processing_class=build_tokenizer(),
            peft_config=lora(),
        )  # fmt: skip
        trainers[fused].train()
        assert (trainers[fused]._fused_reason is None) == fused  # no fallback, and the one-time check passed
        assert trainers[fused]._fused_verified == fused
    assert_trained_alike(trainers[True], trainers[False])


def test_an_unknown_logit_transform_falls_back_once_with_its_memory(tmp_path, tiny_dataset, caplog):
    """A config attribute the model's forward does not apply (Llama ignores `logit_scale`): the one-time check sees
    that the fused logits differ from the model's and the loss takes the reference path, with one warning."""
    model = build_tiny_model("llama")
    model.config.logit_scale = 0.25
    trainer = EMOTrainer(
        model, args=make_args(tmp_path), train_dataset=tiny_dataset, processing_class=build_tokenizer()
    )
    assert trainer._fused_reason is None
    with caplog.at_level(logging.WARNING, logger="emo_calibrate.training.trainer"):
        trainer.train()
    assert "does not reproduce the model's logits" in trainer._fused_reason
    warnings = [r.getMessage() for r in caplog.records if "reference full-logits path" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "9 fp32 N x V buffers" in warnings[0] and "GiB at this batch" in warnings[0]
    # the reference path trains on the model's own logits: same losses as asking for it
    reference = EMOTrainer(
        build_tiny_model("llama"), args=make_args(tmp_path / "ref", emo_fused_head=False), train_dataset=tiny_dataset,
        processing_class=build_tokenizer(),
    )  # fmt: skip
    reference.train()
    get = lambda t: torch.tensor([h["loss"] for h in t.state.log_history if "mle" in h])  # noqa: E731
    torch.testing.assert_close(get(trainer), get(reference))


def test_dropout_does_not_fail_the_one_time_check(tmp_path, tiny_dataset):
    """Adapters that are not zero (a resume, or an adapter trained before) with LoRA dropout: in training mode the
    check's two forwards would draw different dropout masks and fall back to the full-logits path for nothing. The
    check runs in eval mode, so the fused head is kept, and training equals the reference path's step for step
    (the check draws no random numbers either)."""
    trainers = {}
    for fused in (True, False):
        torch.manual_seed(0)  # the same non-zero adapters for both
        trainers[fused] = EMOTrainer(
            build_tiny_model("llama"), args=make_args(tmp_path / str(fused), emo_fused_head=fused),
            train_dataset=tiny_dataset, processing_class=build_tokenizer(),
            peft_config=lora(lora_dropout=0.5, init_lora_weights=False),
        )  # fmt: skip
        trainers[fused].train()
    assert trainers[True]._fused_reason is None and trainers[True]._fused_verified
    assert_trained_alike(trainers[True], trainers[False])
