"""The cost embedding's identity at realistic size (32000 x 256): the same matrix in any dtype is accepted on resume,
another matrix of the same shape and scale is refused with a message that says what differs."""

import pytest
import torch
from safetensors.torch import save_file
from tiny_models import build_tiny_model, build_tokenizer, lora, make_args

from emo_calibrate import EMOTrainer
from emo_calibrate.training.cost_identity import CostIdentity


VOCAB, WIDTH = 32000, 256


def realistic_matrix(seed: int) -> torch.Tensor:
    """A (32000, 256) matrix with the spread of a trained LM head (entries ~ N(0, 0.05^2))."""
    return torch.randn(VOCAB, WIDTH, generator=torch.Generator().manual_seed(seed)) * 0.05


@pytest.fixture(scope="module")
def cost():
    return realistic_matrix(0)


# ---- the identity itself -----------------------------------------------------------------------------------------


def test_the_same_matrix_in_any_dtype_is_the_same_identity(cost):
    identity = CostIdentity.of(cost)
    for other in (cost.bfloat16(), cost.half(), cost.bfloat16().float(), cost.half().bfloat16(), cost.t().t().clone()):
        assert identity.difference(CostIdentity.of(other)) is None, other.dtype
        assert CostIdentity.of(other).difference(identity) is None, other.dtype
    assert CostIdentity.of(cost.bfloat16()).difference(CostIdentity.of(cost.bfloat16().float())) is None


def test_rounding_ties_and_double_rounding_are_accepted():
    """1 + 2^-8 + 2^-12 rounds to 1 + 2^-7 in bf16, but through fp16 (1 + 2^-8, a bf16 tie) to 1.0: an exact hash of
    bf16-rounded values would tell these apart; the identity's bound accepts every one of them."""
    x = torch.full((4, 64), 1 + 2**-8 + 2**-12) * torch.tensor([1.0, -1.0, 3.0, 1e-3])[:, None]
    direct, through_fp16 = x.bfloat16(), x.half().bfloat16()
    assert not torch.equal(direct, through_fp16)
    identities = [CostIdentity.of(t) for t in (x, x.half(), direct, through_fp16)]
    for a in identities:
        for b in identities:
            assert a.difference(b) is None, (a.dtype, b.dtype)


def test_another_matrix_of_the_same_shape_and_scale_is_refused(cost):
    identity = CostIdentity.of(cost)
    replacement = realistic_matrix(1)
    assert float(replacement.norm()) == pytest.approx(float(cost.norm()), rel=1e-2)  # what fooled the old fingerprint
    for other in (replacement, replacement.bfloat16()):
        message = identity.difference(CostIdentity.of(other))
        assert message is not None and message.startswith(f"{VOCAB} of {VOCAB} rows differ"), message
        assert "same shape and scale" in message
    one_row = cost.clone()
    one_row[12345] = replacement[12345]
    assert "1 of 32000 rows differ" in identity.difference(CostIdentity.of(one_row))
    assert "(first rows: 12345)" in CostIdentity.of(cost.bfloat16()).difference(CostIdentity.of(one_row.bfloat16()))
    one_entry = cost.clone()
    one_entry[7, 3] *= 1.001  # far below bf16's rounding, far above fp32's
    assert "first rows: 7)" in identity.difference(CostIdentity.of(one_entry))
    assert "shape is (32000, 128)" in identity.difference(CostIdentity.of(cost[:, :128]))


def test_saved_identity_reads_back_equal(cost, tmp_path):
    identity = CostIdentity.of(cost.bfloat16())
    identity.save(str(tmp_path / "identity.safetensors"))
    loaded = CostIdentity.load(str(tmp_path / "identity.safetensors"))
    assert (loaded.shape, loaded.dtype) == ((VOCAB, WIDTH), "bfloat16")
    assert loaded.difference(identity) is None and identity.difference(loaded) is None
    assert loaded.difference(CostIdentity.of(realistic_matrix(1))) is not None


