"""An identity of the EMO cost embedding: the same for the same matrix in any dtype or on any device, different for
any other matrix, whatever its scale.

A resumed run must keep the cost embedding it started with, or its objective changes in the middle of training. The
identity of a (V, d) matrix X is its shape, its dtype, the precision its values carry (a float32 load of a bfloat16
checkpoint holds bfloat16 values and is compared as such) and, for every row i, computed in float64:

- `K` signed sums `p_ik = sum_j s_jk x_ij` with fixed pseudo-random signs `s_jk = +-1` (derived from SHA-256, so they
  are the same on every machine and torch version),
- the row's absolute sum `a_i = sum_j |x_ij|`.

Rounding X to a precision whose machine epsilon is `eps` (2^-7 for bfloat16, 2^-10 for float16, 2^-23 for float32)
moves each entry by at most `eps |x_ij| / 2`, so it moves every signed sum by at most `eps a_i / 2`. Two identities
therefore describe the same matrix when every row satisfies `|p_ik - p'_ik| <= (eps + eps') max(a_i, a'_i)` (plus
float32 storage and underflow slack): a bound, not a statistical guess, with room for a double rounding (float32 ->
float16 -> bfloat16), so the same matrix in another dtype is always accepted, ties included. Another matrix of the
same scale moves `p_ik` by about `sqrt(2 d)` times its entries' spread, against a tolerance of about `(eps + eps') d`
times it: with bfloat16 on one side a replaced row escapes all eight sums with probability ~1e-10 for d = 256 and
~1e-5 for d = 4096, and a whole replaced matrix never does. The identity is computed once, before training, from the
unsharded matrix: checking it at save time needs no collective.
"""

import hashlib
import math
from dataclasses import dataclass

import torch


__all__ = ["CostIdentity"]

_SIGNED_SUMS = 8
_COARSE = (torch.bfloat16, torch.float16, torch.float32)  # coarsest first
_ELEMENTS_PER_CHUNK = 1 << 22  # rows are read in chunks of ~4M entries: no float64 copy of a large head


def _signs(cols: int) -> torch.Tensor:
    """(cols, K) float64 matrix of +-1, the same everywhere (SHA-256 counter mode)."""
    needed = cols * _SIGNED_SUMS
    digest = b"".join(
        hashlib.sha256(f"emo-calibrate cost identity {block}".encode()).digest()
        for block in range(math.ceil(needed / 256))
    )
    bytes_ = torch.frombuffer(bytearray(digest), dtype=torch.uint8).to(torch.int64)
    bits = (bytes_[:, None] >> torch.arange(8)) & 1
    return (1 - 2 * bits.reshape(-1)[:needed]).to(torch.float64).reshape(cols, _SIGNED_SUMS)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _rounding(dtype_name: str) -> tuple[float, float]:
    """(machine epsilon, absolute underflow error per entry) of a floating dtype."""
    info = torch.finfo(getattr(torch, dtype_name))
    return info.eps, info.smallest_normal * info.eps


@dataclass
class CostIdentity:
    """Shape, dtype and per-row signed sums of a cost embedding (see the module docstring).

    Args:
        shape (`tuple[int, int]`): (V, d) of the matrix.
        dtype (`str`): its dtype, e.g. `"float32"`.
        precision (`str`): the coarsest of bfloat16 / float16 / its dtype that holds every entry exactly: a float32
            load of a bfloat16 checkpoint carries bfloat16 precision, and is compared with bfloat16's tolerance.
        rows (`torch.Tensor` of shape `(V, K + 1)`, float64): the K signed sums and the absolute sum of each row.
    """

    shape: tuple[int, int]
    dtype: str
    precision: str
    rows: torch.Tensor

    @classmethod
    @torch.no_grad()
    def of(cls, tensor: torch.Tensor) -> "CostIdentity":
        """The identity of a (V, d) floating tensor, on its own device when it computes in float64 (CPU, CUDA)."""
        if tensor.dim() != 2 or not tensor.is_floating_point():
            raise ValueError(
                f"A cost embedding is a floating (V, d) matrix, got {tuple(tensor.shape)} {tensor.dtype}."
            )
        device = tensor.device if tensor.device.type in ("cpu", "cuda") else torch.device("cpu")
        signs = _signs(tensor.shape[1]).to(device)
        coarser = [d for d in _COARSE if torch.finfo(d).eps > torch.finfo(tensor.dtype).eps]
        holds = dict.fromkeys(coarser, True)
        step = max(1, _ELEMENTS_PER_CHUNK // max(1, tensor.shape[1]))
        parts = []
        for start in range(0, tensor.shape[0], step):
            raw = tensor[start : start + step].detach().to(device)
            for dtype in coarser:
                holds[dtype] = holds[dtype] and torch.equal(raw, raw.to(dtype).to(raw.dtype))
            chunk = raw.to(torch.float64)
            parts.append(torch.cat([chunk @ signs, chunk.abs().sum(1, keepdim=True)], dim=1).cpu())
        rows = torch.cat(parts) if parts else torch.zeros(0, _SIGNED_SUMS + 1, dtype=torch.float64)
        precision = next((d for d in coarser if holds[d]), tensor.dtype)
        return cls(tuple(tensor.shape), _name(tensor.dtype), _name(precision), rows)

    # ---- storage: a small safetensors file (float32 rows, shape and dtype as metadata) ----

    def save(self, path: str) -> None:
        from safetensors.torch import save_file

        metadata = {"shape": ",".join(map(str, self.shape)), "dtype": self.dtype, "precision": self.precision}
        save_file({"rows": self.rows.to(torch.float32).contiguous()}, path, metadata=metadata)

    @classmethod
    def load(cls, path: str) -> "CostIdentity":
        from safetensors import safe_open

        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata()
            rows = handle.get_tensor("rows").to(torch.float64)
        shape = tuple(int(n) for n in metadata["shape"].split(","))
        return cls(shape, metadata["dtype"], metadata["precision"], rows)

    # ---- comparison ----

    def difference(self, other: "CostIdentity") -> str | None:
        """None when `other` is this matrix up to rounding (any dtype, any device); otherwise what differs."""
        if tuple(other.shape) != tuple(self.shape):
            return f"its shape is {tuple(other.shape)}, the run's was {tuple(self.shape)}"
        (eps, tiny), (eps_other, tiny_other) = _rounding(self.precision), _rounding(other.precision)
        absolute = torch.maximum(self.rows[:, -1], other.rows[:, -1])
        # float32 storage of the sums (2^-24 relative each side) and entries that underflow in a narrow dtype
        tolerance = (eps + eps_other + 2**-22) * absolute * (1 + 1e-6) + self.shape[1] * (tiny + tiny_other)
        deviation = (self.rows[:, :-1] - other.rows[:, :-1]).abs().amax(dim=1)
        bad = ~(deviation <= tolerance)  # NaN counts as a difference
        if not bool(bad.any()):
            return None
        first = ", ".join(str(i) for i in bad.nonzero().flatten()[:5].tolist())
        entries = max(1, self.shape[0] * self.shape[1])
        scale, other_scale = float(self.rows[:, -1].sum()) / entries, float(other.rows[:, -1].sum()) / entries
        same_scale = math.isclose(scale, other_scale, rel_tol=0.05)
        return (
            f"{int(bad.sum())} of {self.shape[0]} rows differ beyond {self.precision} / {other.precision} rounding "
            f"(first rows: {first}); mean |entry| {other_scale:.4g} now vs {scale:.4g} in the run"
            + (", so it is another matrix of the same shape and scale" if same_scale else "")
        )
