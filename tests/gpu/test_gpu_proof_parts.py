"""The pieces of the GPU proof (benchmarks/gpu) that a CPU can check: the order of runs and the time kept for the merge,
which head an EMO run really used, the parameter count of a 4-bit model, merge criteria that can fail, the environment
check, and report figures that mean their labels."""

import os
import sys
from types import SimpleNamespace

import pytest
import torch


sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "benchmarks", "gpu"))

import gpu_proof  # noqa: E402
import proof_env  # noqa: E402
from proof_merge import parity_figures  # noqa: E402
from proof_plan import Schedule, plan_runs  # noqa: E402
from proof_report import compare_runs, markdown  # noqa: E402
from proof_setup import SHAPES, build_random_model, llama_config, random_token_dataset  # noqa: E402
from proof_train import emo_workspace_bytes, run_one, step_callback  # noqa: E402


def test_the_headline_pair_runs_first_and_the_trainers_alternate():
    args = gpu_proof.parse_args([])
    plan = plan_runs(args.models, args.batch_sizes, args.trainers)
    vocab = {m: SHAPES[m]["vocab_size"] for m in args.models}
    first = plan[0]["model"]
    assert vocab[first] == max(vocab.values()) == 128256  # the largest vocabulary, 8B
    assert plan[0]["batch_size"] == max(args.batch_sizes)
    assert [(r["model"], r["batch_size"], r["trainer"]) for r in plan[:4]] == [
        (first, 8, "mle"), (first, 8, "emo"), (first, 1, "emo"), (first, 1, "mle"),
    ]  # fmt: skip
    assert [r["order"] for r in plan] == [1, 2] * (len(plan) // 2)
    assert len(plan) == len(args.models) * len(args.batch_sizes) * 2


def test_schedule_keeps_the_merge_reserve():
    now = [0.0]
    schedule = Schedule(time_budget=300, merge_reserve=120, clock=lambda: now[0], start=0.0)
    assert schedule.may_start() and schedule.may_start(("m", 8))
    schedule.record(("m", 8), 50.0)  # the pair's first run took 50 s
    now[0] = 140.0  # 40 s before the reserve
    assert not schedule.may_start(("m", 8))  # its partner would eat into the reserve
    assert schedule.may_start(("m", 1)) and not schedule.reached()
    now[0] = 180.0
    assert schedule.reached() and not schedule.may_start() and not schedule.may_start(("m", 1))


def test_a_run_stops_at_the_reserve():
    timer = step_callback("cpu", stop_now=lambda: True)
    control = SimpleNamespace(should_training_stop=False)
    state = SimpleNamespace(global_step=1, max_steps=3)
    timer.on_step_begin(None, state, control)
    timer.on_step_end(None, state, control)
    assert control.should_training_stop and timer.stopped and len(timer.times) == 1


@pytest.fixture(scope="module")
def tiny_args(tmp_path_factory):
    return gpu_proof.parse_args(["--dry-run", "--work-dir", str(tmp_path_factory.mktemp("proof"))])


def test_parameters_of_a_4bit_model_are_the_models_own_count():
    from proof_checks import bitsandbytes_problem

    if bitsandbytes_problem("cpu"):
        pytest.skip(f"bitsandbytes' CPU 4-bit kernels do not work here: {bitsandbytes_problem('cpu')}")
    quantized, _ = build_random_model("tiny", device="cpu", dtype=torch.float32, quantize=True)
    plain, _ = build_random_model("tiny", device="cpu", dtype=torch.float32, quantize=False)
    assert quantized.is_loaded_in_4bit
    expected = sum(p.numel() for p in plain.parameters())
    assert quantized.num_parameters() == expected == plain.num_parameters()
    # What the proof summed before: the packed storage, two 4-bit weights per element.
    assert sum(p.numel() for p in quantized.parameters()) < expected


def test_an_emo_run_that_falls_back_is_recorded_after_training_and_fails(tiny_args):
    """At step 1 EMOTrainer checks that the fused head reproduces the model's logits; a model whose forward does more
    (here: logits doubled) is switched to the full-logits reference path. The run must say so, and fail."""
    model, _ = build_random_model("tiny", device="cpu", dtype=torch.float32, quantize=False)
    forward = model.forward

    def doubled(*args, **kwargs):
        output = forward(*args, **kwargs)
        output.logits = output.logits * 2
        return output

    model.forward = doubled
    from proof_setup import build_tokenizer

    dataset = random_token_dataset(2 * 3, tiny_args.seq_len, model.config.vocab_size)
    record = run_one("emo", model, build_tokenizer(), dataset, 2, tiny_args, "cpu", torch.float32, print)
    assert record["emo_fused_head"] is False
    assert "does not reproduce the model's logits" in record["emo_fallback_reason"]
    assert record["status"].startswith("bad: EMO ran the full-logits reference head")
    results = {"runs": [{"model": "tiny", **record}], "comparisons": []}
    passed, verdict = gpu_proof.verdict(results)
    assert not passed and "full-logits" in verdict


def _logits(seed, scale=0.9, shape=(128, 32000)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


def test_merge_parity_criteria_can_fail_at_a_large_vocabulary():
    base = _logits(0)
    adapter = base + _logits(1)  # an adapter that moves every logit by about its own size
    good = parity_figures(adapter, adapter + _logits(2, scale=0.01), base)
    assert good["passed"], good
    vacuous = parity_figures(adapter, base, base)  # a merge that left the adapter out
    # The old criterion (max |softmax diff| <= 1e-2) passed it: every probability is ~1e-5..1e-3 at V = 32000.
    assert vacuous["max_abs_prob_diff"] <= 1e-2
    assert not vacuous["passed"] and not vacuous["checks"]["kl"] and not vacuous["checks"]["top1"]
    assert not vacuous["checks"]["logits"]
    half = parity_figures(adapter, base + 0.5 * (adapter - base), base)  # half of the adapter merged
    assert not half["passed"] and not half["checks"]["kl"]
    tiny_effect = base + _logits(3, scale=1e-3)
    idle = parity_figures(tiny_effect, tiny_effect, base)  # nothing to check: refused, not passed
    assert not idle["passed"] and not idle["checks"]["adapter_moves_model"]


def test_requirement_problems_name_what_is_wrong():
    versions = {"datasets": "5.2.0", "pyarrow": "21.0.0", "transformers": "5.24.0", "pandas": "3.0"}
    requires = {"datasets": ["pyarrow>=24.0.0", "pandas", "dill<0.4.2,>=0.3.0", 'pytest; extra == "tests"']}
    problems = proof_env.requirement_problems(
        ["transformers>=5.24,<6"], ("datasets",), versions.get, lambda name: requires.get(name, [])
    )
    assert problems == [
        "pyarrow 21.0.0 is installed, datasets 5.2.0 requires pyarrow>=24.0.0",
        "dill is not installed (datasets 5.2.0 requires dill<0.4.2,>=0.3.0)",
    ]


def test_the_environment_check_stops_the_proof_in_one_line(tmp_path, monkeypatch, capsys):
    line = "pyarrow 21.0.0 is installed, datasets 5.2.0 requires pyarrow>=24.0.0"
    monkeypatch.setattr(proof_env, "check_environment", lambda *args, **kwargs: [line])
    monkeypatch.setattr(gpu_proof, "_build", lambda *args: pytest.fail("a model was built"))
    assert gpu_proof.main(["--dry-run", "--out", str(tmp_path)]) == proof_env.ENV_ERROR_EXIT
    assert capsys.readouterr().out.rstrip().splitlines()[-1] == f"environment check FAILED: {line}"
    assert not (tmp_path / "gpu_results.json").exists()


def test_the_environment_check_needs_a_cuda_torch_for_the_gpu_proof():
    if torch.version.cuda is not None:
        pytest.skip("this torch is a CUDA build")
    assert proof_env.check_environment("cpu") == []  # this environment meets the proof's requirements
    (problem,) = proof_env.check_environment("cuda")
    assert "is a CPU build" in problem


def test_memory_figures_and_the_emo_workspace_in_the_report():
    tokens, vocab, hidden = 8 * 1023, SHAPES["llama3-8b"]["vocab_size"], SHAPES["llama3-8b"]["hidden_size"]
    workspace = emo_workspace_bytes(tokens, vocab, tokens * hidden * 2, "cuda") / 2**30
    assert workspace == pytest.approx(1.0, rel=0.01)  # the GPU floor, rounded to whole 8-token chunks
    assert emo_workspace_bytes(tokens, vocab, tokens * hidden * 2, "cpu") < 2**30 / 10  # the CPU floor is 32 MiB
    common = dict(model="llama3-8b", batch_size=8, status="ok", resident_gib=5.5, median_step_s=2.0)
    runs = [
        {**common, "trainer": "emo", "pair": 0, "order": 1, "peak_allocated_gib": 12.0, "peak_reserved_gib": 13.0,
         "peak_above_resident_gib": 6.5, "emo_workspace_gib": workspace},
        {**common, "trainer": "mle", "pair": 0, "order": 2, "peak_allocated_gib": 11.0, "peak_reserved_gib": 12.5,
         "peak_above_resident_gib": 5.5},
    ]  # fmt: skip
    (row,) = compare_runs(runs)
    assert row["first"] == "emo" and row["peak_above_resident_gib_ratio"] == pytest.approx(6.5 / 5.5)
    assert row["peak_allocated_gib_extra"] == pytest.approx(1.0) and row["emo_workspace_gib"] == workspace
    settings = dict(lora_r=16, seq_len=1024, steps=5, warmup=2, dtype="bfloat16")
    results = {"device": "GPU", "settings": settings, "runs": runs, "comparisons": [row],
               "emo_workspace_floor_gib": 1.0}  # fmt: skip
    table = markdown(results)
    assert "| 1 | llama3-8b | 8 | emo | ok | 5.50 | 12.00 | 6.50 | 13.00 | 0.994 |" in table
    assert "within [1, 2] GiB on this device (the floor is 1 GiB on a GPU" in table
    assert "| llama3-8b | 8 | emo | 1.000 | 1.091 | 1.182 | 1.040 | +1.00 | +1.00 |" in table


def test_llama_config_shapes_have_their_real_parameter_counts():
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        counts = {s: LlamaForCausalLM(llama_config(s)).num_parameters() for s in ("llama2-7b", "llama3-8b")}
    assert counts["llama2-7b"] == pytest.approx(6.74e9, rel=1e-3)
    assert counts["llama3-8b"] == pytest.approx(8.03e9, rel=1e-3)
