"""A load test's per-request records and their summary: counts, throughput, latency percentiles.

All figures come from client-side timestamps. Percentiles interpolate linearly between the closest
ranks (numpy's default, as vLLM's benchmark_serving does). Latencies are reported in milliseconds.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np

OK = "OK"


@dataclass
class RequestRecord:
    """One request as the client saw it. Times are seconds since the run began.

    ``code`` is ``OK`` or the gRPC status name it failed with. ``ttft_s`` is None when no token came;
    ``itl_s`` holds one gap per token after the first message (a message carrying n tokens counts
    its gap divided by n, n times); tokens that come with the first one add no gap.
    """

    start_s: float
    end_s: float
    code: str = OK
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.code == OK

    def add_tokens(self, n: int, since_start_s: float, since_last_s: float | None) -> None:
        """Count a message of ``n`` tokens arriving ``since_start_s`` after the request was sent
        (``since_last_s`` after the previous message, None for the first)."""
        if n == 0:
            return
        if since_last_s is None:
            self.ttft_s = since_start_s
        else:
            self.itl_s.extend([since_last_s / n] * n)
        self.output_tokens += n

    @property
    def latency_s(self) -> float:
        return self.end_s - self.start_s


def latency_stats(values_s: Iterable[float]) -> dict[str, float | None]:
    """mean / p50 / p99 in milliseconds; None for each when there are no values."""
    v = np.asarray(list(values_s), dtype=float) * 1000.0
    if v.size == 0:
        return {"mean": None, "p50": None, "p99": None}
    return {"mean": float(v.mean()), "p50": float(np.percentile(v, 50)), "p99": float(np.percentile(v, 99))}


def summarize(records: Sequence[RequestRecord]) -> dict[str, Any]:
    """The report of a run: pure function of its records (JSON-able; latencies in ms).

    ``duration_s`` spans the first send to the last answer; throughputs count completed requests
    and the output tokens of completed requests over it.
    """
    done = [r for r in records if r.ok]
    failed = Counter(r.code for r in records if not r.ok)
    duration = (max(r.end_s for r in records) - min(r.start_s for r in records)) if records else 0.0
    out_tokens = sum(r.output_tokens for r in done)
    per_s = (lambda n: n / duration) if duration > 0 else (lambda n: 0.0)
    return {
        "requests": len(records),
        "completed": len(done),
        "failed": sum(failed.values()),
        "failed_by_code": dict(sorted(failed.items())),
        "duration_s": duration,
        "request_throughput": per_s(len(done)),
        "output_tokens": out_tokens,
        "output_throughput": per_s(out_tokens),
        "prompt_tokens": sum(r.prompt_tokens for r in done),
        "cached_prompt_tokens": sum(r.cached_prompt_tokens for r in done),
        "ttft_ms": latency_stats(r.ttft_s for r in done if r.ttft_s is not None),
        "itl_ms": latency_stats(x for r in done for x in r.itl_s),
        "e2e_ms": latency_stats(r.latency_s for r in done),
    }


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def format_report(summary: dict[str, Any], title: str = "load test") -> str:
    """The summary as a short human-readable block of lines."""
    s = summary
    failed = ", ".join(f"{code} {n}" for code, n in s["failed_by_code"].items()) or "none"
    lines = [
        f"== {title} ==",
        f"requests: {s['requests']}  completed: {s['completed']}  failed: {s['failed']} ({failed})",
        f"duration: {s['duration_s']:.2f} s  throughput: {s['request_throughput']:.2f} req/s, "
        f"{s['output_throughput']:.1f} output tok/s ({s['output_tokens']} tokens)",
        f"prompt tokens: {s['prompt_tokens']} ({s['cached_prompt_tokens']} from the prefix cache)",
        f"{'latency (ms)':<14}{'mean':>10}{'p50':>10}{'p99':>10}",
    ]
    for label, key in (("TTFT", "ttft_ms"), ("ITL", "itl_ms"), ("end-to-end", "e2e_ms")):
        st = s[key]
        lines.append(f"{label:<14}{_ms(st['mean']):>10}{_ms(st['p50']):>10}{_ms(st['p99']):>10}")
    return "\n".join(lines)
