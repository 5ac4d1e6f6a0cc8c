"""The end of `emo-calibrate train`: greedy repetition (rep-4) of held-out prompts before and after, one continuation
side by side, what the numbers mean, and a flag that turns the sample off."""

import pytest
import torch

from emo_calibrate.cli import train as cli_train
from emo_calibrate.cli.train_report import SAMPLE_NEW_TOKENS, SAMPLE_PROMPTS, GenerationSample


def reference_greedy(model, tokenizer, prompt: str, new_tokens: int) -> list[int]:
    """One prompt at a time, no cache, no padding: the argmax of the full forward, eos excluded (as the sample's
    fixed-length continuations), `new_tokens` times."""
    ids = tokenizer(prompt)["input_ids"]
    start = len(ids)
    with torch.no_grad():
        for _ in range(new_tokens):
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1].float()
            logits[tokenizer.eos_token_id] = -float("inf")
            ids.append(int(logits.argmax()))
    return ids[start:]


def reference_rep4(ids: list[int]) -> float:
    grams = [tuple(ids[i : i + 4]) for i in range(len(ids) - 3)]
    return 1 - len(set(grams)) / len(grams)


@pytest.fixture
def heldout_set(tmp_path, tiny_dataset):
    """Train rows of single sentences; 10 held-out rows of 4 sentences (>= 30 words each, one paragraph)."""
    from datasets import Dataset, DatasetDict
    from tiny_models import SENTENCES

    heldout = [" ".join(SENTENCES[(i + k) % len(SENTENCES)] for k in range(4)) for i in range(10)]
    folder = tmp_path / "set"
    DatasetDict({"train": tiny_dataset, "test": Dataset.from_dict({"text": heldout})}).save_to_disk(str(folder))
    return folder, heldout


def tiny_argv(model_dir, dataset, output_dir, *extra):
    return [
        "--model_name_or_path", str(model_dir), "--dataset_name", str(dataset), "--output_dir", str(output_dir),
        "--max_steps", "3", "--learning_rate", "5e-2", "--max_length", "32", "--lora_r", "4", "--lora_alpha", "8",
        "--save_strategy", "no", "--no_perplexity", *extra,
    ]  # fmt: skip


