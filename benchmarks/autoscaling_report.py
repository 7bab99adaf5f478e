"""benchmarks/autoscaling.py's equal-cost table: each kubeinfer policy set against Ray's default at
the same cost, the default's target being the knob that sets its cost."""

from __future__ import annotations


def equal_cost_table(means: dict[tuple[str, int], tuple[float, float]], runs: list[tuple],
                     equal_cost: float) -> str:
    """Each kubeinfer policy's row against Ray's default at the same cost: the best attainment among
    the default's rows (its targets) that spend at most ``equal_cost`` x the policy's replica-seconds.
    ``means``: (trace kind, index in ``runs``) -> (attainment %, replica-seconds); ``runs``: the
    benchmark's runs (policy, Ray config extras, policy targets, label)."""
    lines = [f"\nAt equal replica-seconds: each policy against the best ongoingRequests row spending at most "
             f"{100 * (equal_cost - 1):g}% more\n",
             "| trace | policy | attainment, replica-seconds | best ongoingRequests row at that cost | difference |",
             "|---|---|---|---|---|"]
    defaults = [i for i, run in enumerate(runs) if run[0] == "ongoingRequests"]
    for kind in ("bursty", "diurnal"):
        for i, (policy, _, _, label) in enumerate(runs):
            if policy == "ongoingRequests":
                continue
            attain, rs = means[kind, i]
            peers = [j for j in defaults if means[kind, j][1] <= equal_cost * rs]
            best = max(peers, key=lambda j: means[kind, j][0], default=None)
            peer = "none spends so little" if best is None else \
                f"{runs[best][3]}: {means[kind, best][0]:.1f}%, {means[kind, best][1]:,.0f}"
            diff = "-" if best is None else \
                f"{attain - means[kind, best][0]:+.1f} pt at {100 * (rs / means[kind, best][1] - 1):+.0f}% replica-seconds"
            lines.append(f"| {kind} | {label} | {attain:.1f}%, {rs:,.0f} | {peer} | {diff} |")
    return "\n".join(lines)
