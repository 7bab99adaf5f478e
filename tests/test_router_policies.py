"""Router policy logic: replica selection, admission control, micro-batching (no Ray, gRPC or torch)."""

from __future__ import annotations

import asyncio
import random
from collections import Counter

import pytest

from kubeinfer.router import (
    AdmissionController, LeastLoaded, MicroBatcher, NoReplicaAvailable, PowerOfTwoChoices,
    PrefixAffinity, Rejected, ReplicaStats, RoundRobin, make_policy, prefix_block_hashes,
)


def replicas(n: int, **kw) -> list[ReplicaStats]:
    return [ReplicaStats(f"r{i}", **kw) for i in range(n)]


def prompt(seed: int, length: int = 64) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(32000) for _ in range(length)]


# --- policies ---------------------------------------------------------------------------------

def test_round_robin_even_distribution():
    rs = replicas(3)
    policy = RoundRobin()
    counts = Counter(policy.choose(rs).replica_id for _ in range(300))
    assert counts == {"r0": 100, "r1": 100, "r2": 100}


def test_power_of_two_never_picks_the_more_loaded_of_its_pair():
    rs = [ReplicaStats(f"r{i}", outstanding=i) for i in range(5)]
    rng, shadow = random.Random(7), random.Random(7)
    policy = PowerOfTwoChoices(rng)
    picked = Counter()
    for _ in range(500):
        a, b = shadow.sample(rs, 2)  # the same draws the policy makes
        chosen = policy.choose(rs)
        assert chosen is min((a, b), key=lambda r: r.outstanding)
        picked[chosen.replica_id] += 1
    assert "r4" not in picked  # the most loaded replica always loses its pair


def test_power_of_two_ties_broken_by_queue_len():
    rs = [ReplicaStats("a", outstanding=2, queue_len=5), ReplicaStats("b", outstanding=2, queue_len=1)]
    policy = PowerOfTwoChoices(random.Random(0))
    assert all(policy.choose(rs).replica_id == "b" for _ in range(20))


def test_least_loaded():
    rs = [ReplicaStats("a", outstanding=3, queue_len=0),
          ReplicaStats("b", outstanding=1, queue_len=1, kv_usage=0.9),
          ReplicaStats("c", outstanding=1, queue_len=1, kv_usage=0.1)]
    assert LeastLoaded().choose(rs).replica_id == "c"
    # A full KV cache repels traffic, but only like a few queued requests.
    rs = [ReplicaStats("a", outstanding=2), ReplicaStats("b", kv_usage=1.0)]
    assert LeastLoaded(kv_weight=4.0).choose(rs).replica_id == "a"
    assert LeastLoaded(kv_weight=1.0).choose(rs).replica_id == "b"


def test_prefix_hashes_match_kv_cache_scheme():
    toks = prompt(1, 40)
    h0 = hash((-1, tuple(toks[:16])))
    assert prefix_block_hashes(toks, 16, 4) == [h0, hash((h0, tuple(toks[16:32])))]


def test_prefix_affinity_same_prefix_same_replica_and_spread():
    rs = replicas(4)
    policy = PrefixAffinity(block_size=16, num_blocks=4)
    for seed in range(10):
        base = prompt(seed)
        # Same leading 4 blocks, different tails: same replica.
        targets = {policy.choose(rs, base + prompt(100 + k, 7 * k)).replica_id for k in range(5)}
        assert len(targets) == 1
    spread = Counter(policy.choose(rs, prompt(seed)).replica_id for seed in range(200))
    assert set(spread) == {"r0", "r1", "r2", "r3"}
    assert min(spread.values()) >= 25  # roughly uniform (expected 50 each)


