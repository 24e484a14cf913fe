"""Property tests of the budget arithmetic and of the SQLite ledger: for any interleaving of
refills (time passing over period boundaries), grants, reservations, settlements, releases,
adjustments and resets, with restarts between them, the balance equals the sum of its entries,
no limit is exceeded, the ledger agrees with a simple model, and nothing is refilled twice."""
from __future__ import annotations

import calendar

from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule

from bot.core.models import BudgetRefusal, Caps, InsufficientFunds, period_start
from bot.core.money import Money, Terms, crossed, period_end, periods_between, refill
from storage.db import Database
from storage.ledger import Ledger

START = calendar.timegm((2026, 12, 30, 22, 0, 0))
amounts = st.integers(min_value=0, max_value=3_000_000)


@given(allowance=amounts, reserved=amounts, amount=amounts, cap=amounts, boundaries=st.integers(1, 40))
def test_a_catch_up_refill_equals_one_boundary_at_a_time(allowance, reserved, amount, cap, boundaries):
    reserved = min(reserved, allowance)
    at_once = refill(allowance, reserved, amount, cap, boundaries)
    step = refill(allowance, reserved, amount, cap, 1)
    for _ in range(boundaries - 1):  # nothing spent in between: the held money stays held
        step = refill(step.allowance_micros, reserved, amount, cap, 1)
    assert at_once.allowance_micros == step.allowance_micros
    assert at_once.lapsed_micros >= 0 and at_once.refilled_micros >= amount
    assert allowance - at_once.lapsed_micros + at_once.refilled_micros == at_once.allowance_micros
    assert at_once.allowance_micros <= reserved + cap + amount


@given(t=st.floats(min_value=0, max_value=4e9), period=st.sampled_from(["day", "week", "month"]))
def test_period_end_is_the_next_period_start(t, period):
    end = period_end(period, t)
    assert period_start(period, t) <= t < end
    assert period_start(period, end) == end
    assert periods_between(period, t, end) == 1 and periods_between(period, t, end - 1) == 0


@given(before=amounts, extra=amounts, cap=st.integers(1, 3_000_000))
def test_crossed_thresholds_are_those_between_before_and_after(before, extra, cap):
    passed = crossed(before, before + extra, cap)
    assert passed == [t for t in (50, 80, 100) if before * 100 < t * cap <= (before + extra) * 100]


