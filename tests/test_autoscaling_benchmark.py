"""benchmarks/autoscaling.py as `make bench` runs it: several seeds per trace in a process pool, one row
per policy with the mean, the range and the comparison with the default row; and the oracle bound
(benchmarks/autoscaling_bound.py), one row per utilisation and hold window."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("ray.serve")
ROOT = os.path.join(os.path.dirname(__file__), "..")


def test_the_benchmark_reports_each_policy_over_seeds_against_the_default():
    out = subprocess.run([sys.executable, "benchmarks/autoscaling.py", "--seconds", "120", "--seeds", "2"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, check=True).stdout
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import autoscaling as sim
    finally:
        sys.path.pop(0)
    table, equal_cost = out.split("At equal replica-seconds")
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith(("| bursty", "| diurnal"))]
    assert len(rows) == 2 * len(sim.RUNS)
    for kind in ("bursty", "diurnal"):
        mine = [r for r in rows if r[0] == f"| {kind}"]
        assert [r[1] for r in mine] == [label for *_, label in sim.RUNS]
        assert mine[0][5] == "-" and all(" pt, " in r[5] for r in mine[1:])
        for r in mine:
            mean, span = r[2].split(" (")  # e.g. "93.3 (92.0-94.1)%"
            low, high = (float(v) for v in span.rstrip(")%").split("-"))
            assert 0 <= low <= float(mean) <= high <= 100
            assert r[-1].strip(" |") == "0"  # no request left unfinished
    assert "mean (min-max) over seeds 0-1" in out
    # Each kubeinfer policy against the default's rows that cost at most EQUAL_COST x as much: the best
    # of them, and the difference in attainment, or none when every default row costs more.
    means = {(r[0][2:], r[1]): (float(r[2].split(" (")[0]), float(r[4].split(" (")[0].replace(",", "")))
             for r in rows}
    pairs = [line.split(" | ") for line in equal_cost.splitlines() if line.startswith(("| bursty", "| diurnal"))]
    mine = [label for policy, *_, label in sim.RUNS if policy != "ongoingRequests"]
    assert [p[1] for p in pairs] == mine * 2
    for kind, label, _, peer, diff in ((p[0][2:], *p[1:4], p[4].rstrip(" |")) for p in pairs):
        attain, rs = means[kind, label]
        cheap = {name: v for (k, name), v in means.items() if k == kind and name.startswith("ongoingRequests")
                 and v[1] <= sim.EQUAL_COST * rs}
        if not cheap:
            assert peer == "none spends so little" and diff == "-"
            continue
        best = max(cheap, key=lambda name: cheap[name][0])
        assert peer.startswith(best + ": ")
        assert abs(float(diff.split(" pt")[0]) - (attain - cheap[best][0])) < 0.11


def test_the_oracle_bound_reports_each_utilisation_and_window():
    out = subprocess.run([sys.executable, "benchmarks/autoscaling_bound.py", "--seconds", "400", "--seeds", "1"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, check=True).stdout
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith(("| bursty", "| diurnal"))]
    # The grid, and the onset rows (u 0.9, each onset target) with the windows 600 s and "never down",
    # which are the same here: 600 s is past the trace's 400.
    assert {(r[0], r[1], r[2], r[3]) for r in rows} == {
        (f"| {kind}", u, w, "-") for kind in ("bursty", "diurnal") for u in ("0.6", "0.75", "0.9")
        for w in ("0 s", "300 s", "never down")} | {
        (f"| {kind}", "0.9", "never down", t) for kind in ("bursty", "diurnal") for t in ("8", "12", "16")}
    for r in rows:
        assert 0 <= float(r[4].rstrip("%")) <= 100 and float(r[5].strip(" |").replace(",", "")) > 0
    # Holding the fleet longer never costs fewer replica-seconds: the same arrivals, the sizes only held
    # (1% for when draining replicas leave).
    for kind in ("bursty", "diurnal"):
        for u in ("0.6", "0.75", "0.9"):
            held = [float(r[5].strip(" |").replace(",", "")) for r in rows
                    if r[0] == f"| {kind}" and r[1] == u and r[3] == "-"]
            assert all(b >= 0.99 * a for a, b in zip(held, held[1:])), (kind, u, held)
        # Adding the default's reaction to the onset only ever adds replicas to the oracle's.
        plain = next(float(r[5].strip(" |").replace(",", "")) for r in rows
                     if r[0] == f"| {kind}" and r[1] == "0.9" and r[2] == "never down" and r[3] == "-")
        assert all(float(r[5].strip(" |").replace(",", "")) >= 0.99 * plain for r in rows
                   if r[0] == f"| {kind}" and r[3] != "-"), kind
