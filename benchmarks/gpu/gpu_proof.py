"""GPU proof: a 7B-class QLoRA calibration with EMOTrainer fits one GPU, and what EMO costs over TRL's SFTTrainer.

First, in seconds, the environment is checked (`proof_env.py`: versions, imports, torch's CUDA, bitsandbytes' CUDA
library); anything wrong stops the proof there with one line (exit 3), before any model is built. Then, for each model
shape (random weights, 4-bit NF4 base, bf16 compute) and batch size, in the order of `proof_plan.py` (the
largest-vocabulary model and the headline batch first), the same batches at sequence 1024 are trained for a few steps
with TRL's default `SFTTrainer` (MLE with its fused head) and with `EMOTrainer` (fused EMO head), LoRA r=16 on every
linear layer, gradient checkpointing on. Measured per run: memory (`proof_train.py`: the whole run's peak and the
peak above the resident weights), the median CUDA-synchronised step time after warm-up steps, tokens/s, whether it
fits 24 / 40 / 80 GB, and for EMO which head actually ran. Then, in time kept back for it, a QLoRA adapter is trained,
merged and checked for parity (`proof_merge.py`). Results go to `<out>/gpu_results.json` and `<out>/gpu_results.md`
after every run, so a timeout still leaves data; an out-of-memory or any other error is recorded for that run and the
proof goes on.

Exit code: 0 when every run that was made is "ok", "OOM" or stopped for time, at least one EMO/MLE pair was measured,
no EMO run fell back to the full-logits head and the merge check passed; 3 when the environment check failed; else 1.

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
    parser.add_argument(
        "--models", default="llama3-8b,llama2-7b",
        help="model shapes (proof_setup.SHAPES), most informative first: the default starts with the largest vocabulary",
    )  # fmt: skip
    parser.add_argument("--batch-sizes", default="8,1", help="per-device batch sizes, the headline one first")
    parser.add_argument("--trainers", default="mle,emo", help="'mle' = TRL SFTTrainer, 'emo' = EMOTrainer")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (allocator, kernels, caches)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps; the median is reported")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--merge-model", default="llama3.2-1b", help="shape for the merge check; 'none' skips it")
    parser.add_argument("--merge-steps", type=int, default=3)
    parser.add_argument("--merge-seq-len", type=int, default=256)
    parser.add_argument("--time-budget", type=float, default=300.0, help="seconds the whole proof may take")
    parser.add_argument(
        "--merge-reserve", type=float, default=120.0,
        help="seconds of the budget kept for the merge check: no model build or training run starts in them",
    )  # fmt: skip
    parser.add_argument("--work-dir", default=None, help="scratch folder (default: a new temporary folder)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda (cpu for --dry-run)")
    parser.add_argument("--layers", type=int, default=None, help="override the number of decoder layers (checks)")
    parser.add_argument("--emo-chunk-size", type=int, default=None, help="EMOConfig.emo_chunk_size (default: auto)")
    parser.add_argument("--no-quantize", action="store_true", help="unquantised base instead of 4-bit (not QLoRA)")
    parser.add_argument(
        "--ignore-versions", action="store_true",
        help="go on when installed versions do not meet the requirements (printed as warnings)",
    )  # fmt: skip
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


def proof_device(args) -> str:
    return args.device or ("cpu" if args.dry_run else "cuda")


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


def _build(shape, args, device, dtype, quantize, results):
    """The model of `shape`, or None (the error recorded in `results["models"]`)."""
    import torch
    from proof_setup import build_random_model

    log(f"{shape}: building the random model ({results['base']})")
    try:
        model, seconds = build_random_model(shape, device=device, dtype=dtype, quantize=quantize, layers=args.layers)
    except Exception as error:  # noqa: BLE001
        log(traceback.format_exc())
        results["models"][shape] = {"status": f"build error: {type(error).__name__}: {error}"}
        return None
    # The model's own count: summing numel() would count two 4-bit weights per stored byte as one parameter.
    info = {"build_s": seconds, "parameters": model.num_parameters()}
    if device == "cuda":
        info["weights_gib"] = torch.cuda.memory_allocated() / 2**30
    results["models"][shape] = info
    log(f"{shape}: built in {seconds:.1f}s, {info}")
    return model


def verdict(results: dict) -> tuple[bool, str]:
    """Whether the proof passed, and why not (see the module docstring's exit code)."""
    problems = [
        f"{r['model']} b{r['batch_size']} {r['trainer']}: {r['status']}"
        for r in results["runs"]
        if r["status"].startswith(("error", "bad", "build", "skipped:"))
    ]
    if not results.get("comparisons"):
        problems.append("no EMO/MLE pair was measured")
    merge = results.get("merge")
    if merge is not None and merge["status"] != "ok":
        problems.append(f"merge check: {merge['status']}")
    return not problems, "passed" if not problems else "FAILED: " + "; ".join(problems)


def main(argv=None) -> int:
    args = parse_args(argv)
    from proof_env import ENV_ERROR_EXIT, environment_gate

    device = proof_device(args)
    os.makedirs(args.out, exist_ok=True)
    if not environment_gate(args, device, report_path=os.path.join(args.out, "env.txt")):
        return ENV_ERROR_EXIT

    import torch
    from proof_checks import bitsandbytes_problem, nf4_cpu_vs_cuda
    from proof_merge import merge_check
    from proof_plan import Schedule, plan_runs
    from proof_report import write_results
    from proof_setup import build_tokenizer, free_memory, random_token_dataset
    from proof_train import run_one

    from emo_calibrate.losses.fused import MIN_CHUNK_BYTES, MIN_CHUNK_BYTES_ACCELERATOR

    torch.set_num_threads(1 if device == "cpu" else min(8, os.cpu_count() or 1))
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    args.work_dir = args.work_dir or tempfile.mkdtemp(prefix="emo-gpu-proof-")
    # On CUDA a broken 4-bit path stops the proof in the check above; on CPU (the dry run) it is optional.
    problem = None if args.no_quantize or device == "cuda" else bitsandbytes_problem(device)
    quantize = not args.no_quantize and problem is None
    if problem:
        log(f"bitsandbytes 4-bit does not work here ({problem}): measuring on an unquantised base instead")
    schedule = Schedule(args.time_budget, args.merge_reserve if args.merge_model != "none" else 0.0, start=_START)
    results = {
        **environment(device),
        "base": "4-bit NF4, double quantisation" if quantize else f"unquantised ({problem or '--no-quantize'})",
        "settings": {**{k: v for k, v in vars(args).items() if k != "work_dir"}, "dtype": str(dtype)[6:]},
        "emo_workspace_floor_gib": MIN_CHUNK_BYTES.get(device, MIN_CHUNK_BYTES_ACCELERATOR) / 2**30,
        "models": {},
        "runs": [],
    }
    log(f"{results['device']}; {results['versions']}; out={args.out}")
    if device == "cuda" and quantize:
        results["nf4_cpu_vs_cuda"] = nf4_cpu_vs_cuda()
        log(f"NF4 codes, CPU vs CUDA: {results['nf4_cpu_vs_cuda']}")
    write_results(results, args.out)
    tokenizer = build_tokenizer()

    plan = plan_runs(args.models, args.batch_sizes, args.trainers)
    model = shape = None
    for planned in plan:
        if planned["model"] != shape:  # a new model: the previous one is freed first
            model, shape = None, planned["model"]
            free_memory()
            if schedule.may_start():
                model = _build(shape, args, device, dtype, quantize, results)
                write_results(results, args.out)
        key = (planned["model"], planned["batch_size"])
        if model is None:
            built = shape not in results["models"]
            record = {**planned, "status": "skipped (time)" if built else "build failed"}
        elif not schedule.may_start(key):
            record = {**planned, "status": "skipped (time)"}
        else:
            left = schedule.left()
            log(f"{shape} batch {planned['batch_size']}: {planned['trainer']} ({left:.0f}s before the reserve)")
            dataset = random_token_dataset(
                planned["batch_size"] * (args.warmup + args.steps), args.seq_len, model.config.vocab_size
            )
            t = time.perf_counter()
            record = run_one(planned["trainer"], model, tokenizer, dataset, planned["batch_size"], args, device, dtype,
                             log, stop_now=schedule.reached)  # fmt: skip
            schedule.record(key, time.perf_counter() - t)
            record = {**planned, **record, "seconds": time.perf_counter() - t}
            log(f"{shape} b{planned['batch_size']} {planned['trainer']}: {record['status']}, median step "
                f"{record.get('median_step_s')}, peak {record.get('peak_allocated_gib')} GiB")  # fmt: skip
        results["runs"].append(record)
        write_results(results, args.out)
    del model
    free_memory()

    if args.merge_model != "none":
        log(f"merge check on {args.merge_model} ({args.time_budget - schedule.elapsed():.0f}s of the budget left)")
        work = os.path.join(args.work_dir, "merge")
        results["merge"] = {"model": args.merge_model, "status": "running"}

        def save(partial):
            results["merge"] = partial
            write_results(results, args.out)

        results["merge"] = merge_check(
            args.merge_model, device=device, dtype=dtype, work_dir=work, args=args, log=log, save=save
        )
        log(f"merge check: {results['merge']['status']}")
    write_results(results, args.out)
    passed, results["verdict"] = verdict(results)
    write_results(results, args.out)
    log(f"done in {time.perf_counter() - _START:.0f}s; {results['verdict']}; results in {args.out}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
