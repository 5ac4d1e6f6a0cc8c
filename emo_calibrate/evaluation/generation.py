"""Open-ended generation quality: the paper's MAUVE protocol plus repetition and diversity of the samples.

Protocol (emo-method.md section 3.1): prompts are the first ~20 words of held-out paragraphs (kept only if they have
at least 100 characters, `prefix + continuation + 10` words and no `==` heading), the human reference is the prefix
plus the next 80 words, and the model continues the prefix for exactly 80 new tokens with unbiased ancestral
sampling (`top_k=0, top_p=1, temperature=1`), several seeds; greedy decoding is an option. MAUVE compares the
features of the human texts with those of `prefix + generation`. Features are the last hidden state at the last
token (what `mauve-text` itself computes) of a featurizer model: GPT-2-large in the paper; any local model offline.
MAUVE values are only comparable under the same featurizer and sample count.
"""

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .repetition import rep_n, repetition_summary


__all__ = [
    "Prompt",
    "cut_prompts",
    "generate_continuations",
    "Featurizer",
    "mauve_score",
    "reference_tokens",
    "evaluate_generation",
]

logger = logging.getLogger(__name__)


@dataclass
class Prompt:
    """A prefix to continue and the human continuation that followed it (`document` = its source index)."""

    prefix: str
    continuation: str
    document: int

    @property
    def reference(self) -> str:
        return f"{self.prefix} {self.continuation}"


