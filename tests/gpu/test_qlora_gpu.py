"""QLoRA with EMO on a CUDA GPU: 4-bit loading, training steps, the fused head in bf16, and merging.

All skipped without CUDA (CI has no GPU; benchmarks/gpu/run_gpu_proof.sh runs them on a lent GPU with `-m gpu`).
"""

import pytest
import torch


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

CUDA = {"": 0}  # the first CUDA device, as transformers' docs write it


def nf4(compute_dtype=torch.bfloat16):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_use_double_quant=True,
    )  # fmt: skip


def lora(**overrides):
    from peft import LoraConfig

    values = dict(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM", lora_dropout=0.0)
    values.update(overrides)
    return LoraConfig(**values)


def load(path, quantized=True):
    from transformers import AutoModelForCausalLM

    extra = {"quantization_config": nf4()} if quantized else {}
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map=CUDA, **extra)


def test_4bit_load_on_cuda(tiny_llama_dir):
    import bitsandbytes as bnb

    model = load(tiny_llama_dir)
    assert model.is_loaded_in_4bit
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 2 * 7  # every linear layer of both blocks; the head stays unquantised
    for layer in layers:
        assert layer.weight.device.type == "cuda" and layer.weight.dtype == torch.uint8
        assert layer.weight.quant_state is not None and layer.weight.quant_state.quant_type == "nf4"

    ids = torch.randint(4, 128, (2, 24), generator=torch.Generator().manual_seed(0)).cuda()
    with torch.no_grad():
        quantized = model(input_ids=ids).logits.float()
        dequantized = load(tiny_llama_dir).dequantize()(input_ids=ids).logits.float()
        original = load(tiny_llama_dir, quantized=False)(input_ids=ids).logits.float()
    assert torch.isfinite(quantized).all()
    # The CUDA 4-bit kernels compute with the dequantised weights ...
    assert (quantized - dequantized).norm() / dequantized.norm() < 2e-2
    # ... which are close to the original ones (NF4 rounding only), not garbage.
    error = (quantized - original).norm() / original.norm()
    assert error < 0.3, error
    assert torch.corrcoef(torch.stack([quantized.flatten(), original.flatten()]))[0, 1] > 0.95