@given(micros=st.integers(-10**12, 10**12), credit=st.sampled_from([0, 10_000, 1_000_000]))
def test_money_reads_back(micros, credit):
    money = Money(credit)
    text = money.text(micros)
    assert ("credit" in text) == bool(credit) and ("$" in text) == (not credit)
    if credit and micros % credit == 0:
        assert money.to_micros(float(micros // credit)) == micros


class LedgerMachine(RuleBasedStateMachine):
    """One member (and a second who shares nothing) against a model: allowance + credit."""

    held_jobs = Bundle("held_jobs")

    def __init__(self):
        super().__init__()
        self.t = START
        self.db = Database(":memory:")
        self.terms = Terms("day", 500_000, 200_000)
        self.ledger = Ledger(self.db, self.terms, lambda: self.t)
        self.next_job = 1
        self.model_allowance, self.model_credit = 500_000, 0
        self.model_held: dict[int, int] = {}
        self.touched_day = period_start("day", self.t)
        self.ledger.balance("ann")  # opens the account: the first refill

    def teardown(self):
        self.db.close()

    def _touch(self):
        """The model's lazy refill, one boundary at a time."""
        today = period_start("day", self.t)
        while self.touched_day < today:
            held = min(sum(self.model_held.values()), self.model_allowance)
            free = self.model_allowance - held
            self.model_allowance = held + min(free, self.terms.carry_over_cap_micros) + self.terms.default_allowance_micros
            self.touched_day = period_end("day", self.touched_day)

    @rule(hours=st.integers(0, 60))
    def time_passes(self, hours):
        self.t += hours * 3600

    @rule()
    def restart(self):
        self.ledger = Ledger(self.db, self.terms, lambda: self.t)

    @rule(target=held_jobs, amount=amounts)
    def reserve(self, amount):
        job, self.next_job = self.next_job, self.next_job + 1
        self._touch()
        available = self.model_allowance + self.model_credit - sum(self.model_held.values())
        try:
            self.ledger.reserve("ann", job, amount, Caps())
        except InsufficientFunds:
            assert amount > available
            return -1
        assert amount <= available
        self.model_held[job] = amount
        return job

    @rule(job=consumes(held_jobs), actual=amounts)
    def settle(self, job, actual):
        charged = self.ledger.settle(job, actual)
        if job not in self.model_held:
            assert charged == 0
            return
        self._touch()
        amount = self.model_held.pop(job)
        assert charged == min(actual, amount)
        from_allowance = min(self.model_allowance, charged)
        self.model_allowance -= from_allowance
        self.model_credit -= charged - from_allowance

    @rule(job=consumes(held_jobs))
    def release(self, job):
        assert self.ledger.release(job) == (job in self.model_held)
        self.model_held.pop(job, None)

    @rule(amount=st.integers(-2_000_000, 2_000_000))
    def grant(self, amount):
        self._touch()
        done = self.ledger.grant("ann", amount, actor="test")
        self.model_credit += done.applied_micros
        self._clip()

    @rule(amount=amounts)
    def adjust(self, amount):
        self._touch()
        done = self.ledger.set_balance("ann", amount, actor="test")
        self.model_credit += done.applied_micros
        self._clip()

    @rule()
    def reset(self):
        self._touch()
        held = min(sum(self.model_held.values()), self.model_allowance)
        self.ledger.reset("ann", actor="test")
        self.model_allowance = held + self.terms.default_allowance_micros

    def _clip(self):
        """Money taken away comes out of credit first; the allowance never exceeds the balance."""
        if self.model_credit < 0:
            self.model_allowance += self.model_credit
            self.model_credit = 0

    @invariant()
    def agrees_with_its_entries_and_the_model(self):
        b = self.ledger.balance("ann")
        self._touch()
        assert self.ledger.entry_sums("ann") == (b.balance_micros, b.reserved_micros)
        assert b.reserved_micros == sum(self.model_held.values())
        assert b.balance_micros == self.model_allowance + self.model_credit
        assert b.available_micros >= 0  # no limit exceeded, ever

    @invariant()
    def never_refilled_twice(self):
        rows = self.db.query("SELECT period_start, COUNT(*) FROM ledger_entries WHERE kind = 'refill'"
                             " AND period_start IS NOT NULL GROUP BY user_id, period_start")
        assert all(count == 1 for _, count in rows)
        assert self.db.query("SELECT COUNT(*) FROM accounts WHERE allowance_micros > balance_micros"
                             " OR allowance_micros < 0")[0][0] == 0


LedgerMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
test_ledger_interleavings = LedgerMachine.TestCase


def test_a_refusal_of_any_kind_holds_nothing():
    db = Database(":memory:")
    try:
        ledger = Ledger(db, Terms("day", 100, 0), lambda: START)
        for n, caps in enumerate((Caps(user_images_per_hour=1), Caps(paid=True, daily_cap_micros=1), Caps())):
            ledger.reserve("ann", 10 * n + 1, 60, Caps(paid=True))
            try:
                ledger.reserve("ann", 10 * n + 2, 50, caps)
                raise AssertionError("reserved past a limit")
            except BudgetRefusal:
                pass
            ledger.release(10 * n + 1)
            assert ledger.balance("ann").reserved_micros == 0
            assert db.query("SELECT COUNT(*) FROM reservations WHERE job_id = ?", (10 * n + 2,))[0][0] == 0
    finally:
        db.close()
