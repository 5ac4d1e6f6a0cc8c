"""A newcomer's run prints what they need: no deprecation, pin_memory or sequence-length warnings, no per-step dicts;
and the deprecated `gradient_checkpointing` of a user's recipe still works."""

import logging
import warnings

import pytest

from emo_calibrate.cli import train as cli_train


MODEL_MAX_LENGTH = 40  # the tokenizer's model_max_length; each training text is longer, each block shorter


@pytest.fixture(scope="module")
def short_context_model(tmp_path_factory):
    """The tiny Llama with a tokenizer that claims a 40-token maximum, like a real model's tokenizer does."""
    from tiny_models import build_tiny_model_dir
    from transformers import AutoTokenizer

    folder = build_tiny_model_dir(tmp_path_factory.mktemp("short-context"))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.model_max_length = MODEL_MAX_LENGTH
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def long_texts(tmp_path):
    """A calibration set whose texts are whole "articles" of ~60 words (> MODEL_MAX_LENGTH tokens), with a test split."""
    from datasets import Dataset, DatasetDict
    from tiny_models import SENTENCES

    texts = [" ".join(SENTENCES[(i + k) % len(SENTENCES)] for k in range(5)) for i in range(16)]
    folder = tmp_path / "articles"
    DatasetDict(
        {"train": Dataset.from_dict({"text": texts}), "test": Dataset.from_dict({"text": texts[:4]})}
    ).save_to_disk(str(folder))
    return folder


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_tiny_cli_run_prints_no_library_warnings_and_no_step_dicts(tmp_path, short_context_model, long_texts, capfd):
    """The path a newcomer takes (the calibration defaults: packing, LoRA, activation checkpointing, CPU), end to end."""
    argv = [
        "--model_name_or_path", short_context_model, "--dataset_name", str(long_texts), "--output_dir",
        str(tmp_path / "run"), "--max_steps", "3", "--max_length", "32", "--logging_steps", "1", "--save_strategy", "no",
    ]  # fmt: skip
    records = _Records()
    transformers_logger = logging.getLogger("transformers")  # transformers' loggers do not propagate to the root
    transformers_logger.addHandler(records)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cli_train.main(*cli_train.parse(argv))
    finally:
        transformers_logger.removeHandler(records)
    shown = [f"{w.category.__name__}: {w.message}" for w in caught if not issubclass(w.category, DeprecationWarning)]
    unwanted = {
        "gradient_checkpointing is deprecated": "`gradient_checkpointing` is deprecated",
        "is_gradient_checkpointing is deprecated": "`is_gradient_checkpointing` is deprecated",
        "pin_memory without an accelerator": "'pin_memory' argument is set as true",
    }
    found = {name for name, text in unwanted.items() if any(text in message for message in shown)}
    if any("Token indices sequence length is longer" in m for m in records.messages):
        found.add("tokenizer sequence-length warning")
    assert not found, found
    printed = capfd.readouterr()
    text = printed.out + printed.err
    assert "{'loss'" not in text  # the logs are the progress bar's postfix, not printed dicts
    # The perplexity budget's evaluations: one short line each, not the metrics dict.
    assert "{'eval_loss'" not in text
    assert "step 0: held-out perplexity" in text and "(1.000x the start)" in text
    assert "emo-calibrate train: done" in printed.out


def test_max_length_above_the_models_limit_is_still_reported(tmp_path, short_context_model, long_texts, capsys):
    argv = [
        "--model_name_or_path", short_context_model, "--dataset_name", str(long_texts), "--output_dir",
        str(tmp_path / "run"), "--max_steps", "1", "--max_length", "64", "--save_strategy", "no", "--no_perplexity",
        "--no_generation_sample",
    ]  # fmt: skip
    cli_train.main(*cli_train.parse(argv))
    assert f"max_length=64 is longer than this model's maximum sequence length ({MODEL_MAX_LENGTH}" in (
        capsys.readouterr().out
    )


@pytest.mark.parametrize("value", [True, False])
def test_deprecated_gradient_checkpointing_in_a_users_recipe_still_works(tmp_path, value):
    recipe = tmp_path / "old.yaml"
    recipe.write_text(f"gradient_checkpointing: {str(value).lower()}\nlearning_rate: 2.0e-5\n")
    with pytest.warns(FutureWarning, match="`gradient_checkpointing` is deprecated"):  # transformers' own notice
        _, training_args, _, _, _ = cli_train.parse(["--config", str(recipe)])
    assert training_args.activation_checkpointing is value and training_args.gradient_checkpointing is value
    # the command-line spelling too
    with pytest.warns(FutureWarning):
        _, training_args, _, _, _ = cli_train.parse(["--config", str(recipe), "--gradient_checkpointing", "true"])
    assert training_args.activation_checkpointing


def test_the_current_name_and_the_default_warn_nothing(tmp_path):
    recipe = tmp_path / "new.yaml"
    for text, expected in (("activation_checkpointing: false\n", False), ("learning_rate: 2.0e-5\n", True)):
        recipe.write_text(text)
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            _, training_args, _, _, _ = cli_train.parse(["--config", str(recipe)])
        assert training_args.activation_checkpointing is expected, text  # default: TRL's True, under the new name


def test_evaluation_line_is_short_and_reads_the_budget_ratio():
    from emo_calibrate.cli.quiet import evaluation_line

    metrics = {"eval_loss": 3.0, "eval_mle": 3.0, "eval_emo": 0.8412, "eval_entropy": 2.873, "eval_runtime": 40.1}
    assert evaluation_line(metrics) == "held-out perplexity 20.09, emo 0.841, entropy 2.873"
    metrics.update(eval_ppl=20.0855, eval_ppl_ratio=1.0123)
    assert evaluation_line(metrics) == "held-out perplexity 20.09 (1.012x the start), emo 0.841, entropy 2.873"
    assert evaluation_line({"eval_loss": 1.0}) == "held-out perplexity 2.72"
    # one of several eval datasets: its own metrics, under its name
    named = {"eval_wiki_loss": 1.0, "eval_wiki_mle": 1.0, "eval_wiki_entropy": 2.5}
    assert evaluation_line(named) == "wiki: held-out perplexity 2.72, entropy 2.500"
