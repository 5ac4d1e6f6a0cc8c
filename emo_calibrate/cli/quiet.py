"""Keep what `emo-calibrate train` prints to what a user needs to read.

- `quiet_progress_class()` (`QuietProgressCallback`): the Trainer's progress bar, with the latest logged `loss` /
  `mle` / `emo` as its postfix instead of one printed dict per logging step, and one short line per evaluation
  (`evaluation_line`). Every logged value is still in `trainer_state.json` and the trackers; `--disable_tqdm true`
  prints each log as a line, as the Trainer does without a bar.
- `benign_library_noise_silenced`: drops, for the duration of the trainer's set-up, exactly the library messages that
  are known to be benign on this path (each one is explained where it is filtered).
- `drop_bitsandbytes_cpu_kernel_notice`: bitsandbytes' import-time notice about an optional CPU kernel package.
"""

import functools
import logging
import warnings
from contextlib import contextmanager


__all__ = [
    "benign_library_noise_silenced",
    "drop_bitsandbytes_cpu_kernel_notice",
    "evaluation_line",
    "quiet_progress_class",
    "use_quiet_progress",
]

_POSTFIX_KEYS = ("loss", "mle", "emo")


class _DropMessages(logging.Filter):
    """Drops the records of one logger whose message starts with `prefix`."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


@functools.cache
def quiet_progress_class():
    """The class `QuietProgressCallback`, a `ProgressCallback`."""
    # Built on first use: importing transformers' callbacks imports bitsandbytes, which must come after
    # `drop_bitsandbytes_cpu_kernel_notice`.
    from transformers.trainer_callback import ProgressCallback

    class QuietProgressCallback(ProgressCallback):
        """`ProgressCallback` that shows training logs as the bar's postfix and prints only evaluation results."""

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            super().on_evaluate(args, state, control, metrics=metrics, **kwargs)
            # After the perplexity budget's own `on_evaluate` (it is registered first), so its ratio is there.
            if state.is_world_process_zero and self.training_bar is not None and metrics:
                self.training_bar.write(f"step {state.global_step}: {evaluation_line(metrics)}")

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or self.training_bar is None or not logs:
                return
            if any(key.startswith("eval_") for key in logs):  # printed by on_evaluate, in one short line
                return
            postfix = {k: f"{logs[k]:.4g}" for k in _POSTFIX_KEYS if isinstance(logs.get(k), (int, float))}
            if postfix:
                self.training_bar.set_postfix(postfix, refresh=True)

    return QuietProgressCallback


def evaluation_line(metrics: dict) -> str:
    """One short line for an evaluation during training: held-out perplexity (and its ratio to the start, when the
    perplexity budget measured it), then EMO and next-token entropy. Every metric is in `trainer_state.json`.

    `metrics` are one `on_evaluate` call's: prefixed `eval_`, or `eval_<name>_` for one of several eval datasets,
    whose name then leads the line."""
    from emo_calibrate.training.perplexity_budget import perplexity  # not at import: see quiet_progress_class

    loss_key = next((key for key in metrics if key.startswith("eval") and key.endswith("_loss")), "eval_loss")
    prefix = loss_key[: -len("_loss")]
    nll = metrics.get(f"{prefix}_mle", metrics.get(loss_key))
    ppl = metrics.get("eval_ppl", perplexity(nll) if isinstance(nll, (int, float)) else None)
    parts = []
    if ppl is not None:
        ratio = metrics.get("eval_ppl_ratio")
        parts.append(f"held-out perplexity {ppl:.2f}" + (f" ({ratio:.3f}x the start)" if ratio is not None else ""))
    parts += [
        f"{name} {metrics[key]:.3f}"
        for key, name in ((f"{prefix}_emo", "emo"), (f"{prefix}_entropy", "entropy"))
        if isinstance(metrics.get(key), (int, float))
    ]
    line = ", ".join(parts) or "evaluated"
    return line if prefix == "eval" else f"{prefix[len('eval_') :]}: {line}"


def use_quiet_progress(trainer) -> None:
    """Swap the trainer's `ProgressCallback` (present unless `disable_tqdm`) for `QuietProgressCallback`."""
    from transformers.trainer_callback import ProgressCallback

    if any(isinstance(cb, ProgressCallback) for cb in trainer.callback_handler.callbacks):
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(quiet_progress_class()())


@contextmanager
def benign_library_noise_silenced():
    """Silence, inside the block only, two library messages that say nothing true about an `EMOTrainer` set-up."""
    # TRL tokenizes each text whole and only then cuts it to `max_length` (or packs it into `max_length` blocks), so the
    # tokenizer's "longer than the maximum sequence length" check sees whole documents that never reach the model as
    # one sequence. (A `max_length` above the model's limit is reported by the caller instead.)
    tokenizer_filter = _DropMessages("Token indices sequence length is longer than the specified maximum")
    tokenizer_logger = logging.getLogger("transformers.tokenization_utils_base")
    tokenizer_logger.addFilter(tokenizer_filter)
    try:
        with warnings.catch_warnings():
            # PEFT 0.21's `PeftModel.__init__` reads `model.is_gradient_checkpointing`, which transformers 5.24
            # deprecated (in favour of `is_activation_checkpointing`); the warning is about PEFT's code, not the run.
            warnings.filterwarnings(
                "ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning
            )
            yield
    finally:
        tokenizer_logger.removeFilter(tokenizer_filter)


def drop_bitsandbytes_cpu_kernel_notice() -> None:
    """Call before bitsandbytes is imported: its CPU backend logs, at import, that the optional `kernels` package
    (faster 4-bit CPU kernels) is missing. It then uses its own CPU path, which is what every CPU run without 4-bit
    weights needs anyway; CPU 4-bit users can `pip install kernels`."""
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    if not any(isinstance(f, _DropMessages) for f in logger.filters):
        logger.addFilter(_DropMessages("Failed to load CPU gemm_4bit_forward from kernels-community"))