def test_prefix_affinity_removing_a_replica_only_moves_its_keys():
    rs = replicas(5)
    policy = PrefixAffinity()
    prompts = [prompt(seed) for seed in range(200)]
    before = [policy.choose(rs, p).replica_id for p in prompts]
    after = [policy.choose(rs[:2] + rs[3:], p).replica_id for p in prompts]  # r2 gone
    moved = [(b, a) for b, a in zip(before, after) if b != a]
    assert moved and all(b == "r2" for b, _ in moved)
    assert sum(b == "r2" for b in before) == len(moved)
    # Marking it unhealthy is the same as removing it.
    rs[2].healthy = False
    assert [policy.choose(rs, p).replica_id for p in prompts] == after


def test_prefix_affinity_falls_back_under_imbalance_and_for_short_prompts():
    rs = replicas(3)
    policy = PrefixAffinity(block_size=16, imbalance_threshold=4)
    p = prompt(3)
    home = policy.choose(rs, p)
    home.outstanding = 4  # within the threshold: stay
    assert policy.choose(rs, p) is home
    home.outstanding = 5  # beyond: least loaded
    chosen = policy.choose(rs, p)
    assert chosen is not home and chosen.outstanding == 0
    # Shorter than one block: plain least-loaded.
    rs = [ReplicaStats("a", outstanding=1), ReplicaStats("b"), ReplicaStats("c", outstanding=2)]
    assert all(policy.choose(rs, prompt(s, 15)).replica_id == "b" for s in range(10))
    assert policy.choose(rs, None).replica_id == "b"


@pytest.mark.parametrize("name", ["round_robin", "power_of_two", "least_loaded", "prefix_affinity"])
def test_unhealthy_never_chosen_and_none_available(name):
    policy = make_policy(name)
    rs = replicas(4)
    rs[0].healthy = rs[2].healthy = False
    rs[1].outstanding = 100  # even when the healthy ones are loaded
    chosen = {policy.choose(rs, prompt(s)).replica_id for s in range(100)}
    assert chosen <= {"r1", "r3"}
    for r in rs:
        r.healthy = False
    with pytest.raises(NoReplicaAvailable):
        policy.choose(rs, prompt(0))
    with pytest.raises(NoReplicaAvailable):
        policy.choose([])


def test_make_policy():
    assert isinstance(make_policy("power_of_two", rng=random.Random(1)), PowerOfTwoChoices)
    assert make_policy("prefix_affinity", block_size=8).block_size == 8
    with pytest.raises(ValueError, match="power_of_two.*round_robin"):
        make_policy("random")


# --- admission --------------------------------------------------------------------------------

class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_admission_bounds_and_release():
    async def main():
        ac = AdmissionController(max_queued=2, max_in_flight=2, clock=FakeClock())
        held = [ac.try_admit() for _ in range(4)]
        assert [a.state for a in held] == ["running", "running", "queued", "queued"]
        assert (ac.in_flight, ac.queued) == (2, 2)
        rej = ac.try_admit()
        assert isinstance(rej, Rejected)
        assert ac.min_retry_after_s <= rej.retry_after_s <= ac.max_retry_after_s
        # A freed slot goes to the oldest waiter; the queue then has room again.
        held[0].release()
        held[0].release()  # idempotent
        assert held[2].state == "running" and (ac.in_flight, ac.queued) == (2, 1)
        async with held[2]:
            pass
        assert held[3].state == "running"
        # A queued waiter cancelled gives its place up.
        queued = ac.try_admit()
        assert queued.state == "queued" and ac.queued == 1
        task = asyncio.create_task(queued.wait())
        await asyncio.sleep(0)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert ac.queued == 0 and queued.state == "released"

    asyncio.run(main())


def test_queued_admission_waits_for_a_slot():
    async def main():
        ac = AdmissionController(max_queued=1, max_in_flight=1)
        first, second = ac.try_admit(), ac.try_admit()
        waiting = asyncio.create_task(second.wait())
        await asyncio.sleep(0)
        assert not waiting.done()
        first.release()
        await asyncio.wait_for(waiting, 1)
        assert second.state == "running" and ac.in_flight == 1

    asyncio.run(main())


