"""Loss-only benchmark of the LM head: time and peak memory of forward+backward, side by side.

Cases, all from the same hidden states H (N, d), a frozen output embedding W (V, d) and targets y (N,):

  naive_ce        full logits + F.cross_entropy (what a plain causal LM computes; logits upcast to fp32)
  naive_emo       the official EMO code's computation on full fp32 logits: one-hot p~ @ Ê, q @ Ê, detached target mass
  fused_emo       emo_calibrate.losses.fused.fused_linear_emo_loss (token chunks, gradient computed in forward)
  chunked_ce      a token-chunked cross-entropy, gradient computed in forward, with fused_emo's chunk rule: its fp32
                  working buffer (one (n_c, V) tensor; fused_emo has two) takes the same bytes, so 2x the tokens
  chunked_ce_same the same chunked cross-entropy at fused_emo's token count (half chunked_ce's memory)
  trl_chunked     TRL 1.16's ChunkedLogProbFunction (SFTTrainer's default loss: vocabulary tiles, recompute in backward;
                  off-GPU it runs its torch fallback, not its Triton kernel)

Method (CPU). Each shape runs in two fresh subprocesses, in which the cases run interleaved, round after round
(round 0 warms up and is not reported), so that load from other jobs on a shared machine falls on all cases alike.
  memory: glibc's malloc maps every block above 64 KiB separately and unmaps it on free (MALLOC_MMAP_THRESHOLD_), so
          the resident set follows the live tensors. Peak = the kernel's resident high-water mark (VmHWM, reset
          through /proc/self/clear_refs just before the run) minus the resident size at that moment: everything the
          loss allocates, the returned gradient dH included. One measured round.
  time:   default malloc (those settings would add page faults to every chunk). Median over rounds of the process
          CPU time: one intra-op thread, so CPU time is compute time, while wall time (reported too) swings with
          other jobs.
On CUDA: one process, wall time with synchronisation, and max_memory_allocated growth.

    python benchmarks/bench_loss.py                    # the issue's three shapes, CPU fp32, 1 thread
    python benchmarks/bench_loss.py --shapes 1024x32000x1024 --reps 2
    python benchmarks/bench_loss.py --device cuda --dtype bfloat16 --shapes 16384x128256x4096
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from common import available_gib, machine_info, status_kib  # benchmarks/common.py (this folder is on sys.path)


CASES = ("naive_ce", "naive_emo", "fused_emo", "chunked_ce", "chunked_ce_same", "trl_chunked")
DEFAULT_SHAPES = ("4096x32000x1024", "2048x49152x576", "2048x151936x896")
# Peak of the naive paths in fp32 (N, V) tensors (performance.md section 0 measures 9.1 and 4.1), to skip cells that
# would not fit before running them.
NV_COPIES = {"naive_emo": 9.5, "naive_ce": 4.5}
TRL_VOCAB_TILE = 32768  # trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE in TRL 1.16


# ------------------------------------------------------------------------------------------------------ the cases
def naive_ce(hidden, weight, targets):
    import torch.nn.functional as F

    return F.cross_entropy((hidden @ weight.t()).float(), targets)


def naive_emo(hidden, weight, targets, cost):
    """The official EMO head on full logits (emo_anchored, detached target mass), in its dense formulation."""
    import torch
    import torch.nn.functional as F

    logits = (hidden @ weight.t()).float()
    mle = F.cross_entropy(logits, targets, reduction="none")
    one_hot = F.one_hot(targets, num_classes=weight.shape[0]).to(logits.dtype)
    smoothed = one_hot + 1e-15
    smoothed = smoothed / torch.linalg.vector_norm(smoothed, ord=1, dim=-1, keepdim=True)
    cost_hat = cost / torch.linalg.vector_norm(cost, ord=2, dim=1, keepdim=True)
    target_repr = smoothed @ cost_hat  # (N, d): a dense GEMM to gather the target rows
    q = torch.log_softmax(logits, dim=-1).exp()
    q_final = q - (q * one_hot).detach()
    predicted_repr = q_final @ cost_hat
    emo = 1 - (target_repr * predicted_repr).sum(-1)
    return ((emo / (mle + 1e-10)).detach() * mle + emo).mean()


def fused_emo(hidden, weight, targets, chunk_size=None):
    from emo_calibrate.losses.fused import fused_linear_emo_loss

    return fused_linear_emo_loss(hidden, weight, targets, chunk_size=chunk_size).loss


def make_chunked_ce():
    import torch

    class ChunkedCE(torch.autograd.Function):
        """Mean cross-entropy over token chunks; dH computed in forward from one in-place (n_c, V) fp32 buffer."""

        @staticmethod
        def forward(ctx, hidden, weight, targets, chunk):
            n = hidden.shape[0]
            loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
            d_hidden = torch.empty_like(hidden)
            workspace = torch.empty(min(n, chunk), weight.shape[0], dtype=torch.float32, device=hidden.device)
            for start in range(0, n, chunk):
                h, y = hidden[start : start + chunk], targets[start : start + chunk]
                z = workspace[: h.shape[0]]  # one fp32 buffer reused by every chunk
                if weight.dtype == torch.float32:
                    torch.mm(h, weight.t(), out=z)
                else:
                    z.copy_(h @ weight.t())  # model-dtype GEMM
                z_y = z.gather(1, y[:, None]).squeeze(1)
                z_max = z.amax(-1, keepdim=True)
                z.sub_(z_max).exp_()
                total = z.sum(-1, keepdim=True)
                loss += (z_max + total.log()).sum() - z_y.sum()
                z.div_(total * n)  # softmax / N
                z.scatter_add_(1, y[:, None], torch.full_like(z_y, -1.0 / n)[:, None])
                d_hidden[start : start + chunk] = z.to(weight.dtype) @ weight
            ctx.d_hidden = d_hidden
            return loss / n

        @staticmethod
        def backward(ctx, grad):
            d_hidden, ctx.d_hidden = ctx.d_hidden, None
            return d_hidden.mul_(grad), None, None, None

    return ChunkedCE


def trl_chunked(hidden, weight, targets):
    from trl.kernels import ChunkedLogProbFunction

    logprobs, *_ = ChunkedLogProbFunction.apply(
        hidden, weight, None, targets, 1.0, TRL_VOCAB_TILE, None, 1.0, ("entropy", "is_top1")
    )
    return -logprobs.mean()


def make_steps(cases, hidden, weight, targets, fused_chunk):
    from emo_calibrate.losses.fused import FP32_BUFFERS_PER_TOKEN, auto_chunk_size

    n, vocab = hidden.shape[0], weight.shape[0]
    emo_chunk = fused_chunk or auto_chunk_size(n, vocab, hidden.numel() * hidden.element_size(), hidden.device.type)
    chunked_ce = make_chunked_ce()
    # The official code keeps its own copy of the embedding (fp32 here).
    cost = weight.detach().float().clone() if "naive_emo" in cases else None
    steps = {
        "naive_ce": lambda: naive_ce(hidden, weight, targets),
        "naive_emo": lambda: naive_emo(hidden, weight, targets, cost),
        "fused_emo": lambda: fused_emo(hidden, weight, targets, fused_chunk),
        "chunked_ce": lambda: chunked_ce.apply(hidden, weight, targets, min(n, FP32_BUFFERS_PER_TOKEN * emo_chunk)),
        "chunked_ce_same": lambda: chunked_ce.apply(hidden, weight, targets, emo_chunk),
        "trl_chunked": lambda: trl_chunked(hidden, weight, targets),
    }
    return {case: steps[case] for case in cases}, emo_chunk


# ------------------------------------------------------------------------------------------------------ measuring


def _reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident size (Linux >= 4.0)


def run_once(step, hidden, cuda):
    """(wall s, cpu s, peak MiB) of one forward+backward."""
    import gc

    import torch

    hidden.grad = None
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        base = status_kib("VmRSS") / 1024
        _reset_peak()
    wall, cpu = time.perf_counter(), time.process_time()
    step().backward()
    if cuda:
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else status_kib("VmHWM") / 1024
    return wall, cpu, peak - base


def worker(cases, shape, reps, dtype_name, device, fused_chunk):
    """All cases of one shape, interleaved: round 0 warms up, rounds 1..reps are measured."""
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    n, vocab, dim = shape
    cuda = device == "cuda"
    dtype = getattr(torch, dtype_name)
    hidden = (torch.randn(n, dim, device=device) * 2.0).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, dim, device=device) / dim**0.5).to(dtype)  # frozen head, as under LoRA
    targets = torch.randint(0, vocab, (n,), device=device)
    steps, emo_chunk = make_steps(cases, hidden, weight, targets, fused_chunk)
    runs = {case: [] for case in cases}
    errors = {}
    for round_ in range(reps + 1):
        for case, step in steps.items():
            if case in errors:
                continue
            try:
                result = run_once(step, hidden, cuda)
            except (RuntimeError, ImportError) as err:  # out of memory, or trl not installed
                errors[case] = f"{type(err).__name__}: {str(err).splitlines()[0][:100]}"
                continue
            if round_:
                runs[case].append(result)
            print(f"  {shape} round {round_} {case}: {result}", file=sys.stderr, flush=True)
    out = {"fused_chunk": emo_chunk}
    for case in cases:
        if case in errors:
            out[case] = {"error": errors[case]}
            continue
        wall, cpu, peak = zip(*runs[case])
        out[case] = {"wall_s": statistics.median(wall), "cpu_s": statistics.median(cpu), "peak_mib": max(peak)}
        out[case]["cpu_runs_s"] = [round(x, 3) for x in cpu]
    return out


# ------------------------------------------------------------------------------------------------------ driver


def plan_cases(args, shape):
    """The cases of a shape that fit, and a note for each one skipped."""
    n, vocab, dim = shape
    nv_gib = n * vocab * 4 / 2**30
    cases, skipped = [], {}
    for case in args.cases:
        gib, free = NV_COPIES.get(case, 0.0) * nv_gib + vocab * dim * 8 / 2**30, available_gib(args.device)
        if gib > args.max_gib:
            skipped[case] = f"skipped: needs ~{gib:.1f} GiB > --max-gib {args.max_gib:g}"
        elif gib > free - 3:
            skipped[case] = f"skipped: needs ~{gib:.1f} GiB, {free:.1f} GiB available"
        else:
            cases.append(case)
    return cases, skipped


def run_worker(args, shape, cases, reps, memory):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if memory:  # every block above 64 KiB is its own mapping, unmapped on free: RSS follows the live tensors
        env.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    cmd = [sys.executable, __file__, "--worker", "--shapes", "x".join(map(str, shape)), "--cases", *cases]
    cmd += ["--reps", str(reps), "--dtype", args.dtype]
    cmd += [] if args.chunk_size is None else ["--chunk-size", str(args.chunk_size)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env)
    if proc.returncode != 0:
        return {case: {"error": f"worker exit {proc.returncode}"} for case in cases}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_shape(args, shape, cases):
    if args.device == "cuda":
        return worker(cases, shape, args.reps, args.dtype, "cuda", args.chunk_size)
    # Memory and time come from two fresh processes: the malloc settings that make RSS exact also make every chunk
    # buffer a fresh mapping with fresh page faults, which a long-running process does not pay.
    memory = run_worker(args, shape, cases, 1, memory=True)
    timing = run_worker(args, shape, cases, args.reps, memory=False)
    for case, res in timing.items():
        if isinstance(res, dict) and "peak_mib" in res:
            res["peak_mib"] = memory.get(case, {}).get("peak_mib", float("nan"))
    return timing


def print_table(rows, device):
    time_key = "wall_s" if device == "cuda" else "cpu_s"
    print(f"| N x V x d | case | {'time' if device == 'cuda' else 'CPU time'} (s) | / chunked_ce | wall (s) |", end="")
    print(" peak (MiB) | / chunked_ce | / fused_emo |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for shape, results in rows:
        label = "x".join(map(str, shape))
        ref, fused = results.get("chunked_ce", {}), results.get("fused_emo", {})
        for case in (c for c in CASES if c in results):
            res = results[case]
            if time_key not in res:
                print(f"| {label} | {case} | {res.get('skipped') or res.get('error')} | | | | | |")
                continue
            t_ratio = f"{res[time_key] / ref[time_key]:.2f}" if time_key in ref else ""
            m_ratio = f"{res['peak_mib'] / ref['peak_mib']:.2f}" if "peak_mib" in ref else ""
            f_ratio = f"{res['peak_mib'] / fused['peak_mib']:.1f}" if "peak_mib" in fused else ""
            print(
                f"| {label} | {case} | {res[time_key]:.2f} | {t_ratio} | {res['wall_s']:.2f} | {res['peak_mib']:.0f} "
                f"| {m_ratio} | {f_ratio} |"
            )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES), help="NxVxd, e.g. 4096x32000x1024")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument("--reps", type=int, default=3, help="measured rounds, after one warm-up round")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--max-gib", type=float, default=12.0, help="skip a case whose estimated peak is above this")
    parser.add_argument("--chunk-size", type=int, help="fused_emo's chunk_size (default: automatic)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes]
    if args.worker:
        print(json.dumps(worker(args.cases, shapes[0], args.reps, args.dtype, "cpu", args.chunk_size)))
        return 0

    print(f"machine: {machine_info(args.device)}")
    print(f"command: python {' '.join(sys.argv)}")
    print(
        f"{args.device}, {args.dtype}, 1 intra-op thread, median of {args.reps} interleaved rounds after a warm-up\n"
    )
    rows = []
    for shape in shapes:
        cases, skipped = plan_cases(args, shape)
        results = run_shape(args, shape, cases) if cases else {}
        print(f"  {shape}: fused_emo chunk = {results.pop('fused_chunk', '?')} tokens", flush=True)
        rows.append((shape, {**results, **{case: {"skipped": note} for case, note in skipped.items()}}))
    print()
    print_table(rows, args.device)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