def test_emo_steps_on_cuda_move_every_lora_tensor(tiny_llama_dir, tiny_dataset, tmp_path):
    from emo_calibrate import EMOConfig, EMOTrainer

    args = EMOConfig(
        output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=4, learning_rate=5e-2,
        logging_steps=1, max_length=32, report_to="none", save_strategy="no", activation_checkpointing=True,
        bf16=True, seed=0, model_init_kwargs={"dtype": torch.bfloat16, "device_map": CUDA},
        emo_guard_max_ppl_ratio=None,  # every step must update the adapters: no budget that could keep step 0
    )  # fmt: skip
    trainer = EMOTrainer(
        tiny_llama_dir, args=args, train_dataset=tiny_dataset, quantization_config=nf4(), peft_config=lora()
    )
    model = trainer.model
    assert model.is_loaded_in_4bit and next(model.parameters()).device.type == "cuda"
    assert trainer._fused_reason is None  # the fused EMO head is planned
    before = {n: p.detach().float().clone() for n, p in model.named_parameters() if "lora_" in n}
    frozen = {n: p.detach().float().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert len(before) == 2 * 7 * 2

    trainer.train()
    # Read again after training: the check at step 1 can switch a run to the full-logits path.
    assert trainer._fused_reason is None and trainer._fused_verified

    after = {n: p.detach().float() for n, p in model.named_parameters() if "lora_" in n}
    unchanged = [n for n in before if torch.equal(before[n], after[n])]
    assert not unchanged, f"LoRA tensors that never moved: {unchanged}"
    params = dict(model.named_parameters())
    for name, value in frozen.items():
        torch.testing.assert_close(params[name].detach().float(), value, msg=name)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3
    for entry in logs:
        assert all(torch.isfinite(torch.tensor(float(entry[k]))) for k in ("loss", "mle", "emo")), entry


@pytest.mark.parametrize("weighting", ["emo_anchored", "mle_anchored", "mle"])
def test_fused_head_matches_the_reference_on_cuda_bf16(weighting):
    """The fused bf16 head against the reference loss computed in fp32 from the same bf16 inputs."""
    from emo_calibrate.losses.fused import fused_linear_emo_loss
    from emo_calibrate.losses.reference import emo_loss

    generator = torch.Generator(device="cuda").manual_seed(0)
    n, d, vocab = 300, 64, 1000
    hidden = torch.randn(n, d, device="cuda", generator=generator).bfloat16()
    weight = (torch.randn(vocab, d, device="cuda", generator=generator) * 0.3).bfloat16()
    targets = torch.randint(0, vocab, (n,), device="cuda", generator=generator)

    h_fused = hidden.clone().requires_grad_()
    fused = fused_linear_emo_loss(h_fused, weight, targets, weighting=weighting, chunk_size=64)
    fused.loss.backward()

    # Reference: full fp32 logits with one dummy final position, labels unshifted (position t+1 is t's target).
    h_ref = hidden.float().clone().requires_grad_()
    logits = torch.cat([h_ref @ weight.float().t(), torch.zeros(1, vocab, device="cuda")])[None]
    labels = torch.cat([torch.tensor([-100], device="cuda"), targets])[None]
    reference = emo_loss(logits, labels, weight.float(), weighting=weighting)
    reference.loss.backward()

    for field in ("loss", "mle", "emo", "ratio"):
        got, want = getattr(fused, field).float(), getattr(reference, field).float()
        assert torch.isfinite(got)
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-3, msg=field)
    assert int(fused.num_tokens) == n
    error = (h_fused.grad.float() - h_ref.grad).norm() / h_ref.grad.norm()
    assert error < 3e-2, error


def test_merge_on_cuda_keeps_the_distribution(tiny_llama_dir, tmp_path):
    """Merge a 4-bit-trained adapter on CUDA; the merged bf16 model's softmax matches the adapter model's."""
    from peft import get_peft_model

    merge = pytest.importorskip(
        "emo_calibrate.export.merge", reason="emo_calibrate.export.merge is not in this checkout"
    )

    # A non-zero adapter (B is not initialised to zero) so that the merge has something to get wrong.
    adapter_model = get_peft_model(load(tiny_llama_dir), lora(init_lora_weights=False))
    adapter_model.save_pretrained(tmp_path / "adapter")
    # The record EMOTrainer.save_model writes: 4-bit on CUDA, so the merge defaults to a CUDA re-quantisation.
    from emo_calibrate.export.records import save_training_record

    save_training_record(adapter_model, tmp_path / "adapter")
    report = merge.merge_adapter(
        str(tmp_path / "adapter"), str(tmp_path / "merged"), model_name_or_path=tiny_llama_dir, dtype="bfloat16"
    )
    assert (report.merge_base, report.device, report.code_check["status"]) == ("dequantized", "cuda", "match")
    merged = load(str(tmp_path / "merged"), quantized=False)
    assert not getattr(merged, "is_loaded_in_4bit", False)

    ids = torch.randint(4, 128, (4, 32), generator=torch.Generator().manual_seed(1)).cuda()
    adapter_model.eval()
    with torch.no_grad():
        expected = adapter_model(input_ids=ids).logits.float().softmax(-1)
        with adapter_model.disable_adapter():
            base = adapter_model(input_ids=ids).logits.float().softmax(-1)
        got = merged(input_ids=ids).logits.float().softmax(-1)
    assert (expected - base).abs().max() > 5e-2, "the adapter hardly changes the model: the check would be vacuous"
    torch.testing.assert_close(got, expected, atol=1e-2, rtol=0)
