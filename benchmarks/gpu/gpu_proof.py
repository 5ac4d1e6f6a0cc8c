"""GPU proof: a 7B-class QLoRA calibration with EMOTrainer fits one GPU, and what EMO costs over TRL's SFTTrainer.

For each model shape (random weights, 4-bit NF4 base, bf16 compute) and batch size, the same batches at sequence
1024 are trained for a few steps with TRL's default `SFTTrainer` (MLE with its fused head) and with `EMOTrainer`
(fused EMO head), LoRA r=16 on every linear layer, gradient checkpointing on. Measured per run: peak GPU memory
(`torch.cuda.max_memory_allocated` / `max_memory_reserved`, reset between runs), the median CUDA-synchronised step
time after warm-up steps, tokens/s, and whether the run fits 24 / 40 / 80 GB. Then a QLoRA adapter is trained, merged
and checked for parity. Results go to `<out>/gpu_results.json` and `<out>/gpu_results.md` after every run, so a
timeout still leaves data; an out-of-memory or any other error is recorded for that run and the proof goes on.

    python benchmarks/gpu/gpu_proof.py --out "$OUT"             # on a GPU (see run_gpu_proof.sh)
    python benchmarks/gpu/gpu_proof.py --dry-run --out /tmp/x   # tiny model on CPU, seconds (CI)
"""

import argparse
import os
import platform
import sys
import tempfile
import time
import traceback


for _key, _value in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "WANDB_DISABLED": "true",
}.items():
    os.environ.setdefault(_key, _value)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

_START = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} +{time.perf_counter() - _START:6.1f}s] {message}", flush=True)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="tiny model, 2 steps, on CPU: checks the script only")
    parser.add_argument("--out", default=os.environ.get("OUT", "outputs/gpu_proof"), help="results folder")
    parser.add_argument("--models", default="llama2-7b,llama3-8b", help="model shapes (proof_setup.SHAPES)")
    parser.add_argument("--batch-sizes", default="1,8", help="per-device batch sizes, each run with both trainers")
    parser.add_argument("--trainers", default="mle,emo", help="'mle' = TRL SFTTrainer, 'emo' = EMOTrainer")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (allocator, kernels, caches)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps; the median is reported")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--merge-model", default="llama3.2-1b", help="shape for the merge check; 'none' skips it")
    parser.add_argument("--merge-steps", type=int, default=3)
    parser.add_argument("--merge-seq-len", type=int, default=256)
    parser.add_argument(
        "--time-budget", type=float, default=250.0,
        help="seconds after which no new training run starts (the rest is recorded as skipped; the merge check "
        "still runs)",
    )  # fmt: skip
    parser.add_argument("--work-dir", default=None, help="scratch folder (default: a new temporary folder)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda (cpu for --dry-run)")
    parser.add_argument("--layers", type=int, default=None, help="override the number of decoder layers (checks)")
    parser.add_argument("--emo-chunk-size", type=int, default=None, help="EMOConfig.emo_chunk_size (default: auto)")
    parser.add_argument("--no-quantize", action="store_true", help="unquantised base instead of 4-bit (not QLoRA)")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.models, args.batch_sizes, args.seq_len = "tiny", "2", 64
        args.warmup, args.steps, args.lora_r = 1, 2, 4
        args.merge_model, args.merge_steps, args.merge_seq_len = "tiny-tied", 2, 32
    args.models = [m for m in args.models.split(",") if m]
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b]
    args.trainers = [t for t in args.trainers.split(",") if t]
    if set(args.trainers) - {"mle", "emo"}:
        parser.error(f"--trainers takes 'mle' and/or 'emo', got {args.trainers}")
    return args


