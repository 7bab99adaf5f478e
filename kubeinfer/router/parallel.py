"""Parallel sampling (``n``): one request's choices as n engine jobs over the same prompt tokens (and
a completions request's prompts, n jobs each).

The first choice runs alone until its first chunk, so its prompt's full KV blocks are computed and
registered in the replica's prefix cache; the others are sent then and reference those blocks
instead of recomputing them (with the one replica of a prefix-affinity or single-replica pool; on
another replica each choice computes its own prompt). Each choice is admitted like a request
(:meth:`Router.admit`, all n at once or none), and closing the stream aborts every choice's job.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import AsyncIterator

from kubeinfer.router.router import SEED_RANGE, Router
from kubeinfer.router.settings import RouterSettings
from kubeinfer.router.types import Chunk, Code, GenerateJob, RouterError

_SEED_SPAN = SEED_RANGE[1] - SEED_RANGE[0]
_DONE = object()


def check_n(n: int, settings: RouterSettings) -> int:
    """``n`` itself, if within the router's bound (``max_n``); INVALID_ARGUMENT otherwise."""
    if not 1 <= n <= settings.max_n:
        raise RouterError(Code.INVALID_ARGUMENT, f"n must be in [1, {settings.max_n}] (the router's max_n), got {n}")
    return n


def choice_seed(seed: int, index: int) -> int:
    """Choice ``index``'s seed for a request seeded ``seed``: seed + index, wrapped into 64 signed bits."""
    return (seed + index - SEED_RANGE[0]) % _SEED_SPAN + SEED_RANGE[0]


def expand(job: GenerateJob, n: int) -> list[GenerateJob]:
    """The n jobs of a prepared request: the same prompt ids, request ids ``<id>-<i>`` (the job
    itself when n is 1), seeds seed + i when seeded (else each job draws its own), and prompt
    logprobs asked of the first job only (every choice shares its prompt)."""
    if n == 1:
        return [job]
    seed = job.sampling.get("seed")
    jobs = []
    for i in range(n):
        sampling = dict(job.sampling)
        if seed is not None:
            sampling["seed"] = choice_seed(seed, i)
        if i and "prompt_logprobs" in sampling:
            del sampling["prompt_logprobs"]
        jobs.append(dataclasses.replace(job, request_id=f"{job.request_id}-{i}", sampling=sampling))
    return jobs


async def stream_choices(router: Router, jobs: list[GenerateJob], *, n: int | None = None,
                         timeout_s: float | None = None) -> AsyncIterator[tuple[int, Chunk]]:
    """``(index, chunk)`` for the jobs of one request, interleaved as they come; each job's stream
    ends with one finished chunk. The jobs come in groups of ``n`` that share a prompt (one group
    when ``n`` is None; a completions request listing several prompts has one per prompt): each
    group's first job starts at once, the others of the group at its first chunk. A RouterError from
    any job ends the whole request (the others are aborted), as does closing this iterator."""
    admissions = router.admit(jobs[0].model, len(jobs))
    n = n or len(jobs)
    n_metric = router.metrics.request_params_n.labels(jobs[0].model)
    if len(jobs) == 1:
        try:
            async for chunk in router.stream(jobs[0], timeout_s=timeout_s, admission=admissions[0]):
                yield 0, chunk
        finally:
            router.release(admissions)  # a no-op once the stream has run
        n_metric.observe(1)
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int) -> None:
        try:
            async for chunk in router.stream(jobs[index], timeout_s=timeout_s, admission=admissions[index]):
                queue.put_nowait((index, chunk))
        except Exception as e:  # noqa: BLE001 (handed to the reader, which raises it)
            queue.put_nowait((index, e))
        else:
            queue.put_nowait((index, _DONE))

    firsts = range(0, len(jobs), n)
    tasks = [asyncio.create_task(pump(i)) for i in firsts]
    waiting = set(firsts)  # groups whose first job has not sent its first chunk yet
    live = len(tasks)
    try:
        while live:
            index, item = await queue.get()
            if isinstance(item, Exception):
                raise item
            if index in waiting:  # the group's prompt is in the prefix cache now
                waiting.discard(index)
                rest = range(index + 1, min(index + n, len(jobs)))
                tasks += [asyncio.create_task(pump(i)) for i in rest]
                live += len(rest)
            if item is _DONE:
                live -= 1
            else:
                yield index, item
        for _ in firsts:  # every choice finished
            n_metric.observe(n)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        router.release(admissions)  # those whose stream never started hold their place until here