def test_summary_shows_greedy_repetition_before_and_after(tmp_path, tiny_llama_dir, heldout_set, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, heldout = heldout_set
    out = tmp_path / "run"
    summary = cli_train.main(*cli_train.parse(tiny_argv(tiny_llama_dir, folder, out)))
    printed = capsys.readouterr().out
    flat = " ".join(printed.split())  # the summary wraps to the terminal's width
    sample = summary["generation"]

    # the first 20 words of the first SAMPLE_PROMPTS held-out rows
    assert sample.prompts == [" ".join(text.split()[:20]) for text in heldout[:SAMPLE_PROMPTS]]
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    before = [reference_greedy(base, tokenizer, p, SAMPLE_NEW_TOKENS) for p in sample.prompts]
    tuned = PeftModel.from_pretrained(base, str(out)).eval()
    after = [reference_greedy(tuned, tokenizer, p, SAMPLE_NEW_TOKENS) for p in sample.prompts]
    assert sample.before == before and sample.after == after
    assert sample.before != sample.after  # training changed the continuations

    rep_before = sum(map(reference_rep4, before)) / len(before)
    rep_after = sum(map(reference_rep4, after)) / len(after)
    assert f"rep-4 {rep_before:.3f} before -> {rep_after:.3f} after, on {SAMPLE_PROMPTS} held-out prompts" in flat
    assert "share of repeated 4-grams" in flat and "not a measurement" in flat and "emo-calibrate eval" in flat
    assert f"emo={out}" in flat and f"--eval_data {folder}" in flat
    # the side-by-side block: the prompt whose rep-4 changed most, then both continuations in two columns
    changes = [abs(reference_rep4(a) - reference_rep4(b)) for a, b in zip(after, before)]
    i = max(range(len(changes)), key=changes.__getitem__)
    assert f"prompt {i + 1} of {SAMPLE_PROMPTS} (its rep-4 changed most): {sample.prompts[i][:30]}" in printed
    block = printed[printed.index(f"prompt {i + 1} of") :].splitlines()
    assert block[1].lstrip().startswith(f"before (rep-4 {reference_rep4(before[i]):.2f})")
    assert f"| after (rep-4 {reference_rep4(after[i]):.2f})" in block[1]
    first_words = tokenizer.decode(before[i][:3], skip_special_tokens=True).split()
    assert block[2].split("|")[0].split()[: len(first_words)] == first_words
    assert "EMO trades a little perplexity" not in printed  # the old, unshown claim


def test_no_generation_sample_turns_it_off(tmp_path, tiny_llama_dir, heldout_set, capsys, monkeypatch):
    def no_generation(*args, **kwargs):
        raise AssertionError("generate must not run with --no_generation_sample")

    monkeypatch.setattr("emo_calibrate.evaluation.generation.generate_continuations", no_generation)
    folder, _ = heldout_set
    argv = tiny_argv(tiny_llama_dir, folder, tmp_path / "run", "--no_generation_sample", "--max_steps", "1")
    summary = cli_train.main(*cli_train.parse(argv))
    assert summary["generation"] is None
    printed = capsys.readouterr().out
    assert "rep-4" not in printed and "emo-calibrate train: done" in printed


def test_without_a_test_split_the_budget_holds_rows_out_and_the_summary_says_what_it_did(
    tmp_path, tiny_llama_dir, tiny_dataset, capsys
):
    path = tmp_path / "train.jsonl"
    tiny_dataset.to_json(str(path))
    argv = tiny_argv(tiny_llama_dir, path, tmp_path / "run", "--max_steps", "2", "--perplexity", "true")
    summary = cli_train.main(*cli_train.parse(argv))
    trainer, printed = summary["trainer"], capsys.readouterr().out
    assert summary["eval_rows"] == len(trainer.perplexity_budget.heldout_dataset) == 1  # 2 % of 32 rows
    assert summary["ppl_before"] == pytest.approx(trainer.perplexity_budget.start_ppl)  # no extra pass before
    assert f"held-out rows of {path} (held out automatically)" in printed
    assert f"perplexity budget    {trainer.perplexity_budget.describe()}\n" in printed
    assert "no held-out paragraph" in summary["heldout_note"]  # the sample tried the hold-out: sentences are short
    off = tiny_argv(tiny_llama_dir, path, tmp_path / "off", "--max_steps", "1", "--emo_guard_max_ppl_ratio", "null")
    summary = cli_train.main(*cli_train.parse(off))
    printed = capsys.readouterr().out
    assert summary["generation"] is None and summary["trainer"].eval_dataset is None
    assert "held-out checks      none: the dataset has no 'test' split" in printed
    assert "perplexity budget    off (emo_guard_max_ppl_ratio is null)" in printed


def test_the_budget_is_one_line_of_the_summary(capsys):
    from emo_calibrate.cli.train_report import print_summary

    line = "stopped at step 180 of 312: held-out perplexity 1.07x the start; kept step 150, 1.04x"
    print_summary({"saved": "adapter written to", "output_dir": "out", "seconds": 60.0, "budget": line})
    assert f"\n  perplexity budget    {line}\n" in capsys.readouterr().out


class _WordTokenizer:
    def decode(self, ids, skip_special_tokens=True):
        return " ".join(f"w{i}" for i in ids)


def test_side_by_side_block_fits_the_width_and_picks_the_largest_change():
    loop, varied = [1, 2, 3, 4] * 16, list(range(64))
    sample = GenerationSample(
        prompts=["first prompt", "second prompt " * 20, "third"],
        before=[varied, loop, varied],
        after=[varied[:60] + loop[:4], varied, varied],
    )
    lines = sample.lines(_WordTokenizer(), width=80)
    assert all(len(line) <= 80 for line in lines)
    head = next(k for k, line in enumerate(lines) if line.startswith("  prompt "))
    assert lines[head].startswith("  prompt 2 of 3 (its rep-4 changed most): second prompt") and lines[head].endswith(
        "..."
    )
    columns = lines[head + 2 :]
    assert len(columns) == 6 and columns[-1].endswith("...")  # the longer (right) column is cut to 6 lines
    before, after = (1 - 4 / 61) / 3, (1 / 61) / 3  # rep-4: 4 distinct of 61 4-grams in the loop; one repeat in 61
    flat = " ".join(" ".join(lines).split())
    assert f"rep-4 {before:.3f} before -> {after:.3f} after, on 3 held-out prompts x 64 greedy tokens" in flat
