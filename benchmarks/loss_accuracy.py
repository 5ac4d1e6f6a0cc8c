"""Largest differences between `emo_loss` and its references, per dtype and variant (no timing).

    python benchmarks/loss_accuracy.py

References (tests/reference_emo.py): the official formulas with an explicit V x V cost matrix in fp64; the exact
optimal-transport distance from POT (`ot.emd2`) for one-hot targets; the closed-form gradient of performance.md §3.2.
"""

import sys
from pathlib import Path

import numpy as np
import ot
import torch


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from reference_emo import cost_matrix, reference_emo_loss, reference_emo_per_token  # noqa: E402

from emo_calibrate import emo_loss  # noqa: E402


VARIANTS = {
    "emo_anchored": dict(weighting="emo_anchored"),
    "mle_anchored": dict(weighting="mle_anchored"),
    "mle_anchored clamp 3": dict(weighting="mle_anchored", ratio_clamp=3.0),
    "mle": dict(weighting="mle"),
}


def inputs(seed, dtype, batch=4, length=33, vocab=97, dim=16):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(batch, length, vocab, generator=g)).to(dtype)
    labels = torch.randint(0, vocab, (batch, length), generator=g)
    labels[0, :5] = -100
    return logits, labels, torch.randn(vocab, dim, generator=g)


def main():
    torch.set_num_threads(1)
    print("| dtype | variant | max abs loss diff | max abs grad diff (rel. to max grad) |")
    print("|---|---|---|---|")
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        for name, variant in VARIANTS.items():
            loss_diff = grad_diff = 0.0
            for seed in range(5):
                logits, labels, emb = inputs(seed, dtype)
                x = logits.clone().requires_grad_(True)
                r = logits.double().requires_grad_(True)
                out = emo_loss(x, labels, emb, **variant)
                ref = reference_emo_loss(r, labels, emb, **variant)
                out.loss.backward()
                ref.backward()
                loss_diff = max(loss_diff, abs(out.loss.item() - ref.item()))
                grad_diff = max(grad_diff, ((x.grad.double() - r.grad).abs().max() / r.grad.abs().max()).item())
            print(f"| {str(dtype).split('.')[-1]} | {name} | {loss_diff:.2e} | {grad_diff:.2e} |")
    # exact optimal transport for one-hot targets
    worst = 0.0
    for seed in range(5):
        logits, labels, emb = inputs(seed, torch.float64)
        labels[labels < 0] = 0
        _, emo, _ = reference_emo_per_token(logits, labels, emb, subtract_target_mass=False)
        out = emo_loss(logits, labels, emb, subtract_target_mass=False, weighting="mle")
        cost = cost_matrix(emb).numpy()
        q = torch.softmax(logits[:, :-1], -1).reshape(-1, logits.shape[-1]).numpy()
        exact = []
        for row, y in zip(q, labels[:, 1:].reshape(-1).numpy()):
            p = np.zeros_like(row)
            p[y] = 1.0
            exact.append(ot.emd2(row / row.sum(), p, cost))
        worst = max(worst, abs(out.emo.item() - float(np.mean(exact))), float(np.abs(emo.numpy() - exact).max()))
    print(f"\nmax |emo - exact EMD (POT ot.emd2)| over 5 batches: {worst:.2e}")


if __name__ == "__main__":
    main()