def test_retry_after_follows_completion_rate_within_bounds():
    clock = FakeClock()
    ac = AdmissionController(max_queued=0, max_in_flight=1, rate_window_s=10.0,
                             min_retry_after_s=0.1, max_retry_after_s=10.0, clock=clock)
    held = ac.try_admit()
    assert ac.try_admit().retry_after_s == 10.0  # nothing completed yet: the ceiling
    held.release()
    for _ in range(19):  # 20 completions within the 10 s window: 2/s, so a place in ~0.5 s
        clock.now += 0.1
        ac.try_admit().release()
    held = ac.try_admit()
    assert ac.try_admit().retry_after_s == pytest.approx(0.5)
    held.release()
    for _ in range(400):  # 40/s: the estimate falls under the floor
        ac.try_admit().release()
    held = ac.try_admit()
    assert ac.try_admit().retry_after_s == 0.1
    clock.now += 1000  # the window emptied: back to the ceiling
    assert ac.try_admit().retry_after_s == 10.0


# --- micro-batching ---------------------------------------------------------------------------

# These run on looptime's fake clock: the windows are in loop time, so a loaded CI machine cannot
# make a "late" item miss its window, and the tests can assert when each flush happened.
def on_loop_time(test):
    return pytest.mark.asyncio(pytest.mark.looptime(test))


class Recorder:
    def __init__(self, fail_on: int | None = None) -> None:
        self.batches: list[list[int]] = []
        self.times: list[float] = []  # loop time of each flush
        self.fail_on = fail_on

    async def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        self.times.append(asyncio.get_running_loop().time())
        if self.fail_on is not None and self.fail_on in items:
            raise ValueError("boom")
        return [i * 10 for i in items]


@on_loop_time
async def test_items_within_window_share_one_flush():
    rec = Recorder()
    mb = MicroBatcher(rec, max_batch_size=16, window_ms=50)
    t0 = asyncio.get_running_loop().time()

    async def after(delay_s: float, i: int) -> int:
        await asyncio.sleep(delay_s)
        return await mb.submit(i)

    # 2 arrives 10 ms into the first item's 50 ms window; 3 arrives after it closed.
    results = await asyncio.gather(mb.submit(0), mb.submit(1), after(0.01, 2), after(0.08, 3))
    assert results == [0, 10, 20, 30]
    assert rec.batches == [[0, 1, 2], [3]]
    # Each batch goes when its first item's window ends, not before and not later.
    assert [round(t - t0, 6) for t in rec.times] == [0.05, 0.13]


@on_loop_time
async def test_max_batch_size_splits_and_does_not_wait_for_window():
    rec = Recorder()
    mb = MicroBatcher(rec, max_batch_size=3, window_ms=10_000)  # a full batch goes at once
    t0 = asyncio.get_running_loop().time()
    results = await asyncio.gather(*(mb.submit(i) for i in range(6)))
    assert results == [i * 10 for i in range(6)]
    assert rec.batches == [[0, 1, 2], [3, 4, 5]]
    assert rec.times == [t0, t0]  # no window waited for


@on_loop_time
async def test_window_zero_batches_what_is_queued():
    rec = Recorder()
    mb = MicroBatcher(rec, max_batch_size=8, window_ms=0)
    assert await asyncio.gather(*(mb.submit(i) for i in range(4))) == [0, 10, 20, 30]
    assert await mb.submit(9) == 90
    assert rec.batches == [[0, 1, 2, 3], [9]]


@on_loop_time
async def test_flush_exception_reaches_every_caller_of_that_batch_only():
    rec = Recorder(fail_on=1)
    mb = MicroBatcher(rec, max_batch_size=2, window_ms=20)
    results = await asyncio.gather(*(mb.submit(i) for i in range(4)), return_exceptions=True)
    assert [type(r) for r in results[:2]] == [ValueError, ValueError]
    assert results[2:] == [20, 30]