def environment(device) -> dict:
    import importlib.metadata as metadata

    import torch

    versions = {}
    for name in ("torch", "transformers", "trl", "peft", "bitsandbytes", "accelerate", "datasets", "emo_calibrate"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    name = (
        torch.cuda.get_device_name(0) if device == "cuda" else f"CPU ({platform.machine()}; a check, not a GPU result)"
    )
    total = torch.cuda.get_device_properties(0).total_memory / 2**30 if device == "cuda" else None
    return {"device": name, "device_memory_gib": total, "versions": versions, "python": platform.python_version()}


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    from proof_checks import bitsandbytes_problem, nf4_cpu_vs_cuda
    from proof_merge import merge_check
    from proof_report import write_results
    from proof_setup import build_random_model, build_tokenizer, free_memory, random_token_dataset
    from proof_train import run_one

    device = args.device or ("cpu" if args.dry_run else "cuda")
    torch.set_num_threads(1 if device == "cpu" else min(8, os.cpu_count() or 1))
    if device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device; use --dry-run for the CPU check", file=sys.stderr)
        return 2
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    args.work_dir = args.work_dir or tempfile.mkdtemp(prefix="emo-gpu-proof-")
    # Without working 4-bit kernels the EMO/MLE comparison is still worth having, on an unquantised base (recorded).
    problem = None if args.no_quantize else bitsandbytes_problem(device)
    quantize = not args.no_quantize and problem is None
    if problem:
        log(f"bitsandbytes 4-bit does not work here ({problem}): measuring on an unquantised base instead")
    results = {
        **environment(device),
        "base": "4-bit NF4, double quantisation" if quantize else f"unquantised ({problem or '--no-quantize'})",
        "settings": {**{k: v for k, v in vars(args).items() if k != "work_dir"}, "dtype": str(dtype)[6:]},
        "models": {},
        "runs": [],
    }
    log(f"{results['device']}; {results['versions']}; out={args.out}")
    if device == "cuda" and quantize:
        results["nf4_cpu_vs_cuda"] = nf4_cpu_vs_cuda()
        log(f"NF4 codes, CPU vs CUDA: {results['nf4_cpu_vs_cuda']}")
    write_results(results, args.out)
    tokenizer = build_tokenizer()

    for shape in args.models:
        pending = [(b, k) for b in args.batch_sizes for k in args.trainers]
        if time.perf_counter() - _START > args.time_budget:
            for b, k in pending:
                results["runs"].append({"model": shape, "batch_size": b, "trainer": k, "status": "skipped (time)"})
            continue
        log(f"{shape}: building the random model ({results['base']})")
        try:
            model, seconds = build_random_model(
                shape, device=device, dtype=dtype, quantize=quantize, layers=args.layers
            )
        except Exception as error:  # noqa: BLE001
            log(traceback.format_exc())
            results["models"][shape] = {"status": f"build error: {type(error).__name__}: {error}"}
            for b, k in pending:
                results["runs"].append({"model": shape, "batch_size": b, "trainer": k, "status": "build failed"})
            write_results(results, args.out)
            continue
        info = {"build_s": seconds, "parameters": sum(p.numel() for p in model.parameters())}
        if device == "cuda":
            info["weights_gib"] = torch.cuda.memory_allocated() / 2**30
        results["models"][shape] = info
        log(f"{shape}: built in {seconds:.1f}s, {info}")
        for batch_size in args.batch_sizes:
            dataset = random_token_dataset(batch_size * (args.warmup + args.steps), args.seq_len, model.vocab_size)
            for kind in args.trainers:
                if time.perf_counter() - _START > args.time_budget:
                    record = {"trainer": kind, "batch_size": batch_size, "status": "skipped (time)"}
                else:
                    log(f"{shape} batch {batch_size}: {kind}")
                    record = run_one(kind, model, tokenizer, dataset, batch_size, args, device, dtype, log)
                record = {"model": shape, **record}
                results["runs"].append(record)
                write_results(results, args.out)
                log(
                    f"{shape} b{batch_size} {kind}: {record['status']}, median step "
                    f"{record.get('median_step_s')}, peak {record.get('peak_allocated_gib')} GiB"
                )
        del model
        free_memory()

    if args.merge_model != "none":
        log(f"merge check on {args.merge_model}")
        work = os.path.join(args.work_dir, "merge")
        results["merge"] = merge_check(args.merge_model, device=device, dtype=dtype, work_dir=work, args=args, log=log)
        log(f"merge check: {results['merge']['status']}")
    write_results(results, args.out)
    log(f"done in {time.perf_counter() - _START:.0f}s; results in {args.out}")
    # An out-of-memory run is a result (it does not fit); errors and non-finite losses are failures.
    failed = [r for r in results["runs"] if r["status"].startswith(("error", "bad", "build"))]
    merge_ok = results.get("merge", {"status": "ok"})["status"] == "ok"
    return 0 if not failed and merge_ok else 1


if __name__ == "__main__":
    sys.exit(main())
