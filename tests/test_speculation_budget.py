"""How many drafts pay (speculation_budget.py): from step costs by rows and acceptance rates, no timing."""

from __future__ import annotations

import pytest

from kubeinfer.worker.speculation_budget import (EXPLORE_EVERY, PRIOR_ALPHA, StepCosts, choose_k, expected_tokens,
                                                 explore_k, recover_alpha, update_alpha)


def costs(**by_rows: float) -> StepCosts:
    c = StepCosts()
    c.seconds = {int(k[1:]): v for k, v in by_rows.items()}
    return c


def test_expected_tokens_is_the_target_token_plus_the_accepted_run():
    assert expected_tokens(0.5, 0) == 1.0
    assert expected_tokens(0.5, 3) == pytest.approx(1 + 0.5 + 0.25 + 0.125)
    assert expected_tokens(1.0, 4) == 5.0


def test_estimates_interpolate_and_extrapolate_from_measured_rows():
    c = costs(r1=1.0, r5=3.0)
    assert c.estimate(1) == 1.0 and c.estimate(3) == pytest.approx(2.0)
    assert c.estimate(7) == pytest.approx(4.0)  # the measured slope, 0.5 a row
    only_one = costs(r1=2.0)
    assert only_one.estimate(3) == pytest.approx(2.0 + 2 * 0.25 * 2.0)  # the optimistic prior
    assert StepCosts().estimate(4) is None
    c.observe(1, 2.0)
    assert c.estimate(1) == pytest.approx(1.1)  # a moving average, not the last value
    c.observe(1, 100.0)  # an outlier counts as three times the average
    assert c.estimate(1) == pytest.approx(1.1 + 0.1 * (3.3 - 1.1))


def test_expensive_rows_need_high_acceptance():
    """Rows that cost nearly a whole step each (the CPU's compute-bound GEMVs): drafts pay only when
    almost all are accepted."""
    cpu = costs(r1=1.0, r2=1.8, r3=2.6, r4=3.4, r5=4.2)
    assert choose_k(cpu, 1, 1.0, 0.6, 4) == 0
    assert choose_k(cpu, 1, 1.0, 0.99, 4) == 4


def test_cheap_rows_draft_at_moderate_acceptance():
    """Rows that cost little (a GPU, or a memory-bound step): many drafts pay at 60% acceptance."""
    gpu = costs(r1=1.0, r2=1.05, r5=1.2)
    assert choose_k(gpu, 1, 1.0, 0.6, 4) == 4
    assert choose_k(gpu, 1, 1.0, 0.0, 4) == 0  # nothing is ever accepted: not worth a row


def test_nothing_measured_drafts_the_most_and_no_room_drafts_none():
    assert choose_k(StepCosts(), 1, 1.0, 0.1, 3) == 3  # the first steps measure
    assert choose_k(costs(r1=1.0), 1, 1.0, 0.9, 0) == 0


def test_a_batch_prices_a_sequence_s_drafts_at_the_step_s_rows():
    """Two rows in the step already: three more cost what going from 2 to 5 rows costs."""
    c = costs(r1=1.0, r2=1.1, r5=1.4, r6=3.0)
    assert choose_k(c, 2, 2.0, 0.7, 3) == 3
    assert choose_k(c, 3, 3.0, 0.7, 3) == 2  # a sixth row would double the step


def test_acceptance_rate_updates_and_recovers():
    a = update_alpha(PRIOR_ALPHA, proposed=4, accepted=4)
    assert a > PRIOR_ALPHA
    b = update_alpha(PRIOR_ALPHA, proposed=4, accepted=0)
    assert b < PRIOR_ALPHA
    assert update_alpha(0.5, proposed=4, accepted=2) == pytest.approx(0.5 + 0.3 * (2 / 3 - 0.5))
    assert b < recover_alpha(b) < PRIOR_ALPHA


def test_a_draft_count_left_unmeasured_is_tried_again():
    """The trap explore_k breaks: a one-row step measured in a fast minute, then two-row steps in a
    slow one. Extrapolated from those two, 3-5 rows look too dear, so they would never run again."""
    c = StepCosts()
    c.observe(1, 0.010)
    for _ in range(EXPLORE_EVERY):
        c.observe(2, 0.022)
    assert choose_k(c, 1, 1.0, 0.95, 4) <= 1
    assert explore_k(c, 1, 4, since_last=EXPLORE_EVERY) == 4  # never measured: the longest drafts first
    assert explore_k(c, 1, 4, since_last=EXPLORE_EVERY // 4 - 1) is None  # at most one try per quarter
    c.observe(5, 0.030)
    assert explore_k(c, 1, 4, since_last=EXPLORE_EVERY) == 3
    c.observe(4, 0.028)
    c.observe(3, 0.025)
    assert explore_k(c, 1, 4, since_last=EXPLORE_EVERY) is None  # every size measured lately
    assert choose_k(c, 1, 1.0, 0.95, 4) == 4  # with fresh prices the drafts pay again