@on_loop_time
async def test_cancelled_caller_does_not_lose_the_others():
    gate = asyncio.Event()
    batches: list[list[int]] = []

    async def flush(items: list[int]) -> list[int]:
        batches.append(list(items))
        await gate.wait()
        return [i * 10 for i in items]

    mb = MicroBatcher(flush, max_batch_size=8, window_ms=20)
    tasks = [asyncio.create_task(mb.submit(i)) for i in range(4)]
    await asyncio.sleep(0)
    tasks[1].cancel()  # while its batch is still collecting: dropped from the flush
    await asyncio.sleep(0.03)  # the 20 ms window has ended: the flush started and waits at the gate
    assert batches == [[0, 2, 3]]
    tasks[2].cancel()  # while the flush runs
    await asyncio.sleep(0)
    gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert results[0] == 0 and results[3] == 30
    assert isinstance(results[1], asyncio.CancelledError)
    assert isinstance(results[2], asyncio.CancelledError)
    assert batches == [[0, 2, 3]]
    await mb.aclose()


def test_router_modules_import_neither_ray_torch_nor_serve():
    """Every module of kubeinfer.router, each in a fresh interpreter: the router validates,
    tokenizes and routes; it needs no tensor library, no Ray and nothing of the Serve glue."""
    import pkgutil
    import subprocess
    import sys

    import kubeinfer.router
    modules = ["kubeinfer.router"] + [f"kubeinfer.router.{m.name}" for m in pkgutil.iter_modules(kubeinfer.router.__path__)]
    assert "kubeinfer.router.grpc_service" in modules and "kubeinfer.router.router" in modules
    for module in modules:
        # The package itself (the policies Serve's request router imports) does not even need gRPC.
        banned = ("ray", "torch", "kubeinfer.serve") + (("grpc",) if module == "kubeinfer.router" else ())
        code = (f"import sys, {module}; "
                f"bad = [m for m in {banned!r} if m in sys.modules]; "
                "assert not bad, bad")
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert result.returncode == 0, (module, result.stderr[-500:])


def test_serve_request_router_avoids_excluded_and_unavailable_replicas_unless_none_is_left():
    """The Serve glue's ranking: a retry's excluded replica and one Serve saw unavailable (a killed
    replica it has not yet dropped) are not chosen while another replica is there; when every
    candidate is avoided, one is chosen anyway rather than failing the request."""
    import time
    from types import SimpleNamespace
    from kubeinfer.serve.request_router import PolicyRequestRouter

    def replica(rid):
        return SimpleNamespace(replica_id=SimpleNamespace(unique_id=rid), routing_stats={})

    router = PolicyRequestRouter.__new__(PolicyRequestRouter)  # Serve's own constructor needs a live handle
    router.initialize_state("round_robin")
    a, b = replica("a"), replica("b")

    def chosen(*candidates, **kwargs):
        ranks = asyncio.run(router.choose_replicas(list(candidates), SimpleNamespace(kwargs=kwargs, args=())))
        return [[r.replica_id.unique_id for r in rank] for rank in ranks]

    assert {chosen(a, b)[0][0] for _ in range(4)} == {"a", "b"}  # round robin over both
    assert all(chosen(a, b, exclude_replica="a") == [["b"]] for _ in range(4))
    router.unavailable_since["b"] = time.monotonic()
    assert all(chosen(a, b) == [["a"]] for _ in range(4))
    assert chosen(a, b, exclude_replica="a")[0][0] in ("a", "b")  # both avoided: still routed
    router.unavailable_since["b"] = time.monotonic() - PolicyRequestRouter.UNAVAILABLE_HOLD_S - 1
    assert {chosen(a, b)[0][0] for _ in range(4)} == {"a", "b"}  # the hold expired
    assert "b" not in router.unavailable_since
