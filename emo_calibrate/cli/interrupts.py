"""How `emo-calibrate train` ends when it is interrupted: the resume command, the exit code, no traceback.

During training, `EMOTrainer` turns the first SIGTERM / Ctrl-C into a checkpoint at the end of the step (it raises
`TrainingInterrupted` once the checkpoint is saved). Everywhere else (loading, evaluation, the final save) and for a
second signal, `signals_interrupt` turns the signal into `Interrupted`. The command catches both and reports with
`report_stop`: what happened, the checkpoint, and the exact command line that resumes from it; it exits with
128 + the signal number (143 for SIGTERM, 130 for Ctrl-C), as a shell reports a process killed by that signal.
"""

import contextlib
import os
import shlex
import signal
import sys
import threading


__all__ = ["Interrupted", "report_stop", "resume_command", "signals_interrupt"]


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGINT where EMOTrainer's own handlers are not installed (loading, evaluation, the final save), or a
    second signal during training (EMOTrainer hands it on to stop at once)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def signals_interrupt():
    """Turn SIGTERM and SIGINT into `Interrupted` for the duration of the command (main thread only)."""

    def interrupt(signum, frame):
        raise Interrupted(signum)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {signum: signal.signal(signum, interrupt) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def resume_command(argv: list[str], checkpoint: str) -> str:
    """The command line that continues this run from `checkpoint`: `argv` without its own resume option, plus one."""
    kept, skip = [], False
    for arg in argv:
        if skip or arg.startswith("--resume_from_checkpoint="):
            skip = False
            continue
        if arg == "--resume_from_checkpoint":
            skip = True
            continue
        kept.append(arg)
    return shlex.join(["emo-calibrate", "train", *kept, "--resume_from_checkpoint", checkpoint])


def report_stop(
    prog: str, headline: str, checkpoint: str | None, argv: list[str], exit_code: int, synchronize: bool = True
) -> int:
    """Print (once, on the main process) how the run ended and the command that resumes it; returns `exit_code`.

    With `synchronize` (a stop every process took together) the processes wait for each other before exiting; an
    uncoordinated interruption exits at once, since the other processes may be inside another collective.
    """
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized()
    if int(os.environ.get("RANK", "0")) == 0:
        lines = ["", f"{prog}: {headline}"]
        if checkpoint is not None:
            lines += [f"Checkpoint: {checkpoint}", "Resume with:", "", f"    {resume_command(argv, checkpoint)}", ""]
            if distributed:
                lines.append("launched the same way as this run (the same `accelerate launch` / `torchrun` options).")
        else:
            lines.append("There is no checkpoint to resume from: start the run again.")
        print("\n".join(lines), file=sys.stderr, flush=True)
    if distributed and synchronize:  # no process exits (its launcher would kill the others) before the report
        dist.barrier()
        dist.destroy_process_group()
    return exit_code
