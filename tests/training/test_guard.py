"""The perplexity budget (on by default): held-out perplexity against the starting model's, a stop past the budget,
and the last weights inside it as the saved result."""

import json
import logging
import math
import random
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import WORDS, build_tokenizer, lora, make_args, tiny_text_dataset
from transformers import TrainerCallback, TrainerControl, TrainerState

from emo_calibrate import EMOConfig, EMOTrainer
from emo_calibrate.training.perplexity_budget import PerplexityBudget


# ---- the callback alone -------------------------------------------------------------------------------------------


def _evaluate(budget, state, control, ppl, step, model=None, args=None):
    """What the Trainer does at an evaluation: log the metrics, then call on_evaluate with the same dict."""
    state.global_step = step
    metrics = {"eval_loss": 99.0, "eval_mle": math.log(ppl)}
    state.log_history.append({**metrics, "step": step})
    args = args or SimpleNamespace(load_best_model_at_end=False)
    budget.on_evaluate(args, state, control, metrics=metrics, model=model)
    return metrics


def _begin(budget, state, max_steps=10):
    state.max_steps = max_steps
    budget.on_train_begin(SimpleNamespace(), state, TrainerControl())


def test_budget_logs_the_ratio_to_the_start_and_warns_only_when_told(caplog):
    budget, state, control = PerplexityBudget(max_ppl_ratio=1.2, stop=False), TrainerState(), TrainerControl()
    _begin(budget, state)
    first = _evaluate(budget, state, control, 10.0, 0)
    assert first["eval_ppl"] == pytest.approx(10.0) and first["eval_ppl_ratio"] == pytest.approx(1.0)
    assert state.log_history[-1]["eval_ppl_start"] == pytest.approx(10.0)
    with caplog.at_level(logging.WARNING, logger="emo_calibrate.training.perplexity_budget"):
        ok = _evaluate(budget, state, control, 11.5, 2)
        assert not caplog.records
        bad = _evaluate(budget, state, control, 13.0, 4)
    assert ok["eval_ppl_ratio"] == pytest.approx(1.15) and bad["eval_ppl_ratio"] == pytest.approx(1.3)
    assert state.log_history[-1]["eval_ppl_ratio"] == pytest.approx(1.3)  # in trainer_state.json too
    assert "1.300x the start's 10.000" in caplog.text and budget.tripped.step == 4
    assert not control.should_training_stop  # warn only: emo_guard_stop=False
    _evaluate(budget, state, control, 14.0, 10)
    budget.on_train_end(SimpleNamespace(load_best_model_at_end=False), state, control)
    assert budget.describe() == (
        "held-out perplexity passed the budget (1.2x) at step 4, 1.30x; not stopped (emo_guard_stop false): kept the "
        "last step, 10, 1.40x"
    )


def test_budget_stops_and_puts_back_the_last_weights_inside_it():
    model = torch.nn.Linear(2, 2)
    budget, state, control = PerplexityBudget(max_ppl_ratio=1.5), TrainerState(), TrainerControl()
    _begin(budget, state, max_steps=312)
    _evaluate(budget, state, control, 10.0, 0, model)
    with torch.no_grad():
        model.weight.fill_(1.0)
    _evaluate(budget, state, control, 14.0, 150, model)  # inside: these weights are kept
    kept = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.fill_(7.0)
    _evaluate(budget, state, control, 16.0, 180, model)  # past the budget
    assert control.should_training_stop
    budget.on_train_end(SimpleNamespace(load_best_model_at_end=False), state, control, model=model)
    assert torch.equal(model.weight, kept)
    assert budget.describe() == "stopped at step 180 of 312: held-out perplexity 1.60x the start; kept step 150, 1.40x"
    assert budget.current_ppl() == pytest.approx(14.0)


def test_budget_past_at_the_first_evaluation_keeps_the_starting_weights():
    model = torch.nn.Linear(2, 2)
    start = model.weight.detach().clone()
    budget, state, control = PerplexityBudget(), TrainerState(), TrainerControl()
    _begin(budget, state, max_steps=60)
    _evaluate(budget, state, control, 10.0, 0, model)
    with torch.no_grad():
        model.weight.add_(1.0)
    _evaluate(budget, state, control, 11.0, 6, model)
    budget.on_train_end(SimpleNamespace(load_best_model_at_end=False), state, control, model=model)
    assert torch.equal(model.weight, start)
    assert budget.describe().endswith("1.10x the start; kept step 0, the starting weights, 1.00x")