# ---- through a resumed run ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def big_vocab(tmp_path_factory):
    """Tiny Llamas with a 32000-row head (fp32 and its bf16 copy, and another of the same scale), and cost files."""
    root = tmp_path_factory.mktemp("big-vocab")
    paths = {}
    for name, seed, dtype in (("fp32", 0, torch.float32), ("bf16", 0, torch.bfloat16), ("other", 1, torch.float32)):
        build_tiny_model("llama", seed=seed, vocab_size=VOCAB).to(dtype).save_pretrained(root / name)
        build_tokenizer().save_pretrained(root / name)
        paths[name] = str(root / name)
    return paths


def train_then_resume(tmp_path, model_dir, dataset, cost_source, swap, first_dtype="float32", resumed_dtype="float32"):
    """One step with a checkpoint, `swap()` (what changed on disk), then resume for one more step."""

    def trainer(steps, dtype):
        args = make_args(tmp_path, output_dir=str(tmp_path / "run"), max_steps=steps, save_strategy="steps",
                         save_steps=1, emo_cost_embedding=cost_source, model_init_kwargs={"dtype": dtype})  # fmt: skip
        return EMOTrainer(model_dir, args=args, train_dataset=dataset, peft_config=lora())

    trainer(1, first_dtype).train()
    swap()
    resumed = trainer(2, resumed_dtype)
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-1"))
    return resumed


def test_resume_refuses_a_replaced_cost_file_of_the_same_shape_and_scale(tmp_path, big_vocab, tiny_dataset, cost):
    """The issue's case: emo_cost_embedding is a 32000 x 256 file, replaced by another draw of the same distribution."""
    path = str(tmp_path / "cost.safetensors")
    save_file({"lm_head.weight": cost}, path)
    replace = lambda: save_file({"lm_head.weight": realistic_matrix(1)}, path)  # noqa: E731
    with pytest.raises(ValueError, match=r"cost embedding differs.*32000 of 32000 rows differ.*same shape and scale"):
        train_then_resume(tmp_path, big_vocab["fp32"], tiny_dataset, path, replace)


def test_resume_accepts_the_cost_file_rounded_to_bf16(tmp_path, big_vocab, tiny_dataset, cost):
    path = str(tmp_path / "cost.safetensors")
    save_file({"lm_head.weight": cost}, path)
    rounded = lambda: save_file({"lm_head.weight": cost.bfloat16()}, path)  # noqa: E731
    resumed = train_then_resume(tmp_path, big_vocab["fp32"], tiny_dataset, path, rounded)
    assert resumed.state.global_step == 2


@pytest.mark.parametrize(
    "saved, first, resumed",
    [("bf16", "float32", "bfloat16"), ("bf16", "bfloat16", "float32"), ("fp32", "float32", "bfloat16")],
    ids=["bf16_checkpoint_fp32_then_bf16", "bf16_checkpoint_bf16_then_fp32", "fp32_then_its_bf16_rounding"],
)
def test_resume_accepts_the_same_frozen_head_loaded_in_another_dtype(tmp_path, big_vocab, tiny_dataset, saved, first,
                                                                      resumed):  # fmt: skip
    run = train_then_resume(tmp_path, big_vocab[saved], tiny_dataset, "frozen", lambda: None, first, resumed)
    assert run.state.global_step == 2
    assert run.model.get_output_embeddings().weight.dtype == getattr(torch, resumed)


def test_resume_refuses_another_base_model_of_the_same_shape_and_scale(tmp_path, big_vocab, tiny_dataset):
    args = make_args(tmp_path, output_dir=str(tmp_path / "run"), max_steps=1, save_strategy="steps", save_steps=1)
    EMOTrainer(big_vocab["fp32"], args=args, train_dataset=tiny_dataset, peft_config=lora()).train()
    args = make_args(tmp_path, output_dir=str(tmp_path / "run"), max_steps=2)
    other = EMOTrainer(big_vocab["other"], args=args, train_dataset=tiny_dataset, peft_config=lora())
    with pytest.raises(ValueError, match=r"cost embedding differs.*32000 of 32000 rows differ"):
        other.train(resume_from_checkpoint=True)
