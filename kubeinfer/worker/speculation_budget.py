"""How many drafts pay: a measured cost of a decode step by its rows, against each sequence's
acceptance rate.

Verification is not free, and its price depends on the kernels. On the CPU's first int4 GEMV a
row cost nearly what the first one did, and with a fixed k n-gram speculation made CPU decoding
slower than plain (docs/benchmarks.md, "Speculative decoding"); on the interleaved kernels an extra
row costs a fraction of a step; on a GPU it is almost free. So the speculator measures instead of
assuming: ``StepCosts`` keeps a moving average of a decode-only step's wall time
(proposal included) by its number of rows, and ``choose_k`` picks, per sequence, the number of drafts
that maximises expected tokens per second of the step, given the sequence's acceptance rate
``alpha`` (the chance that a draft is accepted when every draft before it was: the first ``i`` are
accepted with probability ``alpha ** i``). Zero drafts is a choice like any other.
"""

from __future__ import annotations

# The moving averages' weight of the newest observation, and the most one step time counts for
# (as a multiple of the average so far).
COST_WEIGHT = 0.1
OUTLIER_FACTOR = 3.0
ALPHA_WEIGHT = 0.3
# A row count never measured is priced from the nearest measured one, at this share of a one-row
# step per extra row: optimistic, so that a few verification steps get measured at all.
PRIOR_ROW_COST = 0.25
# A sequence's acceptance rate before any of its drafts were verified, and the pull back towards it
# per step in which the sequence did not draft (so a sequence whose drafts did not pay tries again
# later: acceptance changes with the text, as when a passage starts being repeated).
PRIOR_ALPHA = 0.6
ALPHA_RECOVERY = 0.02
# Every this many proposals declined in a row, one is verified anyway with a single draft: the cost
# of a step with more rows is only measured when such a step runs, and a stale high cost (or a
# stale acceptance rate) would keep drafting off for good. Where a second row costs as much as the
# first, this costs about 1.5% (one extra row in 64 steps).
EXPLORE_EVERY = 64
# More drafts must promise this much more throughput than fewer: step times are noisy, and a draft
# that only breaks even still holds KV slots and a verification row.
MIN_GAIN = 0.02


class StepCosts:
    """Moving averages of decode-only step times (seconds) by their number of rows, and when each row
    count was last measured (``steps`` counts the measured steps)."""

    def __init__(self) -> None:
        self.seconds: dict[int, float] = {}
        self.measured_at: dict[int, int] = {}
        self.steps = 0

    def age(self, rows: int) -> float:
        """Measured steps since a step of ``rows`` rows was last measured (infinite: never)."""
        return self.steps - self.measured_at[rows] if rows in self.measured_at else float("inf")

    def observe(self, rows: int, seconds: float) -> None:
        """One step's time. A step far slower than the average so far (a draft model's first catch-up
        over a whole prompt, a preempted process) counts as three times the average, not in full."""
        self.steps += 1
        self.measured_at[rows] = self.steps
        old = self.seconds.get(rows)
        if old is None:
            self.seconds[rows] = seconds
        else:
            self.seconds[rows] = old + COST_WEIGHT * (min(seconds, OUTLIER_FACTOR * old) - old)

    def estimate(self, rows: int) -> float | None:
        """The expected time of a step of ``rows`` rows: measured, interpolated between measured row
        counts, or extrapolated from the nearest one (at ``PRIOR_ROW_COST`` of a one-row step per
        row when only one is known); None before any step was measured."""
        if rows in self.seconds:
            return self.seconds[rows]
        known = sorted(self.seconds)
        if not known:
            return None
        below = [r for r in known if r < rows]
        above = [r for r in known if r > rows]
        if below and above:
            lo, hi = below[-1], above[0]
            t = (rows - lo) / (hi - lo)
            return self.seconds[lo] + t * (self.seconds[hi] - self.seconds[lo])
        base = known[0]
        per_row = PRIOR_ROW_COST * self.seconds[base] / base
        if len(known) >= 2 and below:  # beyond the largest measured: the measured slope, if steeper
            lo, hi = known[-2], known[-1]
            per_row = max(per_row, (self.seconds[hi] - self.seconds[lo]) / (hi - lo))
        nearest = below[-1] if below else above[0]
        return max(self.seconds[nearest] + (rows - nearest) * per_row, 1e-9)


def explore_k(costs: StepCosts, rows: int, most: int, since_last: int) -> int | None:
    """A draft count to verify this step against ``choose_k``'s choice, or None.

    Only the row counts that run get measured, and the machine's speed drifts: on a VM a one-row step
    measured in a fast minute against a two-row step measured in a slow one made the extrapolated
    price of 3-5 rows so high that k stayed 1 for a whole run (self-draft 0.99x, where k = 4 had
    given 1.74x). So the draft count whose step size (``rows`` + k) was measured longest ago is tried
    once it is ``EXPLORE_EVERY`` measured steps old, at most once per ``EXPLORE_EVERY // 4`` steps."""
    if most <= 0 or since_last < EXPLORE_EVERY // 4:
        return None
    k = max(range(1, most + 1), key=lambda j: (costs.age(rows + j), j))
    return k if costs.age(rows + k) >= EXPLORE_EVERY else None


def expected_tokens(alpha: float, k: int) -> float:
    """Tokens a sequence adds in a step with ``k`` drafts: the target's own one, plus the accepted run
    (sum over i = 1..k of alpha ** i)."""
    total, p = 1.0, 1.0
    for _ in range(k):
        p *= alpha
        total += p
    return total


def choose_k(costs: StepCosts, rows: int, tokens: float, alpha: float, most: int) -> int:
    """The drafts (0..``most``) for one sequence that maximise the step's expected tokens per second,
    given the ``rows`` and expected ``tokens`` of the step so far (this sequence's own row included);
    ``most`` when nothing is measured yet."""
    if most <= 0:
        return 0
    if costs.estimate(rows) is None:
        return most
    best_k, best_rate = 0, tokens / costs.estimate(rows) * (1.0 + MIN_GAIN)  # drafting must beat this
    for k in range(1, most + 1):
        rate = (tokens - 1.0 + expected_tokens(alpha, k)) / costs.estimate(rows + k)
        if rate > best_rate:
            best_k, best_rate = k, rate
    return best_k


def update_alpha(alpha: float, proposed: int, accepted: int, weight: float = ALPHA_WEIGHT) -> float:
    """Fold one verified proposal into an acceptance rate: ``accepted`` drafts were accepted of
    ``accepted + 1`` tried when one was rejected, of ``accepted`` when all were."""
    tried = accepted + (1 if accepted < proposed else 0)
    return alpha + weight * (accepted / tried - alpha)


def recover_alpha(alpha: float, prior: float = PRIOR_ALPHA) -> float:
    return alpha + ALPHA_RECOVERY * (prior - alpha)


class AcceptancePrior:
    """The acceptance rate over every verified proposal of this engine (a slower moving average): what
    a new sequence starts from and a sequence that stopped drafting drifts back to. A proposer's
    rate is mostly its own, not the request's (an int4 self-draft agrees with its target ~95% of the
    time, n-gram lookup on open chat rarely), so this beats any constant."""

    WEIGHT = 0.05

    def __init__(self) -> None:
        self.alpha = PRIOR_ALPHA

    def update(self, proposed: int, accepted: int) -> None:
        self.alpha = update_alpha(self.alpha, proposed, accepted, self.WEIGHT)
