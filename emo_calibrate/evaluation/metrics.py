"""Pure evaluation metrics on tensors and token lists: likelihood and calibration (repetition and diversity are in
`repetition.py`, re-exported here).

Nothing here runs a model. The model-facing code (`perplexity.py`, `calibration.py`, `generation.py`) feeds these
functions, and the accumulators below let it do so batch by batch without keeping every probability in memory.

Conventions:
- `logits` are `(N, V)` rows already aligned with `targets` `(N,)`: row `i` is the distribution that predicts
  `targets[i]` (the caller does the causal shift and drops padding).
- Calibration is *top-label* calibration (Guo et al., 2017): the confidence of a prediction is the largest next-token
  probability and the prediction is correct when that token is the target. The Brier score is the full multi-class
  one, `sum_v (p_v - 1[v = y])^2`, in [0, 2].
- Intervals are percentile bootstraps over units (documents, test items); paired comparisons of two models on the
  same units resample the units jointly (`paired_bootstrap_difference`) or test the discordant pairs (`mcnemar`).
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .repetition import distinct_n, mean_rep_n, ngrams, rep_n, repetition_summary, sequence_repetition_rate


__all__ = [
    "token_nll",
    "perplexity",
    "word_perplexity",
    "count_words",
    "bootstrap_perplexity",
    "bootstrap_mean",
    "paired_bootstrap_difference",
    "mcnemar",
    "NLLAccumulator",
    "top1_confidence",
    "brier_score",
    "CalibrationBins",
    "expected_calibration_error",
    "CalibrationAccumulator",
    "ngrams",
    "rep_n",
    "mean_rep_n",
    "distinct_n",
    "sequence_repetition_rate",
    "repetition_summary",
]


# ----------------------------------------------------------------------------------------------------------------
# Likelihood
# ----------------------------------------------------------------------------------------------------------------


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of each target token, in nats, computed in fp32.

    Args:
        logits (`torch.Tensor` of shape `(N, V)`): unnormalised next-token scores.
        targets (`torch.Tensor` of shape `(N,)`): the token each row predicts.

    Returns:
        `torch.Tensor` of shape `(N,)`: `-log softmax(logits)[targets]`.
    """
    return torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none")


def perplexity(nll_sum: float, count: int | float) -> float:
    """`exp(nll_sum / count)`: token perplexity when `count` is a token count, word perplexity for a word count."""
    if count <= 0:
        raise ValueError(f"perplexity needs a positive count of scored units, got {count}.")
    return math.exp(nll_sum / count)


def count_words(text: str) -> int:
    """Number of whitespace-separated words: the tokenizer-independent unit of word-level perplexity."""
    return len(text.split())


def word_perplexity(nll_sum: float, num_words: int) -> float:
    """Word-level perplexity `exp(total NLL / number of whitespace words)`.

    The total NLL of a text does not depend on how it was tokenized, so dividing by a tokenizer-independent count
    makes models with different tokenizers comparable (token perplexities are not).
    """
    return perplexity(nll_sum, num_words)


def bootstrap_perplexity(
    nll_per_doc: Sequence[float], count_per_doc: Sequence[float], num_samples: int = 1000, seed: int = 0
) -> dict[str, float]:
    """Spread of a corpus perplexity under resampling of whole documents with replacement.

    Args:
        nll_per_doc: summed NLL of each document.
        count_per_doc: the unit count (tokens or words) of each document.
        num_samples: bootstrap resamples.
        seed: seed of the resampling.

    Returns:
        `{"std", "low", "high"}`: the standard deviation and the 2.5 / 97.5 percentiles of the resampled perplexity.
        With a single document there is nothing to resample and all three collapse (std 0).
    """
    nll = torch.as_tensor(nll_per_doc, dtype=torch.float64)
    cnt = torch.as_tensor(count_per_doc, dtype=torch.float64)
    if nll.numel() == 0 or nll.shape != cnt.shape:
        raise ValueError("bootstrap_perplexity needs one NLL and one count per document (and at least one document).")
    idx = _resample(nll.numel(), num_samples, seed)
    ppl = torch.exp(nll[idx].sum(1) / cnt[idx].sum(1).clamp(min=1e-12))
    low, high = _percentiles(ppl)
    return {"std": ppl.std(unbiased=False).item(), "low": low, "high": high}


