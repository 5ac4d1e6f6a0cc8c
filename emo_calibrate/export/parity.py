"""Compare two causal LMs on a few fixed prompts: max |Δlogit| and the KL divergence of next-token distributions.

Used by `merge_adapter` to prove that the merged model computes the same function as the adapter model it came from.
"""

from dataclasses import dataclass


__all__ = ["PARITY_PROMPTS", "PARITY_TOLERANCES", "ParityResult", "compare_logits", "prompt_logits"]

# Short, varied English text; the check needs positions, not meaning.
PARITY_PROMPTS = (
    "The history of the city began when the first king built a church on the river.",
    "Photosynthesis converts light energy into chemical energy stored in sugar molecules.",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    "She had a new song on the album, and the team played it at every game that year.",
)

# Tolerances of merged vs unmerged adapter model, per dtype (mean KL in nats). Merging changes rounding only (W + s·BA
# is rounded once), so the bound is the dtype's own inference noise: above every figure measured on SmolLM2-135M,
# over-trained adapter included, and far below a wrong base or garbage weights (docs/merge.md).
PARITY_TOLERANCES = {
    "float32": {"max_abs_logit_diff": 1e-2, "mean_kl": 1e-6},
    "float16": {"max_abs_logit_diff": 2.0, "mean_kl": 5e-3},
    "bfloat16": {"max_abs_logit_diff": 5.0, "mean_kl": 3e-2},
}


@dataclass
class ParityResult:
    """Agreement of a candidate model with a reference model over the parity prompts.

    Attributes:
        max_abs_logit_diff (`float`): largest |logit_candidate − logit_reference| over all positions and vocabulary.
        mean_kl (`float`): mean over positions of KL(p_reference ‖ p_candidate) of next-token distributions (nats).
        max_kl (`float`): the largest per-position KL.
        num_positions (`int`): token positions compared.
    """

    max_abs_logit_diff: float
    mean_kl: float
    max_kl: float
    num_positions: int

    def within(self, max_abs_logit_diff: float, mean_kl: float) -> bool:
        return self.max_abs_logit_diff <= max_abs_logit_diff and self.mean_kl <= mean_kl


def prompt_logits(model, tokenizer, prompts=PARITY_PROMPTS, max_length: int = 64) -> list:
    """Run `model` in eval mode on each prompt separately (no padding) and return its logits on CPU in float32.

    Returns:
        `list[torch.Tensor]`: one `(T_i, V)` tensor per prompt.
    """
    import torch

    model.eval()
    out = []
    with torch.no_grad():
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt", truncation=True, max_length=max_length)["input_ids"]
            out.append(model(input_ids=ids.to(model.device), use_cache=False).logits[0].float().cpu())
    return out


def compare_logits(reference: list, candidate: list) -> ParityResult:
    """Compare per-prompt logits `(T_i, V)` of a reference and a candidate model (same prompts, same order)."""
    import torch
    import torch.nn.functional as F

    if len(reference) != len(candidate):
        raise ValueError(f"got {len(reference)} reference and {len(candidate)} candidate prompts")
    max_abs, kls = 0.0, []
    for ref, cand in zip(reference, candidate, strict=True):
        if ref.shape != cand.shape:
            raise ValueError(f"logit shapes differ: reference {tuple(ref.shape)}, candidate {tuple(cand.shape)}")
        ref, cand = ref.double(), cand.double()  # float64 so tiny KLs are not swamped by rounding
        max_abs = max(max_abs, (ref - cand).abs().max().item())
        kl = F.kl_div(cand.log_softmax(-1), ref.log_softmax(-1), reduction="none", log_target=True).sum(-1)
        kls.append(kl.clamp_min(0.0))  # KL(p_ref || p_cand) per position
    kl = torch.cat(kls)
    return ParityResult(max_abs, mean_kl=kl.mean().item(), max_kl=kl.max().item(), num_positions=kl.numel())
