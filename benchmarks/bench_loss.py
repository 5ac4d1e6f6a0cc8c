"""Loss-only benchmark of the LM head: time and peak memory of forward+backward, side by side, on CPU.

Cases, all from the same hidden states H (N, d), a frozen output embedding W (V, d) and targets y (N,):

  naive_ce        full logits + F.cross_entropy (what a plain causal LM computes)
  naive_emo       the official EMO code's computation on full logits, fp32: one-hot p~ @ Ê, q @ Ê, detached target mass
  fused_emo       emo_calibrate.fused.fused_linear_emo_loss (token chunks, gradient computed in forward)
  chunked_ce      a token-chunked cross-entropy with the gradient computed in forward and the same chunk rule as
                  fused_emo (its fp32 working buffers, one (n_c, V) tensor here, take about the bytes of H)
  chunked_ce_same same chunked cross-entropy at fused_emo's token chunk size (half the tokens of chunked_ce)
  trl_chunked     TRL 1.16's ChunkedLogProbFunction (SFTTrainer's default loss: vocabulary tiles, recompute in backward)

Each case runs in a fresh subprocess with glibc's malloc told to give every allocation above 64 KiB back to the
system on free (MALLOC_MMAP_THRESHOLD_), so the resident set follows the live tensors. Peak memory is the kernel's
resident high-water mark (VmHWM, reset through /proc/self/clear_refs before each repetition) minus the resident size
measured just before it, after the inputs exist: it counts everything the loss allocates, including the gradient dH it
returns. Time is the median wall time over the repetitions, after one warm-up run.

    python benchmarks/bench_loss.py                    # the three issue shapes, fp32, 1 thread
    python benchmarks/bench_loss.py --shapes 1024x32000x1024 --reps 3
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time


CASES = ("naive_ce", "naive_emo", "fused_emo", "chunked_ce", "chunked_ce_same", "trl_chunked")
DEFAULT_SHAPES = ("4096x32000x1024", "2048x49152x576", "2048x151936x896")
# Peak of the naive EMO in units of one fp32 (N, V) tensor, measured (performance.md section 0): used to skip cells
# that would not fit, before running them.
NAIVE_EMO_NV_COPIES = 9.5
NAIVE_CE_NV_COPIES = 4.5


# ------------------------------------------------------------------------------------------------------ the cases
def naive_ce(hidden, weight, targets):
    import torch.nn.functional as F

    return F.cross_entropy(hidden @ weight.t(), targets)


def naive_emo(hidden, weight, targets, cost):
    """The official EMO head on full logits (emo_anchored, detached target mass), in its own dense formulation."""
    import torch
    import torch.nn.functional as F

    logits = hidden @ weight.t()
    mle = F.cross_entropy(logits, targets, reduction="none")
    one_hot = F.one_hot(targets, num_classes=weight.shape[0]).to(logits.dtype)
    smoothed = one_hot + 1e-15
    smoothed = smoothed / torch.linalg.vector_norm(smoothed, ord=1, dim=-1, keepdim=True)
    cost_hat = cost / torch.linalg.vector_norm(cost, ord=2, dim=1, keepdim=True)
    target_repr = smoothed @ cost_hat  # (N, d) a dense GEMM to gather the target rows
    q = torch.log_softmax(logits, dim=-1).exp()
    q_final = q - (q * one_hot).detach()
    predicted_repr = q_final @ cost_hat
    emo = 1 - (target_repr * predicted_repr).sum(-1)
    return ((emo / (mle + 1e-10)).detach() * mle + emo).mean()


def fused_emo(hidden, weight, targets):
    from emo_calibrate.fused import fused_linear_emo_loss

    return fused_linear_emo_loss(hidden, weight, targets).loss


def make_chunked_ce():
    import torch

    class ChunkedCE(torch.autograd.Function):
        """Mean cross-entropy over token chunks; dH computed in forward from one in-place (n_c, V) fp32 buffer."""

        @staticmethod
        def forward(ctx, hidden, weight, targets, chunk):
            n = hidden.shape[0]
            loss = torch.zeros((), dtype=torch.float32)
            d_hidden = torch.empty_like(hidden)
            for start in range(0, n, chunk):
                h, y = hidden[start : start + chunk], targets[start : start + chunk]
                z = (h @ weight.t()).float()
                z_y = z.gather(1, y[:, None]).squeeze(1)
                z_max = z.amax(-1, keepdim=True)
                z.sub_(z_max).exp_()
                total = z.sum(-1, keepdim=True)
                loss += (z_max + total.log()).sum() - z_y.sum()
                z.div_(total * n)  # softmax / N
                z.scatter_add_(1, y[:, None], torch.full_like(z_y, -1.0 / n)[:, None])
                d_hidden[start : start + chunk] = z.to(weight.dtype) @ weight
                del z  # before the next chunk's GEMM allocates its buffer
            ctx.d_hidden = d_hidden
            return loss / n

        @staticmethod
        def backward(ctx, grad):
            d_hidden, ctx.d_hidden = ctx.d_hidden, None
            return d_hidden.mul_(grad), None, None, None

    return ChunkedCE


def chunk_for(case, hidden, weight):
    """chunked_ce: one fp32 (n_c, V) buffer ~ bytes of H; chunked_ce_same: fused_emo's token count."""
    from emo_calibrate.fused import FP32_BUFFERS_PER_TOKEN, auto_chunk_size

    n, vocab = hidden.shape[0], weight.shape[0]
    emo_chunk = auto_chunk_size(n, vocab, hidden.numel() * hidden.element_size())
    return emo_chunk if case == "chunked_ce_same" else min(n, emo_chunk * FP32_BUFFERS_PER_TOKEN)


