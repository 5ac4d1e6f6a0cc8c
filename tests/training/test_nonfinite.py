"""The non-finite guard: NaN/inf steps are skipped, counted, logged, and stop the run when they persist; NaN weights are
never saved."""

import logging
import math
import os

import pytest
import torch
from tiny_models import lora, make_args
from transformers import TrainerCallback

from emo_calibrate import EMOConfig, EMOTrainer
from emo_calibrate.training.callbacks import NonFiniteTrainingError


class Snapshots(TrainerCallback):
    """Trainable weights after every optimizer step, keyed by step (0 = before training)."""

    def __init__(self):
        self.by_step = {}

    def _take(self, state, model):
        self.by_step[state.global_step] = {
            n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad
        }

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._take(state, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self._take(state, model)


class PoisonSteps(TrainerCallback):
    """Makes the given optimizer steps non-finite like a bad batch would: NaN activations out of the embedding layer
    (so NaN loss and gradients), or, with `grad_only`, a finite loss but a NaN gradient on one adapter tensor."""

    def __init__(self, steps, grad_only=False):
        self.steps, self.grad_only, self.handles = set(steps), grad_only, []

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        for handle in self.handles:
            handle.remove()
        self.handles = []
        if state.global_step + 1 not in self.steps:
            return
        if self.grad_only:
            param = next(p for n, p in model.named_parameters() if "lora_A" in n)
            self.handles.append(param.register_hook(lambda grad: grad * float("nan")))
        else:
            embed = model.get_input_embeddings()
            self.handles.append(embed.register_forward_hook(lambda module, args, out: out * float("nan")))


def run(tmp_path, tiny_llama_dir, tiny_dataset, poison, steps=5, **overrides):
    snapshots = Snapshots()
    args = make_args(tmp_path, output_dir=str(tmp_path / "out"), max_steps=steps, **overrides)
    trainer = EMOTrainer(
        tiny_llama_dir, args=args, train_dataset=tiny_dataset, peft_config=lora(), callbacks=[poison, snapshots]
    )
    return trainer, snapshots


def logged(trainer, key):
    return [h.get(key) for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]


def assert_same(a, b):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("grad_only", [False, True], ids=["nan_batch", "nan_gradient"])
def test_a_nonfinite_step_is_skipped_counted_and_logged(tmp_path, tiny_llama_dir, tiny_dataset, grad_only):
    trainer, snapshots = run(tmp_path, tiny_llama_dir, tiny_dataset, PoisonSteps({2}, grad_only))
    trainer.train()

    assert_same(snapshots.by_step[2], snapshots.by_step[1])  # step 2 changed nothing
    for step in (1, 3, 4, 5):  # every other step did update the adapter
        assert any(
            not torch.equal(snapshots.by_step[step][n], snapshots.by_step[step - 1][n]) for n in snapshots.by_step[0]
        )
    assert all(torch.isfinite(p).all() for p in snapshots.by_step[5].values())
    assert logged(trainer, "nonfinite_steps") == [0, 1, 1, 1, 1]
    # The optimizer never saw the bad step: Adam's step count is one short.
    state = trainer.optimizer.state[next(p for p in trainer.model.parameters() if p.requires_grad)]
    assert int(state["step"]) == 4


def test_consecutive_nonfinite_steps_stop_with_a_checkpoint_of_the_last_good_weights(
    tmp_path, tiny_llama_dir, tiny_dataset
):
    trainer, snapshots = run(
        tmp_path, tiny_llama_dir, tiny_dataset, PoisonSteps(range(2, 100)), steps=20, emo_max_nonfinite_steps=2
    )
    with pytest.raises(NonFiniteTrainingError, match="emo_max_nonfinite_steps=2") as stopped:
        trainer.train()
    assert trainer.state.global_step == 4  # steps 2 and 3 skipped, the third bad step in a row stops
    checkpoint = stopped.value.checkpoint
    assert checkpoint == str(tmp_path / "out" / "checkpoint-4")
    assert f"--resume_from_checkpoint {checkpoint}" in str(stopped.value)
    assert_same(snapshots.by_step[4], snapshots.by_step[1])

    from safetensors.torch import load_file

    saved = load_file(os.path.join(checkpoint, "adapter_model.safetensors"))
    live = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert len(saved) == len(live) and all(torch.isfinite(t).all() for t in saved.values())


def test_zero_tolerance_stops_at_the_first_bad_step_and_isolated_bad_steps_do_not(
    tmp_path, tiny_llama_dir, tiny_dataset
):
    trainer, _ = run(tmp_path / "a", tiny_llama_dir, tiny_dataset, PoisonSteps({2}), emo_max_nonfinite_steps=0)
    with pytest.raises(NonFiniteTrainingError):
        trainer.train()
    assert trainer.state.global_step == 2

    trainer, _ = run(tmp_path / "b", tiny_llama_dir, tiny_dataset, PoisonSteps({2, 4}), emo_max_nonfinite_steps=1)
    trainer.train()  # never two in a row
    assert logged(trainer, "nonfinite_steps")[-1] == 2


def test_nan_weights_are_never_saved(tmp_path, tiny_llama_dir, tiny_dataset):
    trainer, _ = run(tmp_path, tiny_llama_dir, tiny_dataset, PoisonSteps(()), steps=1)
    trainer.train()
    name, param = next((n, p) for n, p in trainer.model.named_parameters() if "lora_B" in n)
    with torch.no_grad():
        param[0, 0] = float("nan")
    target = tmp_path / "adapter"
    with pytest.raises(ValueError, match=f"Refusing to save.*{name}"):
        trainer.save_model(str(target))
    assert not target.exists()
    with pytest.raises(ValueError, match="Refusing to save"):
        trainer._save_checkpoint(trainer.model, trial=None)
    assert not (tmp_path / "out" / "checkpoint-1" / "adapter_model.safetensors").exists()


def test_max_nonfinite_steps_must_not_be_negative(tmp_path):
    with pytest.raises(ValueError, match="emo_max_nonfinite_steps must be >= 0"):
        EMOConfig(output_dir=str(tmp_path), emo_max_nonfinite_steps=-1, report_to="none")


# ---- under DeepSpeed (a stand-in: deepspeed is not installed) -----------------------------------------------------


class DeepSpeedStandIn(TrainerCallback):
    """What the guard sees under DeepSpeed, without deepspeed. accelerate's `DeepSpeedEngineWrapper` (set on the
    accelerator by `prepare`) runs the engine's backward AND its step, then zeroes the gradients; the Trainer's own
    `optimizer.step()` does nothing; the engine reports the gradient norm (`get_global_grad_norm`). With
    `overflow_skips` the engine skips a non-finite step itself, as DeepSpeed's fp16 loss scaler does, and says so
    (`optimizer_step_was_skipped`). Inserted first, so it is in place before the guard's `on_train_begin`."""

    def __init__(self, trainer, overflow_skips=False):
        self.trainer, self.overflow_skips, self.norm, self.skipped = trainer, overflow_skips, 0.0, False
        trainer.callback_handler.callbacks.insert(0, self)

    def get_global_grad_norm(self):
        return self.norm

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        accelerator = self.trainer.accelerator
        backward, self.engine_step = accelerator.backward, optimizer.step
        optimizer.step = lambda *a, **k: None

        def engine_backward(loss, **kw):
            backward(loss, **kw)
            if accelerator.sync_gradients:
                grads = [p.grad for p in model.parameters() if p.grad is not None]
                self.norm = float(torch.nn.utils.get_total_norm(grads, error_if_nonfinite=False))
                self.skipped = self.overflow_skips and not math.isfinite(self.norm)
                if not self.skipped:
                    self.engine_step()
                model.zero_grad(set_to_none=True)

        accelerator.backward = engine_backward
        accelerator.deepspeed_engine_wrapped = self

    def on_train_end(self, args, state, control, **kwargs):
        self.trainer.accelerator.deepspeed_engine_wrapped = None


@pytest.mark.parametrize("grad_only", [False, True], ids=["nan_batch", "nan_gradient"])
def test_under_deepspeed_a_nonfinite_update_stops_training_and_it_says_so(
    tmp_path, tiny_llama_dir, tiny_dataset, caplog, grad_only
):
    """The update was applied inside backward, so it cannot be skipped: stop at once, warn once at the start, keep
    the NaN weights out of any checkpoint and name the last complete one."""
    trainer, _ = run(tmp_path, tiny_llama_dir, tiny_dataset, PoisonSteps({2}, grad_only), steps=6,
                     save_strategy="steps", save_steps=1)  # fmt: skip
    DeepSpeedStandIn(trainer)
    with caplog.at_level(logging.WARNING, logger="emo_calibrate"), pytest.raises(NonFiniteTrainingError) as stopped:
        trainer.train()
    assert caplog.text.count("Non-finite guard under DeepSpeed") == 1
    assert trainer.state.global_step == 2
    assert "under DeepSpeed the update was already applied" in str(stopped.value)
    assert "The weights now hold NaN/inf, so they were not saved" in str(stopped.value)
    assert stopped.value.checkpoint == str(tmp_path / "out" / "checkpoint-1")
    assert f"--resume_from_checkpoint {stopped.value.checkpoint}" in str(stopped.value)
    assert not (tmp_path / "out" / "checkpoint-2").exists()


def test_under_deepspeed_its_own_overflow_skips_count_as_skipped_steps(tmp_path, tiny_llama_dir, tiny_dataset,
                                                                       monkeypatch):  # fmt: skip
    trainer, snapshots = run(tmp_path, tiny_llama_dir, tiny_dataset, PoisonSteps({2}))
    stand_in = DeepSpeedStandIn(trainer, overflow_skips=True)
    monkeypatch.setattr(type(trainer.accelerator), "optimizer_step_was_skipped", property(lambda _: stand_in.skipped))
    trainer.train()
    assert_same(snapshots.by_step[2], snapshots.by_step[1])
    assert logged(trainer, "nonfinite_steps") == [0, 1, 1, 1, 1]
