"""The GPU proof's order of runs and its clock: the most informative runs first, the merge check's time kept back.

Order: models as given (the default puts the largest vocabulary first), then batch sizes as given (the headline batch
first), then the two trainers of each (model, batch) pair back to back, their order alternating from one pair to the
next so that neither trainer always runs on the allocator state the other left.

Time: the proof has `time_budget` seconds in all, of which `merge_reserve` are kept for the merge check. A model is
built and a training run started only while the reserve is untouched, and a run starts only if the time left before
the reserve is at least what its partner run (the other trainer, same model and batch) took, when that one already
ran. A run that reaches the reserve anyway is stopped at the end of its current step.
"""

import time


__all__ = ["Schedule", "plan_runs"]


def plan_runs(models, batch_sizes, trainers) -> list[dict]:
    """The runs in the order they are made: one dict per run (`model`, `batch_size`, `trainer`, `pair`, `order`).

    `pair` numbers the (model, batch) pairs from 0; `order` is the run's place within its pair (1 or 2).
    """
    runs, pair = [], 0
    for model in models:
        for batch_size in batch_sizes:
            ordered = list(trainers) if pair % 2 == 0 else list(reversed(trainers))
            for order, trainer in enumerate(ordered, start=1):
                runs.append({"model": model, "batch_size": batch_size, "trainer": trainer, "pair": pair,
                             "order": order})  # fmt: skip
            pair += 1
    return runs


class Schedule:
    """The proof's clock: seconds since `start`, and whether a step may still begin before the merge's reserve.

    Args:
        time_budget (`float`): seconds the whole proof may take.
        merge_reserve (`float`): seconds of it kept for the merge check (0 when there is none).
        clock (`Callable[[], float]`, *optional*): a monotonic clock in seconds (tests pass a fake one).
        start (`float`, *optional*): the clock's value when the proof started (default: now).
    """

    def __init__(self, time_budget: float, merge_reserve: float, clock=time.perf_counter, start: float | None = None):
        self.clock = clock
        self.start = clock() if start is None else start
        self.deadline = time_budget - merge_reserve
        self.durations = {}

    def elapsed(self) -> float:
        return self.clock() - self.start

    def left(self) -> float:
        """Seconds before the merge's reserve begins."""
        return self.deadline - self.elapsed()

    def may_start(self, key=None) -> bool:
        """Whether a run (or, with no key, a model build) may start now: the reserve is untouched and, for a key whose
        partner already ran, the time left covers that partner's duration."""
        return self.left() > 0 and self.left() >= self.durations.get(key, 0.0)

    def reached(self) -> bool:
        """True once the reserve has begun (a running training run stops at the end of its step)."""
        return self.left() <= 0

    def record(self, key, seconds: float) -> None:
        self.durations[key] = max(seconds, self.durations.get(key, 0.0))