def _resample(num_units: int, num_samples: int, seed: int) -> torch.Tensor:
    """`(num_samples, num_units)` indices drawn with replacement: one bootstrap resample per row."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, num_units, (num_samples, num_units), generator=gen)


def _percentiles(samples: torch.Tensor) -> list[float]:
    return torch.quantile(samples, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()


def bootstrap_mean(values: Sequence[float], num_samples: int = 2000, seed: int = 0) -> dict[str, float]:
    """Mean of per-unit `values` (e.g. 0/1 correctness: an accuracy) with a 95 % percentile-bootstrap interval.

    Returns:
        `{"mean", "low", "high", "std"}`; with one unit the interval collapses to the value.
    """
    x = torch.as_tensor(values, dtype=torch.float64)
    if x.numel() == 0:
        raise ValueError("bootstrap_mean needs at least one value.")
    means = x[_resample(x.numel(), num_samples, seed)].mean(1)
    low, high = _percentiles(means)
    return {"mean": x.mean().item(), "low": low, "high": high, "std": means.std(unbiased=False).item()}


def paired_bootstrap_difference(
    values_a: Sequence[float], values_b: Sequence[float], num_samples: int = 2000, seed: int = 0
) -> dict[str, float]:
    """`mean(a) - mean(b)` over the same units, with a 95 % interval from resampling the units jointly.

    Returns:
        `{"difference", "low", "high"}`.
    """
    a = torch.as_tensor(values_a, dtype=torch.float64)
    b = torch.as_tensor(values_b, dtype=torch.float64)
    if a.numel() == 0 or a.shape != b.shape:
        raise ValueError("paired_bootstrap_difference needs two equally long, non-empty sequences of unit values.")
    diff = a - b
    low, high = _percentiles(diff[_resample(diff.numel(), num_samples, seed)].mean(1))
    return {"difference": diff.mean().item(), "low": low, "high": high}


def mcnemar(correct_a: Sequence[bool], correct_b: Sequence[bool]) -> dict:
    """Exact two-sided McNemar test of two classifiers on the same items.

    Only discordant items count: `a_only` (a right, b wrong) and `b_only`; under the null both are equally likely,
    so `p = min(1, 2 P(X <= min(a_only, b_only)))` with `X ~ Binomial(a_only + b_only, 1/2)`.

    Returns:
        `{"a_only", "b_only", "p_value"}` (`p_value` 1.0 when there is no discordant item).
    """
    if len(correct_a) != len(correct_b):
        raise ValueError("mcnemar needs the correctness of both models on the same items.")
    a_only = sum(bool(x) and not bool(y) for x, y in zip(correct_a, correct_b))
    b_only = sum(bool(y) and not bool(x) for x, y in zip(correct_a, correct_b))
    n = a_only + b_only
    if n == 0:
        return {"a_only": 0, "b_only": 0, "p_value": 1.0}
    tail = sum(math.comb(n, k) for k in range(min(a_only, b_only) + 1)) / 2**n
    return {"a_only": a_only, "b_only": b_only, "p_value": min(1.0, 2 * tail)}


class NLLAccumulator:
    """Sums the NLL of scored tokens per document, batch by batch.

    Args:
        num_documents (`int`): how many documents will be scored.
        words_per_document (`Sequence[int]`, *optional*): whitespace word counts, for word-level perplexity.
    """

    def __init__(self, num_documents: int, words_per_document: Sequence[int] | None = None):
        self.nll = torch.zeros(num_documents, dtype=torch.float64)
        self.tokens = torch.zeros(num_documents, dtype=torch.float64)
        self.words = None if words_per_document is None else [int(w) for w in words_per_document]

    def update(self, logits: torch.Tensor, targets: torch.Tensor, doc_index: torch.Tensor) -> None:
        """Add rows `logits (N, V)` predicting `targets (N,)`, each belonging to document `doc_index (N,)`."""
        nll = token_nll(logits, targets).double().cpu()
        doc_index = doc_index.cpu()
        self.nll.index_add_(0, doc_index, nll)
        self.tokens.index_add_(0, doc_index, torch.ones_like(nll))

    def compute(self, bootstrap_samples: int = 1000, seed: int = 0) -> dict:
        """Token (and word) perplexity of everything seen, with document-bootstrap spreads."""
        nll_sum, num_tokens = self.nll.sum().item(), int(self.tokens.sum().item())
        out = {"nll_sum": nll_sum, "num_tokens": num_tokens, "token": perplexity(nll_sum, num_tokens)}
        scored = self.tokens > 0
        spread = bootstrap_perplexity(self.nll[scored], self.tokens[scored], bootstrap_samples, seed)
        out.update(token_std=spread["std"], token_low=spread["low"], token_high=spread["high"])
        # Per-document sums, in document order: what paired comparisons between models resample.
        out["per_document"] = {"nll": self.nll.tolist(), "tokens": self.tokens.long().tolist()}
        if self.words is not None:
            words = torch.tensor(self.words, dtype=torch.float64)
            out["num_words"] = int(words.sum().item())
            out["word"] = word_perplexity(nll_sum, out["num_words"])
            spread = bootstrap_perplexity(self.nll[scored], words[scored], bootstrap_samples, seed)
            out.update(word_std=spread["std"], word_low=spread["low"], word_high=spread["high"])
            out["per_document"]["words"] = list(self.words)
        return out


# ----------------------------------------------------------------------------------------------------------------
# Calibration
# ----------------------------------------------------------------------------------------------------------------


def top1_confidence(probs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-label confidence and correctness.

    Args:
        probs (`torch.Tensor` of shape `(N, V)`): next-token probabilities.
        targets (`torch.Tensor` of shape `(N,)`): the observed tokens.

    Returns:
        `(confidence, correct)`, both of shape `(N,)`: the largest probability, and whether its token is the target
        (ties resolve to the lowest token id, as `argmax` does).
    """
    confidence, prediction = probs.max(dim=-1)
    return confidence, prediction == targets


