"""What the sections share: the run's settings and deadline, timers, and the summary table."""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch


class OutOfTime(Exception):
    """The run's time budget is spent: the section stops where it is and the next ones are skipped."""


@dataclass
class Ctx:
    device: str                      # "cuda" (the benchmark) or "cpu" (--smoke)
    smoke: bool
    deadline: float                  # time.monotonic() at which the run stops starting new work
    tmp: str                         # scratch folder for the saved models
    dtype: torch.dtype = torch.bfloat16
    results: dict = field(default_factory=dict)   # figures one section leaves for another
    summary: list = field(default_factory=list)   # (what, value, target, verdict)

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def check_time(self, need: float = 0.0) -> None:
        if self.remaining() < need:
            raise OutOfTime(f"{self.remaining():.0f} s of the budget left, this needs ~{need:.0f} s")

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    def row(self, what: str, value: float | None, unit: str, target: str = "", ok: bool | None = None) -> None:
        """One summary line; ``ok`` None means the figure has no target (printed, never judged)."""
        if value is None:
            shown = "n/a"
        elif unit == "x":
            shown = f"{value:.2f}x"
        else:
            shown = f"{value:,.1f} {unit}".rstrip() if unit else f"{value:g}"
        # --smoke figures are CPU timings of tiny shapes: judging them against GPU targets means nothing.
        verdict = "" if ok is None else "(smoke)" if self.smoke else ("PASS" if ok else "MISS")
        self.summary.append((what, shown, target, verdict))


def cuda_time_ms(fn: Callable[[], object], reps: int = 50) -> float:
    """Median milliseconds of ``fn`` on the GPU: triton's do_bench (it flushes L2 between runs) when
    triton imports, else CUDA events around each call."""
    try:
        from triton.testing import do_bench
        return float(do_bench(fn, warmup=10, rep=max(20, reps), return_mode="median"))
    except ImportError:
        return cuda_event_median_ms(fn, reps)


def cuda_event_median_ms(fn: Callable[[], object], reps: int) -> float:
    """Median milliseconds of ``fn`` over ``reps`` runs, timed with CUDA events after a warm-up."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def cpu_time_ms(fn: Callable[[], object], reps: int = 3) -> float:
    """Median wall milliseconds (the --smoke path: checks the code, the figure means nothing)."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def time_ms(ctx: Ctx, fn: Callable[[], object], reps: int = 50) -> float:
    return cuda_time_ms(fn, reps) if ctx.cuda else cpu_time_ms(fn)


def print_summary(ctx: Ctx, header: str) -> None:
    print(f"\n== summary: {header}")
    if not ctx.summary:
        print("(no figures)")
        return
    w0 = max(len(r[0]) for r in ctx.summary)
    w1 = max(len(r[1]) for r in ctx.summary)
    w2 = max(len(r[2]) for r in ctx.summary)
    for what, value, target, verdict in ctx.summary:
        print(f"{what:<{w0}}  {value:>{w1}}  {target:<{w2}}  {verdict}".rstrip())