def test_budget_keeps_its_reference_across_a_resume():
    state, control = TrainerState(), TrainerControl()
    state.log_history = [{"eval_loss": 1.0, "eval_mle": math.log(10.0), "eval_ppl_start": 10.0, "step": 0}]
    budget = PerplexityBudget(max_ppl_ratio=1.5)
    _begin(budget, state)
    assert _evaluate(budget, state, control, 12.0, 6, torch.nn.Linear(2, 2))["eval_ppl_ratio"] == pytest.approx(1.2)
    # resumed from a checkpoint already past the budget: nothing inside it in memory, the resumed weights stay
    resumed, state = PerplexityBudget(max_ppl_ratio=1.1), TrainerState()
    state.log_history = [{"eval_loss": 1.0, "eval_mle": math.log(10.0), "eval_ppl_start": 10.0, "step": 0}]
    _begin(resumed, state)
    _evaluate(resumed, state, control, 12.0, 6, torch.nn.Linear(2, 2))
    resumed.on_train_end(SimpleNamespace(load_best_model_at_end=False), state, control, model=torch.nn.Linear(2, 2))
    assert "kept the last step, 6, 1.20x (no weights inside the budget in memory" in resumed.describe()


def test_summary_lines_within_the_budget_and_off():
    budget, state, control = PerplexityBudget(), TrainerState(), TrainerControl()
    _begin(budget, state, max_steps=312)
    for step, ppl in ((0, 10.0), (156, 10.2), (312, 10.3)):
        _evaluate(budget, state, control, ppl, step, torch.nn.Linear(2, 2))
    budget.on_train_end(SimpleNamespace(load_best_model_at_end=False), state, control, model=torch.nn.Linear(2, 2))
    assert budget.describe() == "held-out perplexity stayed within the budget (1.05x): 1.03x at step 312"
    assert PerplexityBudget(max_ppl_ratio=None).describe() == "off (emo_guard_max_ppl_ratio is null)"


def test_budget_config_fields():
    args = EMOConfig(output_dir="unused", metric_for_best_model="ppl_ratio", report_to="none")
    assert (args.emo_guard_max_ppl_ratio, args.emo_guard_stop) == (1.05, True)
    assert (args.emo_guard_eval_steps, args.emo_guard_holdout) == (0.1, 0.02)
    assert args.greater_is_better is False  # lower perplexity is better, whatever the name's suffix
    assert EMOConfig(output_dir="unused", metric_for_best_model="mle", greater_is_better=True).greater_is_better
    assert EMOConfig(output_dir="unused", metric_for_best_model="accuracy").greater_is_better
    assert (
        EMOConfig(output_dir="unused", emo_guard_eval_steps=50.0, emo_guard_holdout=200.0).emo_guard_eval_steps == 50
    )
    with pytest.raises(ValueError, match="emo_guard_max_ppl_ratio must be > 1"):
        EMOConfig(output_dir="unused", emo_guard_max_ppl_ratio=0.9)
    for bad in (dict(emo_guard_eval_steps=0), dict(emo_guard_eval_steps=2.5), dict(emo_guard_holdout=-0.1)):
        with pytest.raises(ValueError, match=f"{next(iter(bad))} must be a fraction below 1 or a whole number"):
            EMOConfig(output_dir="unused", **bad)


# ---- through the Trainer ------------------------------------------------------------------------------------------


@pytest.fixture
def held_out():
    from datasets import Dataset

    rng = random.Random(0)  # word salad: training on the tiny sentences moves it away from the start
    return Dataset.from_dict({"text": [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(8)]})


class CopyAtEvaluation(TrainerCallback):
    """The test's own record of the LoRA weights at every evaluation."""

    def __init__(self):
        self.copies = {}

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        self.copies[state.global_step] = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def _saved_adapter(folder):
    # PEFT saves `base_model.model.<module>.lora_A.weight`; the live names carry the adapter name `.default`
    return {
        n.replace(".weight", ".default.weight"): t for n, t in load_file(f"{folder}/adapter_model.safetensors").items()
    }


