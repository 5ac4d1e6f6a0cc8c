"""What `emo-calibrate train` measures around training and prints at the end.

- `heldout_perplexity`: perplexity on the held-out split, before and after;
- `GenerationSample`: greedy continuations of a few held-out prompts, before and after, with their repetition
  (rep-4, the share of repeated 4-grams) and one continuation shown side by side: what calibration did, visible in a
  minute. A few prompts illustrate; `emo-calibrate eval` measures (many prompts, sampling, MAUVE, intervals);
- `print_summary`: the closing block (with the perplexity budget's one line: `PerplexityBudget.describe`).
"""

import math
import shutil
import textwrap
from dataclasses import dataclass, field


__all__ = [
    "GenerationSample",
    "heldout_perplexity",
    "last_train_metrics",
    "print_summary",
    "sample_prompts",
    "start_generation_sample",
]

SAMPLE_PROMPTS = 8  # prompts per sample: one batched `generate` call before training and one after
SAMPLE_NEW_TOKENS = 64  # greedy tokens per prompt: enough for a loop to show, short enough for a CPU
PROMPT_WORDS = 20  # words per prompt, as `emo-calibrate eval` (the paper's Wikipedia prefixes)
_COLUMN_LINES = 6  # lines per column of the side-by-side block


def heldout_perplexity(trainer) -> float:
    """Perplexity on the trainer's eval split: exp of its mean token cross-entropy (the `mle` the trainer logs).

    Uses `Trainer.evaluate`, so it works under DDP, FSDP and DeepSpeed alike. The mean is over evaluation batches, each
    weighted by its tokens within the batch; with packed blocks every batch but the last has the same token count.
    """
    metrics = trainer.evaluate()
    return math.exp(metrics["eval_mle"])


def last_train_metrics(trainer) -> dict:
    """The last logged training entry with `mle` and `emo` (empty when none was logged)."""
    for entry in reversed(trainer.state.log_history):
        if "mle" in entry and "emo" in entry and not any(k.startswith("eval_") for k in entry):
            return entry
    return {}


def sample_prompts(texts, num: int = SAMPLE_PROMPTS, words: int = PROMPT_WORDS) -> list[str]:
    """The first `words` words of held-out paragraphs (lines) of at least `words + 10` words, one per text in turn."""
    from ..evaluation.generation import cut_prompts

    return [p.prefix for p in cut_prompts(texts, prefix_words=words, continuation_words=0, num_prompts=num)]


def _greedy(trainer, prompts: list[str]) -> list[list[int]]:
    from ..evaluation.generation import generate_continuations

    return generate_continuations(
        trainer.model,
        trainer.processing_class,
        prompts,
        max_new_tokens=SAMPLE_NEW_TOKENS,
        do_sample=False,
        batch_size=len(prompts),
        show_progress=False,
    )


@dataclass
class GenerationSample:
    """Greedy continuations (`(num_prompts,)` lists of `SAMPLE_NEW_TOKENS` token ids) of the same held-out prompts
    before and after calibration."""

    prompts: list[str]
    before: list[list[int]] = field(default_factory=list)
    after: list[list[int]] = field(default_factory=list)

    @classmethod
    def before_training(cls, trainer, prompts: list[str]) -> "GenerationSample":
        return cls(prompts, before=_greedy(trainer, prompts))

    def after_training(self, trainer) -> None:
        self.after = _greedy(trainer, self.prompts)

    @staticmethod
    def rep4(continuations: list[list[int]]) -> list[float]:
        """rep-4 of each continuation: 1 - unique 4-grams / 4-grams (0 = no repeated 4-gram, near 1 = a loop)."""
        from ..evaluation.repetition import rep_n

        return [rep_n(ids, 4) for ids in continuations]

    def lines(self, tokenizer, width: int) -> list[str]:
        """The summary lines: mean rep-4 before and after, what it means, and the prompt whose rep-4 changed most
        with its two continuations side by side (each column cut to `_COLUMN_LINES` lines)."""
        before, after = self.rep4(self.before), self.rep4(self.after)
        n = len(self.prompts)
        text = (
            f"rep-4 {sum(before) / n:.3f} before -> {sum(after) / n:.3f} after, on {n} held-out prompts x "
            f"{len(self.before[0])} greedy tokens (rep-4 = share of repeated 4-grams in a continuation: 0 = none, "
            "near 1 = a loop)"
        )
        indent = {"initial_indent": "  greedy repetition    ", "subsequent_indent": " " * 23}
        out = textwrap.wrap(text, width, break_on_hyphens=False, **indent)
        i = max(range(n), key=lambda k: abs(after[k] - before[k]))
        column = (width - 5) // 2
        texts = [
            " ".join(tokenizer.decode(ids, skip_special_tokens=True).split())
            for ids in (self.before[i], self.after[i])
        ]
        left, right = (_column(t, column) for t in texts)
        head = f"  prompt {i + 1} of {n} (its rep-4 changed most): "
        out += ["", head + _cut(self.prompts[i], width - len(head))]
        out.append(f"  {f'before (rep-4 {before[i]:.2f})':<{column}} | after (rep-4 {after[i]:.2f})")
        for a, b in zip(left + [""] * (len(right) - len(left)), right + [""] * (len(left) - len(right))):
            out.append(f"  {a:<{column}} | {b}")
        return out


