"""The calibration guard: perplexity drift logged against the starting model, warning, early stop, keep-best."""

import logging
import math
import random
from types import SimpleNamespace

import pytest
from transformers import TrainerControl, TrainerState

from emo_calibrate import EMOConfig, EMOTrainer
from emo_calibrate.training.callbacks import CalibrationGuard


def _evaluate(guard, state, control, ppl, step):
    """What the Trainer does at an evaluation: log the metrics, then call on_evaluate with the same dict."""
    state.global_step = step
    metrics = {"eval_loss": 99.0, "eval_mle": math.log(ppl)}
    state.log_history.append({**metrics, "step": step})
    guard.on_evaluate(SimpleNamespace(), state, control, metrics=metrics)
    return metrics


def test_guard_logs_ratio_to_the_first_evaluation_and_warns(caplog):
    guard, state, control = CalibrationGuard(max_ppl_ratio=1.2), TrainerState(), TrainerControl()
    guard.on_train_begin(SimpleNamespace(eval_on_start=True, eval_steps=2), state, control)
    first = _evaluate(guard, state, control, 10.0, 0)
    assert first["eval_ppl"] == pytest.approx(10.0) and first["eval_ppl_ratio"] == pytest.approx(1.0)
    assert state.log_history[-1]["eval_ppl_start"] == pytest.approx(10.0)
    with caplog.at_level(logging.WARNING, logger="emo_calibrate.training.callbacks"):
        ok = _evaluate(guard, state, control, 11.5, 2)
        assert not caplog.records
        bad = _evaluate(guard, state, control, 13.0, 4)
    assert ok["eval_ppl_ratio"] == pytest.approx(1.15) and bad["eval_ppl_ratio"] == pytest.approx(1.3)
    assert state.log_history[-1]["eval_ppl_ratio"] == pytest.approx(1.3)  # in trainer_state.json too
    assert "1.30x the starting 10.000" in caplog.text and guard.tripped_at == 4
    assert not control.should_training_stop  # warn only unless stop=True


def test_guard_stops_and_keeps_its_reference_across_a_resume():
    state, control = TrainerState(), TrainerControl()
    state.log_history = [{"eval_mle": math.log(10.0), "eval_ppl_start": 10.0, "step": 0}]  # restored from a checkpoint
    guard = CalibrationGuard(max_ppl_ratio=1.5, stop=True)
    guard.on_train_begin(SimpleNamespace(eval_on_start=True, eval_steps=2), state, control)
    assert _evaluate(guard, state, control, 12.0, 6)["eval_ppl_ratio"] == pytest.approx(1.2)  # not 1.0
    assert not control.should_training_stop
    _evaluate(guard, state, control, 16.0, 8)
    assert control.should_training_stop


def test_guard_config_fields():
    args = EMOConfig(output_dir="unused", metric_for_best_model="ppl_ratio", report_to="none")
    assert args.emo_guard_max_ppl_ratio == 1.2 and args.emo_guard_stop is False
    assert args.greater_is_better is False  # lower perplexity is better, whatever the name's suffix
    assert EMOConfig(output_dir="unused", metric_for_best_model="mle", greater_is_better=True).greater_is_better
    assert EMOConfig(output_dir="unused", metric_for_best_model="accuracy").greater_is_better
    with pytest.raises(ValueError, match="emo_guard_max_ppl_ratio must be > 1"):
        EMOConfig(output_dir="unused", emo_guard_max_ppl_ratio=0.9)


@pytest.fixture
def held_out():
    from datasets import Dataset
    from tiny_models import WORDS

    rng = random.Random(0)  # word salad: training on the tiny sentences moves it away from the start
    return Dataset.from_dict({"text": [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(8)]})


def _trainer(path, tmp_path, tiny_dataset, eval_dataset, **overrides):
    from tiny_models import build_tokenizer

    values = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=8,
        per_device_train_batch_size=4,
        logging_steps=2,
        eval_strategy="steps",
        eval_steps=2,
        save_strategy="no",
        max_length=32,
        report_to="none",
        activation_checkpointing=False,
        disable_tqdm=True,
        seed=0,
    )
    values.update(overrides)
    return EMOTrainer(
        path,
        args=EMOConfig(**values),
        train_dataset=tiny_dataset,
        eval_dataset=eval_dataset,
        processing_class=build_tokenizer(),
    )


def _ratios(trainer):
    return [(h["step"], h["eval_ppl_ratio"]) for h in trainer.state.log_history if "eval_ppl_ratio" in h]


def test_guard_trips_and_stops_a_run_with_a_too_high_learning_rate(
    tiny_llama_dir, tmp_path, tiny_dataset, held_out, caplog
):
    trainer = _trainer(tiny_llama_dir, tmp_path, tiny_dataset, held_out, learning_rate=1.0, emo_guard_stop=True)
    assert trainer.args.eval_on_start  # switched on: the reference is the starting model
    with caplog.at_level(logging.WARNING, logger="emo_calibrate.training.callbacks"):
        trainer.train()
    ratios = _ratios(trainer)
    assert ratios[0] == (0, 1.0) and ratios[-1][1] > 1.2
    assert trainer.state.global_step == ratios[-1][0] < 8  # stopped at the first evaluation past the bound
    assert "Stopping training" in caplog.text


def test_guard_keeps_the_best_checkpoint_through_the_trainer(tiny_llama_dir, tmp_path, tiny_dataset, held_out, caplog):
    trainer = _trainer(
        tiny_llama_dir,
        tmp_path,
        tiny_dataset,
        held_out,
        learning_rate=0.1,
        save_strategy="steps",
        save_steps=2,
        load_best_model_at_end=True,
        metric_for_best_model="ppl_ratio",
    )
    with caplog.at_level(logging.WARNING, logger="emo_calibrate.training.callbacks"):
        trainer.train()
    ratios = _ratios(trainer)[1:]  # the step-0 reference is not a checkpoint
    assert trainer.state.global_step == 8 and "Calibration guard" in caplog.text  # warned, did not stop
    best_step, best_ratio = min(ratios, key=lambda r: r[1])
    assert best_step != ratios[-1][0]  # the drift grew: the best checkpoint is not the last one
    assert trainer.state.best_metric == pytest.approx(best_ratio)
    assert trainer.state.best_model_checkpoint.endswith(f"checkpoint-{best_step}")
    assert trainer.evaluate()["eval_ppl_ratio"] == pytest.approx(best_ratio, rel=1e-4)  # the best model was reloaded


def test_guard_is_off_without_an_eval_set(tiny_llama_dir, tmp_path, tiny_dataset):
    trainer = _trainer(tiny_llama_dir, tmp_path, tiny_dataset, None, eval_strategy="no", learning_rate=1e-3)
    assert not any(isinstance(cb, CalibrationGuard) for cb in trainer.callback_handler.callbacks)
    assert not trainer.args.eval_on_start
    off = _trainer(tiny_llama_dir, tmp_path, tiny_dataset, tiny_dataset, emo_guard_max_ppl_ratio=None)
    assert not any(isinstance(cb, CalibrationGuard) for cb in off.callback_handler.callbacks)