def cut_prompts(
    documents: Sequence[str],
    *,
    prefix_words: int = 20,
    continuation_words: int = 80,
    num_prompts: int | None = None,
    min_chars: int = 100,
) -> list[Prompt]:
    """Cut prompts from the paragraphs (lines) of `documents`, taking documents in turn so prompts spread over them.

    Args:
        documents: held-out documents; their lines are the paragraphs.
        prefix_words: words of the prefix (20 for Wikipedia in the paper).
        continuation_words: words of the human continuation (80 in the paper).
        num_prompts: stop after this many (all when `None`).
        min_chars: paragraphs shorter than this are skipped (the paper's 100).

    Returns:
        `list[Prompt]`, at most one per paragraph.
    """
    need = prefix_words + continuation_words + 10
    per_doc = []
    for d, doc in enumerate(documents):
        found = []
        for line in doc.splitlines():
            words = line.split()
            if len(line) >= min_chars and len(words) >= need and "==" not in line:
                cont = " ".join(words[prefix_words : prefix_words + continuation_words])
                found.append(Prompt(" ".join(words[:prefix_words]), cont, d))
        per_doc.append(found)
    prompts, depth = [], 0
    while any(depth < len(found) for found in per_doc):
        prompts.extend(found[depth] for found in per_doc if depth < len(found))
        depth += 1
    return prompts if num_prompts is None else prompts[:num_prompts]


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def generate_continuations(
    model,
    tokenizer,
    prefixes: Sequence[str],
    *,
    max_new_tokens: int = 80,
    do_sample: bool = True,
    seed: int = 0,
    batch_size: int = 8,
    show_progress: bool = True,
) -> list[list[int]]:
    """Continue each prefix by exactly `max_new_tokens` tokens (EOS is suppressed until then, as in the paper).

    Sampling is unbiased ancestral sampling (`top_k=0, top_p=1, temperature=1`), whatever the model's own
    `generation_config` says; `do_sample=False` is greedy decoding. The same `seed` gives the same samples for the
    same batching.

    Returns:
        `list[list[int]]`: the new token ids of each prefix (prompt excluded).
    """
    from transformers import GenerationConfig

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    config = GenerationConfig(
        do_sample=do_sample,
        top_k=0 if do_sample else None,
        top_p=1.0 if do_sample else None,
        temperature=1.0 if do_sample else None,
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens,
        pad_token_id=pad_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    side, tokenizer.padding_side = tokenizer.padding_side, "left"  # decoder-only batches must be left-padded
    was_training = model.training
    model.eval()
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    out = []
    try:
        mode = "sampling" if do_sample else "greedy"
        for start in tqdm(range(0, len(prefixes), batch_size), desc=f"{mode} seed {seed}", disable=not show_progress):
            batch = list(prefixes[start : start + batch_size])
            enc = tokenizer(batch, return_tensors="pt", padding=True).to(_device(model))
            gen = model.generate(**enc, generation_config=config)
            out.extend(gen[:, enc["input_ids"].shape[1] :].tolist())
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return out


class Featurizer:
    """MAUVE features: the last hidden state at the last token of a text, from any `AutoModel`-loadable model.

    Args:
        name_or_path (`str`): model id (e.g. `gpt2-large`, the paper's) or local folder.
        max_length (`int`, *optional*, defaults to `256`): texts are truncated to this many tokens (the paper's 256).
        batch_size (`int`, *optional*, defaults to `8`): texts per forward pass.
        device (`str`, *optional*): defaults to CUDA when available.
        model, tokenizer: an already-loaded model and tokenizer to use instead of loading `name_or_path`.
        load_kwargs: passed to `from_pretrained` (e.g. `gguf_file`).
    """

    def __init__(
        self,
        name_or_path: str,
        max_length: int = 256,
        batch_size: int = 8,
        device=None,
        model=None,
        tokenizer=None,
        **load_kwargs,
    ):
        from transformers import AutoModel, AutoTokenizer

        self.name = name_or_path if "gguf_file" not in load_kwargs else f"{name_or_path}/{load_kwargs['gguf_file']}"
        self.max_length, self.batch_size = max_length, batch_size
        self.tokenizer = tokenizer or AutoTokenizer.from_pretrained(name_or_path, **load_kwargs)
        if model is None:
            device = device or ("cuda" if torch.cuda.is_available() else "cpu")
            model = AutoModel.from_pretrained(name_or_path, dtype=torch.float32, **load_kwargs).to(device)
        self.model = model.eval()

    @torch.inference_mode()
    def __call__(self, texts: Sequence[str], show_progress: bool = True):
        """Features of `texts` as a `numpy.ndarray` of shape `(len(texts), hidden_size)`, float32."""
        device = _device(self.model)
        feats = []
        for start in tqdm(range(0, len(texts), self.batch_size), desc="featurizing", disable=not show_progress):
            ids = [
                self.tokenizer(t, truncation=True, max_length=self.max_length)["input_ids"] or [0]
                for t in texts[start : start + self.batch_size]
            ]
            lengths = torch.tensor([len(x) for x in ids])
            input_ids = torch.zeros((len(ids), int(lengths.max())), dtype=torch.long)
            for i, x in enumerate(ids):
                input_ids[i, : len(x)] = torch.tensor(x)
            mask = (torch.arange(input_ids.shape[1]) < lengths[:, None]).long()
            out = self.model(input_ids=input_ids.to(device), attention_mask=mask.to(device), output_hidden_states=True)
            hidden = out.hidden_states[-1]  # (b, T, d); post-final-norm, like mauve-text's GPT-2 features
            rows = torch.arange(len(ids), device=hidden.device)
            feats.append(hidden[rows, (lengths - 1).to(hidden.device)].float().cpu())
        return torch.cat(feats).numpy()


def mauve_score(p_features, q_features, *, seed: int = 25, **kwargs) -> float:
    """MAUVE between human features `p (n, d)` and model features `q (m, d)` with `mauve-text`'s defaults.

    `kwargs` go to `mauve.compute_mauve` (e.g. `num_buckets`, `kmeans_num_redo`, `mauve_scaling_factor`).
    """
    import mauve

    return float(mauve.compute_mauve(p_features=p_features, q_features=q_features, seed=seed, **kwargs).mauve)


def reference_tokens(tokenizer, prompts: Sequence[Prompt], max_new_tokens: int = 80) -> list[list[int]]:
    """The human continuations as token ids, cut to `max_new_tokens` so their repetition compares with the samples."""
    return [tokenizer(" " + p.continuation, add_special_tokens=False)["input_ids"][:max_new_tokens] for p in prompts]


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


def evaluate_generation(
    model,
    tokenizer,
    prompts: Sequence[Prompt],
    *,
    seeds: Sequence[int] = (0, 1, 2),
    decoding: Sequence[str] = ("sample", "greedy"),
    max_new_tokens: int = 80,
    batch_size: int = 8,
    featurizer: Featurizer | None = None,
    reference_features=None,
    ngram_sizes: Sequence[int] = (1, 2, 3, 4),
    mauve_kwargs: dict | None = None,
    show_progress: bool = True,
) -> dict:
    """Generate from every prompt under each decoding mode (sampling once per seed, greedy once) and score it.

    Args:
        model, tokenizer: the model under evaluation.
        prompts: from `cut_prompts`.
        seeds: sampling seeds (the paper used 5 runs).
        decoding: any of `"sample"` and `"greedy"`.
        max_new_tokens: exact number of new tokens (80 in the paper).
        batch_size: prompts per `generate` call.
        featurizer: computes MAUVE features; `None` skips MAUVE.
        reference_features: features of the human references (`[p.reference for p in prompts]`), computed once and
            shared between models; computed here when `None` and a featurizer is given.
        ngram_sizes: `n` of rep-n / distinct-n / seq-rep-n.
        mauve_kwargs: extra arguments of `mauve.compute_mauve`.

    Returns:
        `dict`: per decoding mode, `runs` (one dict per seed: `seed`, `mauve`, repetition metrics and `per_prompt`,
        each prompt's `rep-n`) and `mean`/`std` of each metric over runs, plus `samples` (per mode, per seed:
        prefix + generated text).
    """
    unknown = set(decoding) - {"sample", "greedy"}
    if unknown:
        raise ValueError(f"Unknown decoding {sorted(unknown)}: use 'sample' and/or 'greedy'.")
    if featurizer is not None and reference_features is None:
        reference_features = featurizer([p.reference for p in prompts], show_progress=show_progress)
    prefixes = [p.prefix for p in prompts]
    result, samples = {}, {}
    for mode in decoding:
        runs = []
        for seed in seeds if mode == "sample" else [seeds[0] if seeds else 0]:
            new_ids = generate_continuations(
                model,
                tokenizer,
                prefixes,
                max_new_tokens=max_new_tokens,
                do_sample=mode == "sample",
                seed=seed,
                batch_size=batch_size,
                show_progress=show_progress,
            )
            # Decode prefix and continuation together: SentencePiece tokenizers drop the leading space of a
            # continuation decoded on its own, which would glue it to the prefix.
            full = [
                tokenizer.decode(tokenizer(p)["input_ids"] + ids, skip_special_tokens=True)
                for p, ids in zip(prefixes, new_ids)
            ]
            run = {"seed": seed, **repetition_summary(new_ids, ngram_sizes)}
            # each prompt's own rep-n, in prompt order: the units of paired comparisons between models
            run["per_prompt"] = {f"rep-{n}": [rep_n(ids, n) for ids in new_ids] for n in ngram_sizes}
            if featurizer is not None:
                q = featurizer(full, show_progress=show_progress)
                run["mauve"] = mauve_score(reference_features, q, **(mauve_kwargs or {}))
            runs.append(run)
            samples.setdefault(mode, {})[seed] = full
        metrics = [k for k in runs[0] if k not in ("seed", "per_prompt")]
        stats = {k: _mean_std([r[k] for r in runs]) for k in metrics}
        result[mode] = {
            "runs": runs,
            "mean": {k: m for k, (m, _) in stats.items()},
            "std": {k: s for k, (_, s) in stats.items()},
        }
    result["samples"] = samples
    return result