def _column(text: str, width: int) -> list[str]:
    lines = textwrap.wrap(text, width, break_on_hyphens=False) or [""]
    if len(lines) > _COLUMN_LINES:
        lines = lines[: _COLUMN_LINES - 1] + [_cut(" ".join(lines[_COLUMN_LINES - 1 :]), width)]
    return lines


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3].rstrip() + "..."


def start_generation_sample(trainer, eval_dataset, text_field: str):
    """Greedy continuations of a few held-out prompts before training, or the reason there are none.

    Returns:
        `tuple`: (`GenerationSample` or `None`, `str` or `None` saying why it was skipped).
    """
    if trainer.accelerator.num_processes > 1:
        return None, "no generation sample under several processes (run `emo-calibrate eval` afterwards)"
    if text_field not in (eval_dataset.column_names or []):
        return None, f"no generation sample: the held-out split has no {text_field!r} column"
    prompts = sample_prompts(eval_dataset[text_field])
    if not prompts:
        return None, f"no generation sample: no held-out paragraph (line) has the {PROMPT_WORDS + 10} words it needs"
    return GenerationSample.before_training(trainer, prompts), None


def terminal_width() -> int:
    """The summary's width: the terminal's, between 80 and 100 columns."""
    return min(100, max(80, shutil.get_terminal_size((100, 24)).columns))


def print_summary(summary: dict, tokenizer=None):
    """Print the closing block of `emo-calibrate train` from `main`'s summary dict."""
    width = terminal_width()
    lines = ["", "=" * width, "emo-calibrate train: done"]
    lines.append(f"  {summary['saved']:<20} {summary['output_dir']}")
    last = summary.get("last")
    if last:
        lines.append(
            f"  last logged step     {last.get('step', '?')}: mle {last['mle']:.4f}, emo {last['emo']:.4f} "
            f"(loss {last.get('loss', last.get('train_loss', float('nan'))):.4f})"
        )
    if summary.get("ppl_before") is not None:
        before, after = summary["ppl_before"], summary["ppl_after"]
        lines.append(
            f"  held-out perplexity  {before:.2f} before -> {after:.2f} after ({100 * (after / before - 1):+.1f} %) on "
            f"{summary['eval_rows']} held-out rows of {summary['dataset']}"
        )
    if summary.get("budget"):  # one line, however long: what the budget did
        lines.append(f"  perplexity budget    {summary['budget']}")
    sample = summary.get("generation")
    if sample is not None and sample.after:
        lines += sample.lines(tokenizer, width)
    if summary.get("heldout_note"):
        lines.append(f"  held-out checks      {summary['heldout_note']}")
    if summary.get("ppl_before") is not None or sample is not None:
        lines += [
            "",
            "  A few prompts and one held-out split illustrate what changed; they are not a measurement. To compare",
            "  models on perplexity, calibration, MAUVE and repetition with intervals (README: Evaluate):",
            f"    emo-calibrate eval --models base={summary['model']} emo={summary['output_dir']} \\",
            f"        --eval_data {summary.get('eval_data') or 'HELDOUT_TEXT'} --output_dir {summary['output_dir']}-eval",
        ]
    lines.append(f"  wall time            {summary['seconds'] / 60:.1f} min")
    lines.append("=" * width)
    print("\n".join(lines), flush=True)
