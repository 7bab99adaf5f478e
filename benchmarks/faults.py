"""Load and fault runs against a real `kubeinfer serve` on a local Ray (issue #18's acceptance):

    python benchmarks/faults.py              # the full run (`make bench`), a few minutes on 2 cores
    python benchmarks/faults.py --quick      # a smoke run: 40 requests, a 512 KB big prompt
    python benchmarks/faults.py --strict     # exit 1 when a bound is violated (default: print FAIL, exit 0)

It starts the default model as `make run` does (`kubeinfer serve --quantization int4 --max-model-len
2048`, every admission setting at its default) as a subprocess on free loopback ports, with its own
local Ray (`--address local`, so it never joins another Ray running on the machine), waits until a
completion comes back, runs the faults below, prints a table and stops the server (SIGINT, as Ctrl-C;
also on an exception or Ctrl-C here). Everything is loopback and every loop is bounded.

overload     N simultaneous streaming requests (half HTTP /v1/completions SSE, half gRPC GenerateStream
             through kubeinfer.client), greedy, a few tokens each. Each must get its first token or a
             429 / RESOURCE_EXHAUSTED within max_queue_wait_s (30 s by default), and each admitted
             stream must finish. "wait" is the time from sending to the first token (or to the refusal).
disconnect   N simultaneous long streams; once the engine runs them all clients disconnect at once
             (HTTP connections closed, gRPC calls cancelled). /metrics is polled every 50 ms until
             vllm:num_requests_running, vllm:num_requests_waiting and vllm:kv_cache_usage_perc all
             read 0: that is the recovery time (bound 2 s). A fresh request must then succeed.
big prompt   a 10 MB prompt (HTTP, then gRPC) while /health is polled every 50 ms: the big request
             must be refused (413 / 400, RESOURCE_EXHAUSTED / INVALID_ARGUMENT) and no /health call
             may take longer than 0.5 s.
max_tokens   max_tokens beyond the context (HTTP and gRPC): 400 / INVALID_ARGUMENT.

The times are the client's (time.perf_counter). The bounds are the issue's; a violated bound prints
FAIL and the run still exits 0 unless --strict (the tests never assert on a time). A server that never
becomes ready ends the run with exit status 2. The server's Ray is killed by any `ray stop` on the
machine (the test suite's Ray fixture runs one when it ends): run it when no test session is running.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field

import aiohttp
import grpc

from kubeinfer.client import AsyncClient, ServerError

MODEL = "smollm2-135m"
MAX_MODEL_LEN = 2048
SERVE_ARGS = ["--quantization", "int4", "--max-model-len", str(MAX_MODEL_LEN)]  # as `make run`
MAX_QUEUE_WAIT_S = 30.0  # `kubeinfer serve`'s default, which the run keeps
MAX_NUM_SEQS = 64  # `kubeinfer serve`'s default: what one replica runs at once
RECOVERY_BOUND_S = 2.0
HEALTH_BOUND_S = 0.5
HEALTH_PERIOD_S = 0.05
IDLE_GAUGES = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc")
ROUTER_GAUGES = ("kubeinfer:router_requests_in_flight", "kubeinfer:router_requests_queued")
TOPICS = ["Kubernetes", "the sea", "a red bicycle", "bread", "GPUs", "winter", "a lighthouse", "chess",
          "the moon", "coffee", "rivers", "a small robot"]


@dataclass(frozen=True)
class Scale:
    overload_requests: int
    overload_tokens: int
    disconnect_requests: int
    disconnect_tokens: int
    big_prompt_bytes: int
    ready_timeout_s: float
    recovery_poll_s: float  # how long /metrics is polled after the disconnect (past the 2 s bound)


FULL = Scale(overload_requests=300, overload_tokens=8, disconnect_requests=300, disconnect_tokens=512,
             big_prompt_bytes=10 * 1000 * 1000, ready_timeout_s=600.0,
             recovery_poll_s=90.0)
# 512 KB is well over the default prompt limit (32 x max_model_len = 65536 characters).
QUICK = Scale(overload_requests=40, overload_tokens=4, disconnect_requests=40, disconnect_tokens=256,
              big_prompt_bytes=512 * 1000, ready_timeout_s=300.0,
              recovery_poll_s=45.0)


def machine_line() -> str:
    """The CPU model and the instruction sets that matter to the kernels (as docs/benchmarks.md lists)."""
    model, flags = None, set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model is None:
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    model = model or platform.processor() or platform.machine()
    isa = sorted(f for f in flags if f == "avx2" or f == "fma" or f.startswith(("avx512", "amx")))
    return f"{model}, {os.cpu_count()} CPUs; ISA: {' '.join(isa) or 'unknown'}; Python {platform.python_version()}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------------
# The server


class ServerNotReady(RuntimeError):
    """The server exited, or did not answer a completion in time, before the faults could run."""


class Server:
    """`kubeinfer serve` as a subprocess in its own session; ``stop()`` is Ctrl-C, then escalates."""

    def __init__(self, ready_timeout_s: float) -> None:
        self.http_port, self.grpc_port = free_port(), free_port()
        while self.grpc_port == self.http_port:
            self.grpc_port = free_port()
        self.ready_timeout_s = ready_timeout_s
        self.log = tempfile.NamedTemporaryFile("w+", prefix="kubeinfer-faults-", suffix=".log", delete=False)
        exe = shutil.which("kubeinfer", path=os.path.dirname(sys.executable))
        cmd = [exe] if exe else [sys.executable, "-m", "kubeinfer.cli"]
        self.cmd = cmd + ["serve", *SERVE_ARGS, "--host", "127.0.0.1", "--http-port", str(self.http_port),
                          "--grpc-port", str(self.grpc_port), "--address", "local"]
        self.proc: subprocess.Popen | None = None

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def start(self) -> None:
        env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
        env.pop("RAY_ADDRESS", None)
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                     stdin=subprocess.DEVNULL, start_new_session=True)

    def log_tail(self, n: int = 30) -> str:
        self.log.flush()
        with open(self.log.name, errors="replace") as f:
            return "".join(f.readlines()[-n:])

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    async def wait_ready(self, session: aiohttp.ClientSession) -> float:
        """Seconds until /health says 200 and a short completion comes back."""
        t0 = time.perf_counter()
        deadline = t0 + self.ready_timeout_s
        while time.perf_counter() < deadline:
            if not self.alive():
                raise ServerNotReady(f"the server exited with status {self.proc.returncode}:\n{self.log_tail()}")
            try:
                async with session.get(f"{self.http}/health", timeout=aiohttp.ClientTimeout(total=5)) as r:
                    healthy = r.status == 200
                if healthy:
                    async with session.post(f"{self.http}/v1/completions", timeout=aiohttp.ClientTimeout(total=120),
                                            json={"model": MODEL, "prompt": "Hello", "max_tokens": 2,
                                                  "temperature": 0}) as r:
                        if r.status == 200:
                            await r.read()
                            return time.perf_counter() - t0
            except (aiohttp.ClientError, asyncio.TimeoutError):
                pass
            await asyncio.sleep(1.0)
        raise ServerNotReady(f"the server was not ready after {self.ready_timeout_s:.0f} s:\n{self.log_tail()}")

    def stop(self) -> float | None:
        """Ctrl-C and wait; SIGTERM, then SIGKILL to the whole session if it does not go. Seconds taken."""
        if self.proc is None:
            return None
        t0 = time.perf_counter()
        if self.proc.poll() is None:
            for sig, wait_s in ((signal.SIGINT, 60), (signal.SIGTERM, 15), (signal.SIGKILL, 10)):
                try:
                    if sig == signal.SIGKILL:
                        os.killpg(self.proc.pid, sig)
                    else:
                        self.proc.send_signal(sig)
                    self.proc.wait(timeout=wait_s)
                    break
                except subprocess.TimeoutExpired:
                    continue
                except ProcessLookupError:
                    break
        self.log.close()
        return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------------
# Clients


@dataclass
class Result:
    """One request as its client saw it. Times in seconds from the common start."""

    surface: str  # "http" | "grpc"
    status: str = "-"  # "200", "429", "OK", "RESOURCE_EXHAUSTED", "reset", "timeout", ...
    t_status: float | None = None  # status line / the error arrived
    t_first: float | None = None  # first token
    t_end: float | None = None
    tokens: int = 0  # text chunks for HTTP, token ids for gRPC
    finish: str | None = None
    retry_hint: bool = False
    error: str | None = None  # a mid-stream error event, or the client's exception
    cancelled: bool = False

    @property
    def wait(self) -> float | None:
        """Time to the first token, or to the refusal when there was none."""
        return self.t_first if self.t_first is not None else self.t_status


def prompt(i: int) -> str:
    return f"Request {i}. Write one sentence about {TOPICS[i % len(TOPICS)]}."


async def http_stream(session: aiohttp.ClientSession, base: str, i: int, max_tokens: int, t0: float,
                      res: Result, first_token: asyncio.Event | None = None,
                      timeout_s: float = MAX_QUEUE_WAIT_S + 90) -> None:
    body = {"model": MODEL, "prompt": prompt(i), "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True}
    r = None
    try:
        async with session.post(f"{base}/v1/completions", json=body,
                                timeout=aiohttp.ClientTimeout(total=timeout_s)) as r:
            res.t_status, res.status = time.perf_counter() - t0, str(r.status)
            if r.status != 200:
                res.retry_hint = "Retry-After" in r.headers
                res.error = (await r.text())[:200]
                return
            async for raw in r.content:
                line = raw.decode("utf-8", "replace").strip()
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    res.error = json.dumps(event["error"])[:200]
                    break
                for choice in event.get("choices", ()):
                    if choice.get("text"):
                        if res.t_first is None:
                            res.t_first = time.perf_counter() - t0
                            if first_token is not None:
                                first_token.set()
                        res.tokens += 1
                    if choice.get("finish_reason"):
                        res.finish = choice["finish_reason"]
    except asyncio.TimeoutError:
        res.status, res.error = ("timeout" if res.t_status is None else res.status), "client timeout"
    except aiohttp.ClientError as e:
        res.status = "reset" if res.t_status is None else res.status
        res.error = f"{type(e).__name__}: {e}"[:200]
    except asyncio.CancelledError:  # the client leaves: its connection is closed, not kept for reuse
        res.cancelled = True
        if r is not None:
            r.close()
        raise
    finally:
        res.t_end = time.perf_counter() - t0


async def grpc_stream(client: AsyncClient, i: int, max_tokens: int, t0: float, res: Result,
                      first_token: asyncio.Event | None = None, timeout_s: float = MAX_QUEUE_WAIT_S + 90) -> None:
    try:
        async for delta in client.stream(prompt(i), max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                                         timeout=timeout_s):
            if res.t_status is None:
                res.t_status, res.status = time.perf_counter() - t0, "OK"
            if delta.token_ids:
                if res.t_first is None:
                    res.t_first = time.perf_counter() - t0
                    if first_token is not None:
                        first_token.set()
                res.tokens += len(delta.token_ids)
            if delta.finish_reason:
                res.finish = delta.finish_reason
        if res.t_status is None:
            res.t_status, res.status = time.perf_counter() - t0, "OK"
    except ServerError as e:
        if res.t_status is None:
            res.t_status = time.perf_counter() - t0
        res.status = "timeout" if e.code == grpc.StatusCode.DEADLINE_EXCEEDED else e.code.name
        res.retry_hint = e.retry_after_s is not None
        res.error = e.message[:200]
    except asyncio.CancelledError:
        res.cancelled = True
        raise
    finally:
        res.t_end = time.perf_counter() - t0


async def launch(n: int, max_tokens: int, session: aiohttp.ClientSession, base: str, client: AsyncClient,
                 first_token: asyncio.Event | None = None) -> tuple[list[Result], list[asyncio.Task], float]:
    """n streams at once, alternating HTTP and gRPC; returns the results, the tasks and the start time."""
    t0 = time.perf_counter()
    results, tasks = [], []
    for i in range(n):
        res = Result(SURFACES[i % len(SURFACES)])
        coro = (http_stream(session, base, i, max_tokens, t0, res, first_token) if res.surface == "http"
                else grpc_stream(client, i, max_tokens, t0, res, first_token))
        results.append(res)
        tasks.append(asyncio.ensure_future(coro))
    return results, tasks, t0


async def scrape(session: aiohttp.ClientSession, base: str) -> dict[str, float]:
    """The sum over labels of each gauge this run reads, from one /metrics scrape."""
    async with session.get(f"{base}/metrics", timeout=aiohttp.ClientTimeout(total=5)) as r:
        text = await r.text()
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)", line)
        if m and m.group(1) in IDLE_GAUGES + ROUTER_GAUGES:
            out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(3))
    return out


# ---------------------------------------------------------------------------------------------------
# The faults


@dataclass
class Row:
    fault: str
    saw: str
    max_wait: str
    recovery: str
    bound: str
    passed: bool
    notes: list[str] = field(default_factory=list)


def counts(results: list[Result]) -> str:
    c = Counter(f"{r.surface} {r.status}" for r in results)
    return ", ".join(f"{k} x{v}" for k, v in sorted(c.items()))


async def fault_overload(scale: Scale, session, base, client) -> Row:
    n = scale.overload_requests
    results, tasks, t0 = await launch(n, scale.overload_tokens, session, base, client)
    await asyncio.gather(*tasks, return_exceptions=True)
    ok = {"200", "OK"}
    refused = {"429", "RESOURCE_EXHAUSTED"}
    waits = [r.wait for r in results if r.wait is not None]
    max_wait = max(waits, default=None)
    admitted = [r for r in results if r.status in ok]
    incomplete = [r for r in admitted if r.finish is None or r.error or r.tokens == 0]
    other = [r for r in results if r.status not in ok | refused]
    late = [r for r in results if r.wait is None or r.wait > MAX_QUEUE_WAIT_S]
    no_hint = [r for r in results if r.status in refused and not r.retry_hint]
    ttft = sorted(r.t_first for r in admitted if r.t_first is not None)
    notes = [f"overload: {len(admitted)} streamed, {sum(r.status in refused for r in results)} refused; "
             f"TTFT of the streamed p50 {_p(ttft, 0.5)} max {_s(ttft[-1] if ttft else None)}; "
             f"refusals answered within {_s(max((r.t_status for r in results if r.status in refused), default=None))}; "
             f"all done after {_s(max(r.t_end for r in results))}"]
    for what, rs in (("not 200/429", other), ("admitted but not finished", incomplete), ("over the wait bound", late),
                     ("429 without a retry hint", no_hint)):
        if rs:
            notes.append(f"overload: {len(rs)} {what}, e.g. {rs[0].surface} status {rs[0].status} wait "
                         f"{_s(rs[0].wait)} error {rs[0].error!r}")
    passed = not (other or incomplete or late or no_hint)
    return Row(f"{n} simultaneous streams ({scale.overload_tokens} tokens)", counts(results), _s(max_wait), "-",
               f"tokens or 429 <= {MAX_QUEUE_WAIT_S:g} s", passed, notes)


async def fault_disconnect(scale: Scale, session, base, client, early: bool = False) -> Row:
    n = scale.disconnect_requests
    first_token = asyncio.Event()
    results, tasks, t0 = await launch(n, scale.disconnect_tokens, session, base, client, first_token)
    busy: dict[str, float] = {}
    if early:
        # Before their first token: every request has reached the router (in flight or queued).
        deadline = time.perf_counter() + 30
        while time.perf_counter() < deadline:
            await asyncio.sleep(0.05)
            busy = await scrape(session, base)
            held = busy.get("kubeinfer:router_requests_in_flight", 0) + busy.get("kubeinfer:router_requests_queued", 0)
            if held + sum(t.done() for t in tasks) >= n or first_token.is_set():
                break
    else:
        # Mid-stream: the engine runs a full batch (max_num_seqs, 64 by default) or every admitted
        # stream has its first token; the rest wait in the queues (or were refused).
        deadline = time.perf_counter() + 120
        while time.perf_counter() < deadline:
            await asyncio.sleep(0.25)
            streaming = sum(r.t_first is not None for r in results)
            settled = all(r.t_first is not None or tasks[i].done() for i, r in enumerate(results))
            if streaming and (settled or streaming >= min(n, MAX_NUM_SEQS)):
                busy = await scrape(session, base)
                if busy.get("vllm:num_requests_running", 0) > 0:
                    break
    at_cancel = Counter("streaming" if r.t_first is not None else
                        ("refused" if r.status in ("429", "RESOURCE_EXHAUSTED") else
                         ("ended " + r.status) if tasks[i].done() else "waiting") for i, r in enumerate(results))
    t_cancel = time.perf_counter()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    t_closed = time.perf_counter() - t_cancel
    # Poll until the engine gauges read 0 (and, for the notes, the router's own); past the bound too,
    # so a slow recovery is measured rather than cut off.
    engine_idle = router_idle = None
    last: dict[str, float] = {}
    poll_until = time.perf_counter() + scale.recovery_poll_s
    while time.perf_counter() < poll_until and (engine_idle is None or router_idle is None):
        try:
            last = await scrape(session, base)
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            last = {"error": str(e)}
        now = time.perf_counter() - t_cancel
        if engine_idle is None and all(last.get(g, 1.0) == 0 for g in IDLE_GAUGES):
            engine_idle = now
        if router_idle is None and all(last.get(g, 1.0) == 0 for g in ROUTER_GAUGES):
            router_idle = now
        await asyncio.sleep(HEALTH_PERIOD_S)
    # Nothing stuck: a fresh client (a new connection) still gets its tokens.
    after = Result("http")
    async with aiohttp.ClientSession() as fresh:
        await http_stream(fresh, base, 10_000, 4, time.perf_counter(), after, timeout_s=120)
    streaming = at_cancel.get("streaming", 0)
    fresh_ok = after.status == "200" and after.finish is not None and after.t_first is not None \
        and after.t_first <= MAX_QUEUE_WAIT_S
    passed = engine_idle is not None and engine_idle <= RECOVERY_BOUND_S and fresh_ok and (early or streaming > 0)
    saw = ", ".join(f"{k} x{v}" for k, v in sorted(at_cancel.items())) + " -> all cancelled"
    notes = [f"disconnect ({'early' if early else 'mid-stream'}): gauges when cancelling {_fmt_gauges(busy)}; clients closed in {_s(t_closed)}; "
             f"router gauges idle after {_s(router_idle)}; last scrape {_fmt_gauges(last)}; "
             f"a fresh request afterwards: {after.status}, first token {_s(after.t_first)}, finish {after.finish}"
             + (f", error {after.error!r}" if after.error else "")
             + ("" if fresh_ok else f" (FAIL: it must stream, its first token within {MAX_QUEUE_WAIT_S:g} s)")
             + ("" if early or streaming else "; no stream had a token when the clients left (FAIL)")]
    what = "before their first token" if early else "mid-stream"
    return Row(f"{n} clients disconnect {what}", saw, f"next request {_s(after.t_first)}", _s(engine_idle) if engine_idle is not None
               else f"not idle after {scale.recovery_poll_s:g} s", f"engine idle <= {RECOVERY_BOUND_S:g} s", passed, notes)


async def poll_health(session, base, stop: asyncio.Event, latencies: list[float], statuses: Counter) -> None:
    while not stop.is_set():
        t = time.perf_counter()
        try:
            async with session.get(f"{base}/health", timeout=aiohttp.ClientTimeout(total=10)) as r:
                await r.read()
                statuses[str(r.status)] += 1
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            statuses[type(e).__name__] += 1
        latencies.append(time.perf_counter() - t)
        await asyncio.sleep(max(0.0, HEALTH_PERIOD_S - (time.perf_counter() - t)))


async def fault_big_prompt(scale: Scale, surface: str, session, base, client) -> Row:
    big = "x" * scale.big_prompt_bytes
    health_session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))  # its own connection
    latencies: list[float] = []
    statuses: Counter = Counter()
    stop = asyncio.Event()
    poller = asyncio.ensure_future(poll_health(health_session, base, stop, latencies, statuses))
    try:
        await asyncio.sleep(0.5)  # a baseline before the big request
        n_before = len(latencies)
        t0 = time.perf_counter()
        res = Result(surface)
        if surface == "http":
            try:
                async with session.post(f"{base}/v1/completions", json={"model": MODEL, "prompt": big, "max_tokens": 4},
                                        timeout=aiohttp.ClientTimeout(total=120)) as r:
                    res.status = str(r.status)
                    res.error = (await r.text())[:160]
            except aiohttp.ClientError as e:
                res.status, res.error = "reset", f"{type(e).__name__}: {e}"[:160]
            except asyncio.TimeoutError:
                res.status = "timeout"
        else:
            try:
                await client.generate(big, max_tokens=4, timeout=120)
                res.status = "OK"
            except ServerError as e:
                res.status, res.error = e.code.name, e.message[:160]
        res.t_status = time.perf_counter() - t0
        await asyncio.sleep(1.0)  # and after it
    finally:
        stop.set()
        await poller
        await health_session.close()
    during = latencies[n_before:]
    worst = max(during, default=None)
    expected = {"http": ("413", "400"), "grpc": ("RESOURCE_EXHAUSTED", "INVALID_ARGUMENT")}[surface]
    unhealthy = {k: v for k, v in statuses.items() if k != "200"}
    passed = res.status in expected and worst is not None and worst <= HEALTH_BOUND_S and not unhealthy
    mb = scale.big_prompt_bytes / 1e6
    notes = [f"big prompt ({surface}): answered {res.status} in {_s(res.t_status)} ({res.error!r}); /health "
             f"{len(during)} calls during, max {_s(worst)}, baseline max {_s(max(latencies[:n_before], default=None))}; "
             f"/health statuses {dict(statuses)}"]
    return Row(f"{mb:g} MB prompt ({surface}) + /health every 50 ms", f"{surface} {res.status}; /health "
               + ", ".join(f"{k} x{v}" for k, v in sorted(statuses.items())), f"/health {_s(worst)}", "-",
               f"{'/'.join(expected)}; /health <= {HEALTH_BOUND_S:g} s", passed, notes)


async def fault_max_tokens(session, base, client) -> Row:
    t0 = time.perf_counter()
    h = Result("http")
    try:
        async with session.post(f"{base}/v1/completions", json={"model": MODEL, "prompt": "Hi",
                                                                 "max_tokens": 2 * MAX_MODEL_LEN},
                                timeout=aiohttp.ClientTimeout(total=60)) as r:
            h.status, h.error = str(r.status), (await r.text())[:160]
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        h.status, h.error = type(e).__name__, str(e)[:160]
    h.t_status = time.perf_counter() - t0
    g = Result("grpc")
    t0 = time.perf_counter()
    try:
        await client.generate("Hi", max_tokens=2 * MAX_MODEL_LEN, timeout=60)
        g.status = "OK"
    except ServerError as e:
        g.status, g.error = e.code.name, e.message[:160]
    g.t_status = time.perf_counter() - t0
    passed = h.status == "400" and g.status == "INVALID_ARGUMENT"
    notes = [f"max_tokens: http {h.status} ({h.error!r}); grpc {g.status} ({g.error!r})"]
    return Row(f"max_tokens {2 * MAX_MODEL_LEN} > context {MAX_MODEL_LEN}", f"http {h.status}, grpc {g.status}",
               _s(max(h.t_status, g.t_status)), "-", "400 / INVALID_ARGUMENT", passed, notes)


# ---------------------------------------------------------------------------------------------------


def _s(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f} s"


def _p(sorted_values: list[float], q: float) -> str:
    if not sorted_values:
        return "-"
    return _s(sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))])


def _fmt_gauges(g: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k.split(':')[1]}={v:g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in g.items()) + "}"


def format_table(rows: list[Row]) -> str:
    head = ("fault", "clients saw", "max wait (to first token or refusal)", "recovery", "bound", "result")
    cells = [[r.fault, r.saw, r.max_wait, r.recovery, r.bound, "PASS" if r.passed else "FAIL"] for r in rows]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(c) + " |" for c in cells]
    return "\n".join(lines)


FAULTS = ("overload", "disconnect", "big_prompt", "max_tokens", "disconnect_early")
SURFACES = ["http", "grpc"]  # the streams alternate between these (--surfaces)


async def run_faults(server: Server, scale: Scale, faults: list[str], rows: list[Row]) -> None:
    """Run ``faults`` in order, appending one row each (two for big_prompt) to ``rows``."""
    # One connection per simultaneous HTTP stream (limit=0), as separate clients would have.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        ready_s = await server.wait_ready(session)
        print(f"server ready after {ready_s:.1f} s (pid {server.proc.pid}, HTTP {server.http}, "
              f"gRPC {server.grpc_address})", flush=True)
        async with AsyncClient(server.grpc_address) as client:
            for name in faults:
                t = time.perf_counter()
                print(f"-- {name} ...", flush=True)
                try:
                    if not server.alive():
                        raise RuntimeError(f"the server has exited (status {server.proc.returncode})")
                    if name == "overload":
                        rows.append(await fault_overload(scale, session, server.http, client))
                    elif name == "disconnect":
                        rows.append(await fault_disconnect(scale, session, server.http, client))
                    elif name == "disconnect_early":
                        rows.append(await fault_disconnect(scale, session, server.http, client, early=True))
                    elif name == "big_prompt":
                        rows.append(await fault_big_prompt(scale, "http", session, server.http, client))
                        rows.append(await fault_big_prompt(scale, "grpc", session, server.http, client))
                    elif name == "max_tokens":
                        rows.append(await fault_max_tokens(session, server.http, client))
                except (aiohttp.ClientError, asyncio.TimeoutError, OSError, RuntimeError) as e:
                    # The server went away (or stopped answering) mid-fault: a FAIL row, not a traceback.
                    alive = "running" if server.alive() else f"exited with status {server.proc.returncode}"
                    rows.append(Row(name, f"no answer: {type(e).__name__}", "-", "-", "-", False,
                                    [f"{name}: {type(e).__name__}: {e}; the server {alive}; its log's tail:\n"
                                     f"{server.log_tail(10)}"]))
                print(f"   ({time.perf_counter() - t:.1f} s)", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a smoke run: few requests, a smaller big prompt")
    ap.add_argument("--strict", action="store_true", help="exit 1 when a bound is violated")
    ap.add_argument("--faults", default=",".join(FAULTS), help=f"comma-separated subset of {', '.join(FAULTS)}")
    ap.add_argument("--surfaces", default="http,grpc", help="the streams' surfaces, alternating: http, grpc or both")
    args = ap.parse_args()
    SURFACES[:] = [x for x in args.surfaces.split(",") if x]
    if not SURFACES or set(SURFACES) - {"http", "grpc"}:
        ap.error("--surfaces takes http, grpc or http,grpc")
    faults = [f for f in args.faults.split(",") if f]
    unknown = set(faults) - set(FAULTS)
    if unknown:
        ap.error(f"unknown faults {sorted(unknown)}")
    scale = QUICK if args.quick else FULL
    print(f"# kubeinfer fault benchmark{' (quick)' if args.quick else ''}: a real `kubeinfer serve` on a local Ray")
    print(f"machine: {machine_line()}")
    server = Server(scale.ready_timeout_s)
    print(f"server: {' '.join(server.cmd[1:])}  (max_queue_wait_s {MAX_QUEUE_WAIT_S:g}, other limits default)",
          flush=True)
    t_all = time.perf_counter()
    # SIGTERM (a CI runner stopping us) takes the same way out as Ctrl-C: the server is stopped.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    rows: list[Row] = []
    try:
        server.start()
        asyncio.run(run_faults(server, scale, faults, rows))
    except ServerNotReady as e:
        print(f"faults: {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("interrupted: stopping the server", file=sys.stderr, flush=True)
        raise
    finally:
        stopped = server.stop()
        if stopped is not None:
            print(f"server stopped in {stopped:.1f} s (exit status {server.proc.returncode}; log {server.log.name})",
                  flush=True)
    print()
    print(format_table(rows))
    print()
    for r in rows:
        for note in r.notes:
            print(note)
    failed = [r.fault for r in rows if not r.passed]
    print(f"\n{len(rows) - len(failed)}/{len(rows)} PASS; total {time.perf_counter() - t_all:.0f} s")
    return 1 if args.strict and failed else 0


if __name__ == "__main__":
    sys.exit(main())