@pytest.mark.parametrize("batch, accumulation", [(4, 1), (2, 2)])
def test_a_run_driven_past_the_budget_stops_and_saves_the_kept_weights(
    tiny_llama_dir, tmp_path, tiny_dataset, held_out, batch, accumulation, caplog
):
    """Plain Python API: training on the tiny sentences drives the perplexity of word salad up; the run stops past the
    budget and save_model() writes exactly the weights of the last evaluation inside it."""
    copies = CopyAtEvaluation()
    args = make_args(
        tmp_path, max_steps=12, learning_rate=0.06, per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation, emo_guard_max_ppl_ratio=1.05, emo_guard_eval_steps=2,
    )  # fmt: skip
    trainer = EMOTrainer(
        tiny_llama_dir, args=args, train_dataset=tiny_dataset, eval_dataset=held_out, peft_config=lora(),
        callbacks=[copies],
    )  # fmt: skip
    assert trainer.args.eval_on_start and trainer.args.eval_strategy == "steps" and trainer.args.eval_steps == 2
    with caplog.at_level(logging.WARNING, logger="emo_calibrate.training.perplexity_budget"):
        trainer.train()
    budget = trainer.perplexity_budget
    ratios = [(h["step"], h["eval_ppl_ratio"]) for h in trainer.state.log_history if "eval_ppl_ratio" in h]
    assert ratios[0] == (0, 1.0) and ratios[-1][1] > 1.05 and "Stopping training" in caplog.text
    stopped, kept = budget.tripped.step, budget.kept.step
    assert trainer.state.global_step == stopped < 12 and 0 < kept == stopped - 2  # the evaluation before the stop
    assert all(ratio <= 1.05 for step, ratio in ratios if step <= kept)
    trainer.save_model()
    saved = _saved_adapter(args.output_dir)
    assert saved.keys() == copies.copies[kept].keys()
    for name, tensor in saved.items():
        assert torch.equal(tensor, copies.copies[kept][name]), name
    assert any(not torch.equal(saved[n], t) for n, t in copies.copies[stopped].items())  # not the last step
    record = json.loads((tmp_path / "out" / "emo_training.json").read_text())["perplexity_budget"]
    assert record["stopped_at"] == stopped and record["kept"]["step"] == kept and record["kept_how"] == "restored"
    assert record["heldout"] == {**budget.heldout.record(), "source": "given", "rows": 8}
    assert record["summary"] == (
        f"stopped at step {stopped} of 12: held-out perplexity {ratios[-1][1]:.2f}x the start; kept step {kept}, "
        f"{budget.kept.ratio:.2f}x"
    )


def test_no_eval_split_holds_out_whole_documents_seeded_and_recorded(tiny_llama_dir, tmp_path):
    from datasets import Dataset

    texts = [f"{sentence} {WORDS[i]}" for i, sentence in enumerate(tiny_text_dataset(64)["text"])]  # all distinct
    data = Dataset.from_dict({"text": texts, "title": [f"doc{i // 4}" for i in range(64)]})  # 16 documents of 4 rows

    def trainer(seed, out):
        args = make_args(tmp_path / out, max_steps=1, emo_guard_max_ppl_ratio=1.05, emo_guard_holdout=0.125, seed=seed)
        args.data_seed = None  # the seed then decides
        return EMOTrainer(tiny_llama_dir, args=args, train_dataset=data, processing_class=build_tokenizer())

    first, again, other = trainer(0, "a"), trainer(0, "b"), trainer(1, "c")
    heldout = first.perplexity_budget.heldout_dataset
    assert heldout["text"] == again.perplexity_budget.heldout_dataset["text"]  # same seed, same rows
    assert heldout["text"] != other.perplexity_budget.heldout_dataset["text"]
    assert len(heldout) == 8 and len(set(heldout["title"])) == 2  # 12.5 % of 64 rows: two whole documents
    # what the Trainer trains on and evaluates (tokenized): the 56 other rows, and the 8 held out
    train_ids = {tuple(ids) for ids in first.train_dataset["input_ids"]}
    eval_ids = {tuple(ids) for ids in first.eval_dataset["input_ids"]}
    assert len(train_ids) == 56 and len(eval_ids) == 8 and not train_ids & eval_ids
    first.train()
    first.save_model()
    record = json.loads((tmp_path / "a" / "out" / "emo_training.json").read_text())["perplexity_budget"]
    assert record["heldout"] == {
        "source": "automatic", "rows": 8, "method": "document column 'title'", "documents": 2, "train_rows": 56,
        "seed": 0, "size": 0.125,
    }  # fmt: skip