def brier_score(probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Multi-class Brier score of each row, `sum_v (p_v - 1[v = y])^2 = sum_v p_v^2 - 2 p_y + 1`.

    Args:
        probs (`torch.Tensor` of shape `(N, V)`): next-token probabilities.
        targets (`torch.Tensor` of shape `(N,)`): the observed tokens.

    Returns:
        `torch.Tensor` of shape `(N,)` with values in [0, 2] (0 = all mass on the target).
    """
    probs = probs.float()
    p_target = probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return probs.pow(2).sum(-1) - 2 * p_target + 1


@dataclass
class CalibrationBins:
    """Additive per-bin sums from which ECE and the reliability curve follow.

    Bin `b` of `num_bins` equal-width bins holds confidences in `(b / num_bins, (b + 1) / num_bins]` (confidence 0
    goes to the first bin). Sums rather than means, so bins from several batches add up exactly.

    Attributes:
        count (`torch.Tensor` of shape `(num_bins,)`): predictions per bin.
        confidence_sum (`torch.Tensor` of shape `(num_bins,)`): summed confidence per bin.
        correct_sum (`torch.Tensor` of shape `(num_bins,)`): correct predictions per bin.
    """

    count: torch.Tensor
    confidence_sum: torch.Tensor
    correct_sum: torch.Tensor

    @classmethod
    def empty(cls, num_bins: int) -> "CalibrationBins":
        if num_bins < 1:
            raise ValueError(f"num_bins must be at least 1, got {num_bins}.")
        zeros = torch.zeros(num_bins, dtype=torch.float64)
        return cls(zeros.clone(), zeros.clone(), zeros.clone())

    @classmethod
    def from_predictions(
        cls, confidence: torch.Tensor, correct: torch.Tensor, num_bins: int = 15
    ) -> "CalibrationBins":
        """Bin `confidence (N,)` in [0, 1] with the matching `correct (N,)` flags."""
        bins = cls.empty(num_bins)
        confidence = confidence.detach().double().cpu().flatten()
        correct = correct.detach().double().cpu().flatten()
        index = cls.bin_index(confidence, num_bins)
        bins.count.index_add_(0, index, torch.ones_like(confidence))
        bins.confidence_sum.index_add_(0, index, confidence)
        bins.correct_sum.index_add_(0, index, correct)
        return bins

    @staticmethod
    def bin_index(confidence: torch.Tensor, num_bins: int) -> torch.Tensor:
        """The bin of each confidence in [0, 1]: `ceil(confidence * num_bins) - 1`, confidence 0 in bin 0."""
        return (torch.ceil(confidence * num_bins).long() - 1).clamp(0, num_bins - 1)

    def __add__(self, other: "CalibrationBins") -> "CalibrationBins":
        return CalibrationBins(
            self.count + other.count,
            self.confidence_sum + other.confidence_sum,
            self.correct_sum + other.correct_sum,
        )

    @property
    def num_bins(self) -> int:
        return self.count.numel()

    @property
    def ece(self) -> float:
        """Expected calibration error `sum_b (n_b / N) |accuracy_b - confidence_b|`."""
        total = self.count.sum()
        if total == 0:
            raise ValueError("ECE of zero predictions is undefined.")
        return ((self.correct_sum - self.confidence_sum).abs().sum() / total).item()

    def curve(self) -> dict[str, list]:
        """Reliability-diagram data for the non-empty bins: bin edges, mean confidence, accuracy and count."""
        keep = self.count > 0
        edges = torch.linspace(0, 1, self.num_bins + 1, dtype=torch.float64)
        return {
            "bin_low": edges[:-1][keep].tolist(),
            "bin_high": edges[1:][keep].tolist(),
            "confidence": (self.confidence_sum[keep] / self.count[keep]).tolist(),
            "accuracy": (self.correct_sum[keep] / self.count[keep]).tolist(),
            "count": self.count[keep].long().tolist(),
        }


def expected_calibration_error(confidence: torch.Tensor, correct: torch.Tensor, num_bins: int = 15) -> float:
    """Binned ECE of predictions with `confidence (N,)` and `correct (N,)`; see `CalibrationBins`."""
    return CalibrationBins.from_predictions(confidence, correct, num_bins).ece


class CalibrationAccumulator:
    """Top-label ECE, multi-class Brier score, top-1 accuracy and mean confidence over batches of next tokens.

    Args:
        num_bins (`int`, *optional*, defaults to `15`): equal-width confidence bins (15, as in Guo et al. 2017).
        num_documents (`int`, *optional*): also keep the bins of each document (`doc_index` of `update`), so that
            ECE can be recomputed on a resample of documents (`paired.paired_ece_difference`).
    """

    def __init__(self, num_bins: int = 15, num_documents: int | None = None):
        self.bins = CalibrationBins.empty(num_bins)
        self.brier_sum = 0.0
        self.target_prob_sum = 0.0
        # (3, num_documents, num_bins): the count, confidence_sum and correct_sum of each document's bins
        self.document_bins = None if num_documents is None else torch.zeros(3, num_documents, num_bins).double()

    def update(self, logits: torch.Tensor, targets: torch.Tensor, doc_index: torch.Tensor | None = None) -> None:
        """Add rows `logits (N, V)` predicting `targets (N,)` of documents `doc_index (N,)`."""
        probs = torch.softmax(logits.float(), dim=-1)
        confidence, correct = top1_confidence(probs, targets)
        self.bins = self.bins + CalibrationBins.from_predictions(confidence, correct, self.bins.num_bins)
        if self.document_bins is not None:
            confidence, correct = confidence.double().cpu(), correct.double().cpu()
            flat = doc_index.cpu() * self.bins.num_bins + CalibrationBins.bin_index(confidence, self.bins.num_bins)
            for sums, values in zip(self.document_bins.flatten(1), (torch.ones_like(confidence), confidence, correct)):
                sums.index_add_(0, flat, values)
        self.brier_sum += brier_score(probs, targets).double().sum().item()
        self.target_prob_sum += probs.gather(-1, targets.unsqueeze(-1)).double().sum().item()

    def compute(self) -> dict:
        n = self.bins.count.sum().item()
        out = {
            "ece": self.bins.ece,
            "brier": self.brier_sum / n,
            "accuracy": self.bins.correct_sum.sum().item() / n,
            "mean_confidence": self.bins.confidence_sum.sum().item() / n,
            "mean_target_prob": self.target_prob_sum / n,
            "num_tokens": int(n),
            "num_bins": self.bins.num_bins,
            "curve": self.bins.curve(),
        }
        if self.document_bins is not None:  # one list of num_bins sums per document
            count, confidence_sum, correct_sum = self.document_bins
            out["per_document"] = {"count": count.long().tolist(), "confidence_sum": confidence_sum.tolist()}
            out["per_document"]["correct_sum"] = correct_sum.long().tolist()
        return out
