"""An open-loop load generator: Poisson arrivals over gRPC streaming, one record per request.

Open loop means each request is sent at its scheduled time whether or not earlier ones have
finished, so a slow server sees its queue grow as it would in production (a closed loop would
slow down with it and hide the queueing). Gaps between sends are exponential with mean 1/rate.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from dataclasses import dataclass
from typing import Iterator

from kubeinfer.bench.report import RequestRecord
from kubeinfer.bench.workloads import WorkItem, Workload
from kubeinfer.client import AsyncClient, ServerError


@dataclass
class LoadSpec:
    """How hard and how long to push: ``rate`` requests/s (``math.inf``: all at once), stopping
    after ``num_requests`` sends or ``duration_s`` seconds of sending, whichever comes first (at
    least one must be set). Every request asks for ``max_tokens`` with the given temperature;
    ``ignore_eos`` makes every completion exactly ``max_tokens`` long."""

    rate: float
    num_requests: int | None = None
    duration_s: float | None = None
    max_tokens: int = 64
    temperature: float = 0.0
    ignore_eos: bool = False
    model: str = ""
    seed: int = 0
    timeout_s: float | None = None

    def __post_init__(self) -> None:
        if not self.rate > 0:
            raise ValueError(f"rate must be > 0 requests/s, got {self.rate}")
        if self.num_requests is None and self.duration_s is None:
            raise ValueError("give a number of requests, a duration, or both")
        if self.num_requests is not None and self.num_requests < 1:
            raise ValueError(f"num_requests must be >= 1, got {self.num_requests}")
        if self.duration_s is not None and self.duration_s <= 0:
            raise ValueError(f"duration must be > 0 s, got {self.duration_s}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")


def arrival_times(rate: float, seed: int = 0) -> Iterator[float]:
    """Send times in seconds from the start: 0, then exponential gaps of mean 1/rate."""
    rng = random.Random(seed)
    t = 0.0
    while True:
        yield t
        if not math.isinf(rate):
            t += rng.expovariate(rate)


async def send_one(client: AsyncClient, item: WorkItem, spec: LoadSpec, t0: float) -> RequestRecord:
    """Stream one request and time it; a failure becomes a record with its status code."""
    start = time.perf_counter()
    record = RequestRecord(start_s=start - t0, end_s=start - t0)
    last = None
    try:
        async for delta in client.stream(item.prompt, model=spec.model, max_tokens=spec.max_tokens,
                                         temperature=spec.temperature, ignore_eos=spec.ignore_eos,
                                         timeout=spec.timeout_s):
            now = time.perf_counter()
            n = len(delta.token_ids)
            if n:
                record.add_tokens(n, now - start, None if last is None else now - last)
                last = now
            if delta.usage is not None:
                record.prompt_tokens = delta.usage.prompt_tokens
                record.cached_prompt_tokens = delta.usage.cached_prompt_tokens
    except ServerError as e:
        record.code, record.error = e.code.name, e.message
    except Exception as e:  # a client-side bug must not end the whole run
        record.code, record.error = "CLIENT_ERROR", f"{type(e).__name__}: {e}"
    record.end_s = time.perf_counter() - t0
    return record


async def run_load(client: AsyncClient, workload: Workload, spec: LoadSpec) -> list[RequestRecord]:
    """Send requests on the Poisson schedule; wait for all of them; records in send order."""
    loop = asyncio.get_running_loop()
    t0 = time.perf_counter()
    start = loop.time()
    tasks: list[asyncio.Task[RequestRecord]] = []
    for at in arrival_times(spec.rate, spec.seed):
        if spec.num_requests is not None and len(tasks) >= spec.num_requests:
            break
        if spec.duration_s is not None and at >= spec.duration_s:
            break
        delay = start + at - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(send_one(client, workload.next(), spec, t0)))
    return list(await asyncio.gather(*tasks))


async def run_load_at(address: str, workload: Workload, spec: LoadSpec) -> list[RequestRecord]:
    """:func:`run_load` over a client of its own to ``address``."""
    async with AsyncClient(address) as client:
        return await run_load(client, workload, spec)
