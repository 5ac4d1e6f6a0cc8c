"""Compare two causal LMs on a few fixed prompts: max |Δlogit| and the KL divergence of next-token distributions.

Used by `merge_adapter` to prove that the merged model computes the same function as the adapter model it came from.
"""

from dataclasses import asdict, dataclass


__all__ = ["PARITY_PROMPTS", "PARITY_TOLERANCES", "ParityResult", "compare_logits", "prompt_logits"]

# Short, varied English text; the check needs positions, not meaning.
PARITY_PROMPTS = (
    "The history of the city began when the first king built a church on the river.",
    "Photosynthesis converts light energy into chemical energy stored in sugar molecules.",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    "She had a new song on the album, and the team played it at every game that year.",
)

# Tolerances of merged vs unmerged adapter model, per dtype: (max |Δlogit|, mean KL in nats).
# Merging changes rounding only: W + s·BA is rounded once to the dtype instead of computing W·x and s·B(A·x)
# separately, so the bound is the dtype's own inference noise. Measured on SmolLM2-135M (docs/merge.md): float32
# 1.1e-4 / 1.4e-11, float16 0.52 / 7.2e-5, bfloat16 1.9-2.5 / 3.5e-3-7.7e-3 (bf16 vs fp32 inference of the same
# weights alone: 1.8-2.9 / 1.5e-3-6e-3). A wrong merge (wrong base, garbage weights) lands far above; in bf16 and
# fp16 a weak adapter dropped entirely may not, so merge in float32 when in doubt (see docs/merge.md).
PARITY_TOLERANCES = {
    "float32": (1e-2, 1e-6),
    "float16": (2.0, 5e-3),
    "bfloat16": (5.0, 3e-2),
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

    def to_dict(self) -> dict:
        return asdict(self)

    def within(self, max_abs_logit_diff: float, mean_kl: float) -> bool:
        return self.max_abs_logit_diff <= max_abs_logit_diff and self.mean_kl <= mean_kl


def prompt_logits(model, tokenizer, prompts=PARITY_PROMPTS, max_length: int = 64) -> list:
    """Run `model` on each prompt separately (no padding) and return its logits on CPU in float32.

    Returns:
        `list[torch.Tensor]`: one `(T_i, V)` tensor per prompt.
    """
    import torch

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    with torch.no_grad():
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt", truncation=True, max_length=max_length)["input_ids"]
            logits = model(input_ids=ids.to(device), use_cache=False).logits
            out.append(logits[0].float().cpu())
    model.train(was_training)
    return out


def compare_logits(reference: list, candidate: list) -> ParityResult:
    """Compare per-prompt logits `(T_i, V)` of a reference and a candidate model (same prompts, same order)."""
    import torch

    if len(reference) != len(candidate):
        raise ValueError(f"got {len(reference)} reference and {len(candidate)} candidate prompts")
    max_abs, kls = 0.0, []
    for ref, cand in zip(reference, candidate, strict=True):
        if ref.shape != cand.shape:
            raise ValueError(f"logit shapes differ: reference {tuple(ref.shape)}, candidate {tuple(cand.shape)}")
        ref, cand = ref.double(), cand.double()  # float64 so tiny KLs are not swamped by rounding
        max_abs = max(max_abs, (ref - cand).abs().max().item())
        log_p, log_q = ref.log_softmax(-1), cand.log_softmax(-1)
        kls.append((log_p.exp() * (log_p - log_q)).sum(-1).clamp_min(0.0))
    kl = torch.cat(kls)
    return ParityResult(
        max_abs_logit_diff=max_abs, mean_kl=kl.mean().item(), max_kl=kl.max().item(), num_positions=kl.numel()
    )