def trl_chunked(hidden, weight, targets):
    from trl.kernels import ChunkedLogProbFunction
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

    logprobs, *_ = ChunkedLogProbFunction.apply(
        hidden, weight, None, targets, 1.0, _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0, ("entropy", "is_top1")
    )
    return -logprobs.mean()


# ------------------------------------------------------------------------------------------------------ measuring
def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident size (Linux >= 4.0)


def worker(case, shape, reps, dtype_name):
    import gc

    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    n, vocab, dim = shape
    dtype = getattr(torch, dtype_name)
    hidden = (torch.randn(n, dim) * 2.0).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, dim) / dim**0.5).to(dtype)  # frozen head, as under LoRA
    targets = torch.randint(0, vocab, (n,))
    if case == "naive_emo":
        cost = weight.detach().float().clone()  # the official code keeps its own copy of the embedding
        step = lambda: naive_emo(hidden, weight, targets, cost)  # noqa: E731
    elif case in ("chunked_ce", "chunked_ce_same"):
        fn, chunk = make_chunked_ce(), chunk_for(case, hidden, weight)
        step = lambda: fn.apply(hidden, weight, targets, chunk)  # noqa: E731
    else:
        step = lambda: globals()[case](hidden, weight, targets)  # noqa: E731

    times, peaks = [], []
    for rep in range(reps + 1):  # rep 0 warms up
        hidden.grad = None
        gc.collect()
        base = _status_kib("VmRSS")
        _reset_peak()
        start = time.perf_counter()
        step().backward()
        elapsed = time.perf_counter() - start
        peak = _status_kib("VmHWM") - base
        if rep:
            times.append(elapsed)
            peaks.append(peak)
    return {"time_s": statistics.median(times), "times_s": times, "peak_mib": max(peaks) / 1024}


# ------------------------------------------------------------------------------------------------------ driver
def machine_info():
    import torch

    model = "unknown"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{model}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, torch {torch.__version__}, Python {platform.python_version()}"


def estimated_gib(case, n, vocab, dim):
    nv = n * vocab * 4 / 2**30
    copies = {"naive_emo": NAIVE_EMO_NV_COPIES, "naive_ce": NAIVE_CE_NV_COPIES}.get(case, 0.0)
    return nv * copies + vocab * dim * 8 / 2**30


def available_gib():
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:")) / 2**20


def run_case(case, shape, reps, dtype):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", OMP_NUM_THREADS="1")
    cmd = [sys.executable, __file__, "--worker", case, "--shapes", "x".join(map(str, shape))]
    cmd += ["--reps", str(reps), "--dtype", dtype]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES), help="NxVxd, e.g. 4096x32000x1024")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions per case, after one warm-up")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--max-gib", type=float, default=12.0, help="skip a cell whose estimated peak is above this")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes]

    if args.worker:
        print(json.dumps(worker(args.worker, shapes[0], args.reps, args.dtype)))
        return 0

    print(f"machine: {machine_info()}")
    print(f"command: python {' '.join(sys.argv)}")
    print(f"dtype {args.dtype}, 1 thread, median of {args.reps} reps after 1 warm-up; peak = RSS high-water growth\n")
    rows = []
    for shape in shapes:
        results = {}
        for case in args.cases:
            gib, free = estimated_gib(case, *shape), available_gib()
            if gib > args.max_gib:
                results[case] = {"skipped": f"skipped: needs ~{gib:.1f} GiB > --max-gib {args.max_gib:g}"}
            elif gib > free - 3:
                results[case] = {"skipped": f"skipped: needs ~{gib:.1f} GiB, only {free:.1f} GiB available now"}
            else:
                results[case] = run_case(case, shape, args.reps, args.dtype)
            print(f"  {shape} {case}: {results[case]}", file=sys.stderr, flush=True)
        rows.append((shape, results))

    print("| N x V x d | case | time (s) | time / chunked_ce | peak (MiB) | peak / chunked_ce |")
    print("|---|---|---:|---:|---:|---:|")
    for shape, results in rows:
        ref = results.get("chunked_ce", {})
        for case, res in results.items():
            label = "x".join(map(str, shape))
            if "time_s" not in res:
                print(f"| {label} | {case} | {res.get('skipped') or res.get('error')} | | | |")
                continue
            t_ratio = f"{res['time_s'] / ref['time_s']:.2f}" if "time_s" in ref else ""
            m_ratio = f"{res['peak_mib'] / ref['peak_mib']:.2f}" if "peak_mib" in ref else ""
            print(f"| {label} | {case} | {res['time_s']:.2f} | {t_ratio} | {res['peak_mib']:.0f} | {m_ratio} |")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