def test_budget_off_means_no_evaluation_and_no_holdout(tiny_llama_dir, tmp_path, tiny_dataset, caplog):
    trainer = EMOTrainer(
        tiny_llama_dir, args=make_args(tmp_path, max_steps=2, emo_guard_max_ppl_ratio=None), train_dataset=tiny_dataset
    )
    assert trainer.eval_dataset is None and len(trainer.train_dataset) == len(tiny_dataset)
    assert trainer.args.eval_strategy == "no" and not trainer.args.eval_on_start
    assert not any(isinstance(cb, PerplexityBudget) for cb in trainer.callback_handler.callbacks)
    trainer.train()
    assert not any(k.startswith("eval_") for h in trainer.state.log_history for k in h)
    assert trainer.perplexity_budget.record()["summary"] == "off (emo_guard_max_ppl_ratio is null)"
    with caplog.at_level(logging.WARNING, logger="emo_calibrate.training.perplexity_budget"):
        no_holdout = make_args(tmp_path / "b", emo_guard_max_ppl_ratio=1.05, emo_guard_holdout=0)
        trainer = EMOTrainer(tiny_llama_dir, args=no_holdout, train_dataset=tiny_dataset)
    assert "Perplexity budget off: no eval split and emo_guard_holdout=0" in caplog.text
    assert trainer.eval_dataset is None and not trainer.perplexity_budget.active


def test_an_explicit_eval_split_is_used_as_given(tiny_llama_dir, tmp_path, tiny_dataset, held_out):
    args = make_args(tmp_path, emo_guard_max_ppl_ratio=1.05)
    trainer = EMOTrainer(tiny_llama_dir, args=args, train_dataset=tiny_dataset, eval_dataset=held_out)
    assert len(trainer.train_dataset) == len(tiny_dataset) and len(trainer.eval_dataset) == len(held_out)
    assert trainer.perplexity_budget.heldout.record()["source"] == "given"
    assert trainer.args.eval_strategy == "steps" and trainer.args.eval_steps == 0.1  # the budget's schedule
    own = make_args(tmp_path / "own", emo_guard_max_ppl_ratio=1.05, eval_strategy="steps", eval_steps=2)
    trainer = EMOTrainer(tiny_llama_dir, args=own, train_dataset=tiny_dataset, eval_dataset=held_out)
    assert trainer.args.eval_steps == 2 and trainer.perplexity_budget.eval_steps is None  # the user's schedule


def test_load_best_model_at_end_wins_and_the_budget_only_stops(tiny_llama_dir, tmp_path, tiny_dataset, held_out):
    args = make_args(
        tmp_path, max_steps=8, learning_rate=0.1, eval_strategy="steps", eval_steps=2, save_strategy="steps",
        save_steps=2, load_best_model_at_end=True, metric_for_best_model="ppl_ratio", emo_guard_max_ppl_ratio=1.2,
    )  # fmt: skip
    trainer = EMOTrainer(tiny_llama_dir, args=args, train_dataset=tiny_dataset, eval_dataset=held_out)
    trainer.train()
    ratios = [(h["step"], h["eval_ppl_ratio"]) for h in trainer.state.log_history if "eval_ppl_ratio" in h][1:]
    budget = trainer.perplexity_budget
    assert budget.tripped is not None and trainer.state.global_step == budget.tripped.step < 8
    best_step, best_ratio = min(ratios, key=lambda r: r[1])
    assert trainer.state.best_model_checkpoint.endswith(f"checkpoint-{best_step}")
    assert budget.kept_how == "best" and budget.kept.step == best_step
    assert trainer.evaluate()["eval_ppl_ratio"] == pytest.approx(best_ratio, rel=1e-4)  # the best model was reloaded
    assert f"kept the best checkpoint (load_best_model_at_end), step {best_step}" in budget.describe()
