"""DeepSpeed ZeRO-3 without deepspeed installed: a stand-in shows that the fused head is used, with the head gathered
for each step inside the model's forward (as TRL's own fused head does), and that it trains like the fused path
without ZeRO-3."""

import enum
import importlib.machinery
import sys
import types

import pytest
import torch
from tiny_models import lora, make_args

from emo_calibrate import EMOTrainer
from emo_calibrate.training import trainer as trainer_module


class _ZeroParamStatus(enum.Enum):
    AVAILABLE = 1
    NOT_AVAILABLE = 2
    INFLIGHT = 3


class _FakeGatheredParameters:
    """Stands in for `deepspeed.zero.GatheredParameters` (on one process the weight is already whole): records what
    is gathered and whether the model's forward is running at that moment."""

    calls = []
    in_forward = False

    def __init__(self, params, modifier_rank=None):
        assert modifier_rank is None  # read-only gather
        self.params = list(params)

    def __enter__(self):
        type(self).calls.append(([id(p) for p in self.params], type(self).in_forward))

    def __exit__(self, *exc):
        return False


@pytest.fixture
def fake_zero3(monkeypatch):
    deepspeed = types.ModuleType("deepspeed")
    deepspeed.__spec__ = importlib.machinery.ModuleSpec("deepspeed", None)  # not installed: no metadata, no version
    deepspeed.zero = types.SimpleNamespace(GatheredParameters=_FakeGatheredParameters)
    partition = types.ModuleType("deepspeed.runtime.zero.partition_parameters")
    partition.ZeroParamStatus = _ZeroParamStatus
    for name in ("deepspeed.runtime", "deepspeed.runtime.zero"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "deepspeed", deepspeed)
    monkeypatch.setitem(sys.modules, "deepspeed.runtime.zero.partition_parameters", partition)
    monkeypatch.setattr("emo_calibrate.training.trainer.is_deepspeed_zero3_enabled", lambda: True)
    # TRL's maybe_gather_lm_head_ctx looks the flag up in transformers at each call
    monkeypatch.setattr("transformers.integrations.deepspeed.is_deepspeed_zero3_enabled", lambda: True)
    _FakeGatheredParameters.calls = []
    _FakeGatheredParameters.in_forward = False


def logs_of(trainer):
    return torch.tensor(
        [(h["loss"], h["mle"], h["emo"], h["grad_norm"]) for h in trainer.state.log_history if "mle" in h]
    )


def test_zero3_takes_the_fused_path_with_the_head_gathered_in_the_forward(
    fake_zero3, monkeypatch, tmp_path, tiny_tied_dir, tiny_dataset
):
    trainer = EMOTrainer(
        tiny_tied_dir, args=make_args(tmp_path / "z3"), train_dataset=tiny_dataset, peft_config=lora()
    )
    head = trainer.model.get_output_embeddings().weight
    # The frozen cost embedding is a copy gathered once, at set-up (not the partitioned parameter).
    assert [ids for ids, _ in _FakeGatheredParameters.calls] == [[id(head)]]
    assert trainer._emo_cost.data_ptr() != head.data_ptr()
    torch.testing.assert_close(trainer._emo_cost, head.detach())
    assert trainer._fused_reason is None

    head.ds_status = _ZeroParamStatus.NOT_AVAILABLE  # partitioned outside its module's forward
    model = trainer.model

    def enter(*args, **kwargs):
        _FakeGatheredParameters.in_forward = True

    def leave(*args, **kwargs):
        _FakeGatheredParameters.in_forward = False

    model.register_forward_pre_hook(enter)
    model.register_forward_hook(leave)
    reference_calls = []
    monkeypatch.setattr(trainer_module, "emo_loss", lambda *a, **k: reference_calls.append(1))
    _FakeGatheredParameters.calls = []
    trainer.train()

    assert not reference_calls, "the reference full-logits loss was used"
    gathers = _FakeGatheredParameters.calls
    # 3 steps, plus the one-time check of the fused logits; each gathers the head, inside the model's forward
    assert len(gathers) == 4 and all(ids == [id(head)] and in_forward for ids, in_forward in gathers), gathers
    zero3_logs = logs_of(trainer)

    monkeypatch.undo()  # no ZeRO-3, no deepspeed
    plain = EMOTrainer(
        tiny_tied_dir, args=make_args(tmp_path / "plain"), train_dataset=tiny_dataset, peft_config=lora()
    )
    plain.train()
    # Same training: ZeRO-3 reads the frozen copy as an external cost (two GEMMs instead of one stacked GEMM).
    torch.testing.assert_close(zero3_logs, logs_of(plain), rtol=1e-4, atol=1e-5)


def test_zero3_refuses_an_adaptive_cost_embedding(fake_zero3, tmp_path, tiny_llama_dir, tiny_dataset):
    with pytest.raises(ValueError, match="ZeRO-3"):
        EMOTrainer(
            tiny_llama_dir, args=make_args(tmp_path, emo_cost_embedding="adaptive"), train_dataset=tiny_dataset,
            peft_config=lora(),
        )  # fmt: skip
