"""The SQLite ledger's budgets: allowances that refill once per period (lapsing or carrying over),
grants on top, role and member allowances, rate limits, caps, free counted images, blocks,
exemptions, history, spend alerts, and the migration of older databases. Time is injected."""
from __future__ import annotations

import calendar
import sqlite3

import pytest

from bot.core.models import (
    Caps,
    GuildCapReached,
    ImageLimitReached,
    InsufficientFunds,
    MemberBlocked,
    RateLimited,
    SpendCapReached,
)
from bot.core.money import Terms
from storage.budget_rules import BudgetRules
from storage.db import MIGRATIONS, Database
from storage.ledger import Ledger

USD = 1_000_000
DEC_3 = calendar.timegm((2026, 12, 3, 12, 0, 0))
JAN_1 = calendar.timegm((2027, 1, 1, 0, 0, 0))
FEB_1 = calendar.timegm((2027, 2, 1, 0, 0, 0))


class Clock:
    def __init__(self, t: float = DEC_3):
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def db(tmp_path):
    database = Database(tmp_path / "easel.db")
    yield database
    database.close()


@pytest.fixture
def clock():
    return Clock()


def ledger_for(db, clock, allowance=USD, carry=0, period="month") -> Ledger:
    return Ledger(db, Terms(period, allowance, carry), clock)


def entries(db, user="ann") -> list[tuple]:
    return [tuple(r) for r in db.query(
        "SELECT kind, amount_micros, held_micros FROM ledger_entries WHERE user_id = ? ORDER BY id", (user,))]


def assert_derived(ledger: Ledger, user="ann") -> None:
    """The balance and what is held are exactly the sums of the member's entries."""
    b = ledger.balance(user)
    assert ledger.entry_sums(user) == (b.balance_micros, b.reserved_micros)


def test_the_unspent_allowance_lapses_at_the_boundary_and_refills_once(db, clock):
    ledger = ledger_for(db, clock)
    ledger.reserve("ann", 1, 300_000)
    ledger.settle(1, 300_000)
    assert ledger.balance("ann").available_micros == 700_000
    clock.t = JAN_1 + 5
    assert ledger.balance("ann").available_micros == USD  # 0.70 lapsed, 1.00 refilled
    assert ledger.balance("ann").available_micros == USD  # and only once
    second = ledger_for(db, clock)  # another process, or a restart
    second.reserve("ann", 2, 100_000)
    assert second.balance("ann").available_micros == 900_000
    assert [e[0] for e in entries(db)] == ["refill", "reserve", "settle", "lapse", "refill", "reserve"]
    assert entries(db)[3][1] == -700_000
    assert_derived(ledger)


def test_unspent_allowance_carries_over_up_to_the_cap(db, clock):
    ledger = ledger_for(db, clock, carry=500_000)
    ledger.reserve("ann", 1, 200_000)
    ledger.settle(1, 200_000)  # 0.80 left
    clock.t = JAN_1
    assert ledger.balance("ann").balance_micros == 500_000 + USD  # 0.50 carried, 0.30 lapsed
    clock.t = FEB_1 + 100
    assert ledger.balance("ann").balance_micros == 500_000 + USD  # the cap holds again
    assert_derived(ledger)


def test_missed_periods_carry_over_as_if_each_boundary_had_passed(db, clock):
    ledger = ledger_for(db, clock, allowance=100_000, carry=250_000, period="day")
    ledger.reserve("ann", 1, 100_000)
    ledger.settle(1, 100_000)  # nothing left today
    clock.t = DEC_3 + 10 * 86400  # ten days without a visit
    # Day by day: 0 -> carry 0.10 -> 0.20 -> 0.25 (capped) ...; plus today's 0.10.
    assert ledger.balance("ann").balance_micros == 250_000 + 100_000
    assert_derived(ledger)


def test_grants_never_lapse_and_spending_draws_on_the_allowance_first(db, clock):
    ledger = ledger_for(db, clock)
    ledger.grant("ann", 2 * USD, actor="cli:admin", reason="contest prize")
    ledger.reserve("ann", 1, 600_000)
    ledger.settle(1, 600_000)  # from the allowance: 0.40 of it left, credit untouched
    clock.t = JAN_1
    assert ledger.balance("ann").balance_micros == 2 * USD + USD
    ledger.reserve("ann", 2, 1_500_000)
    ledger.settle(2, 1_500_000)  # 1.00 allowance, then 0.50 of credit
    clock.t = FEB_1
    assert ledger.balance("ann").balance_micros == 1_500_000 + USD
    grant = [h for h in ledger.history("ann") if h.kind == "grant"]
    assert [(g.amount_micros, g.actor, g.reason) for g in grant] == [(2 * USD, "cli:admin", "contest prize")]
    assert_derived(ledger)


def test_money_held_across_a_boundary_is_kept_and_paid_from(db, clock):
    ledger = ledger_for(db, clock)
    ledger.reserve("ann", 1, 900_000)  # running when the month ends
    clock.t = JAN_1 + 1
    b = ledger.balance("ann")
    assert (b.balance_micros, b.reserved_micros) == (900_000 + USD, 900_000)  # 0.10 lapsed
    assert ledger.settle(1, 900_000) == 900_000
    assert ledger.balance("ann").available_micros == USD
    assert_derived(ledger)


def test_the_most_generous_role_wins_and_a_members_own_allowance_overrides(db, clock):
    rules, ledger = BudgetRules(db), ledger_for(db, clock)
    rules.set_allowance("role", "artists", 5 * USD, "admin")
    rules.set_allowance("role", "patrons", 20 * USD, "admin")
    rules.set_allowance("user", "carol", 2 * USD, "admin")
    assert ledger.balance("ann", ("artists", "patrons", "other")).balance_micros == 20 * USD
    assert ledger.balance("bob", ("artists",)).balance_micros == 5 * USD
    assert ledger.balance("carol", ("patrons",)).balance_micros == 2 * USD
    assert ledger.balance("dave").balance_micros == USD  # the settings' default
    rules.set_allowance("default", "", 3 * USD, "admin")
    assert ledger.balance("erin").balance_micros == 3 * USD  # an admin's default overrides it
    rules.set_allowance("user", "carol", None, "admin")
    assert rules.allowance_of("carol", ("patrons",), USD) == 20 * USD
    assert rules.allowances()[("role", "patrons")] == 20 * USD


def test_a_reset_gives_a_full_allowance_now_and_keeps_credit(db, clock):
    ledger = ledger_for(db, clock)
    ledger.grant("ann", USD)
    ledger.reserve("ann", 1, 400_000)
    ledger.settle(1, 400_000)
    done = ledger.reset("ann", actor="discord:1")
    assert done.describe().startswith("reset the allowance")
    assert ledger.balance("ann").balance_micros == 2 * USD
    assert_derived(ledger)


def test_images_per_hour_for_a_member_and_a_guild(db, clock):
    ledger = ledger_for(db, clock, allowance=10 * USD)
    caps = Caps(guild_id="g", user_images_per_hour=2, guild_images_per_hour=3)
    ledger.reserve("ann", 1, 1000, caps)
    clock.t += 600
    ledger.reserve("ann", 2, 1000, caps)
    with pytest.raises(RateLimited) as limited:
        ledger.reserve("ann", 3, 1000, caps)
    assert limited.value.resets_at == DEC_3 + 3600  # when the first of the two is an hour old
    assert "you have made 2 images in the last hour" in str(limited.value)
    ledger.release(2)  # a refunded job does not count
    ledger.reserve("ann", 3, 1000, caps)
    ledger.reserve("bob", 4, 1000, caps)
    with pytest.raises(RateLimited) as guild:
        ledger.reserve("carol", 5, 1000, caps)
    assert guild.value.whose == "the server's"
    clock.t = DEC_3 + 3601
    ledger.reserve("carol", 5, 1000, caps)  # the oldest left the hour


def test_caps_say_when_they_lift(db, clock):
    ledger = ledger_for(db, clock, allowance=10 * USD)
    caps = Caps(guild_id="g", guild_cap_micros=500_000, period_end=JAN_1, paid=True, daily_cap_micros=800_000,
                day_end=DEC_3 + 43200)
    ledger.reserve("ann", 1, 400_000, caps)
    with pytest.raises(GuildCapReached) as guild:
        ledger.reserve("bob", 2, 200_000, caps)
    assert guild.value.resets_at == JAN_1
    other = Caps(guild_id="h", guild_cap_micros=5 * USD, paid=True, daily_cap_micros=800_000, day_end=DEC_3 + 43200)
    ledger.reserve("bob", 3, 400_000, other)
    with pytest.raises(SpendCapReached) as daily:
        ledger.reserve("carol", 4, 1, other)
    assert daily.value.resets_at == DEC_3 + 43200


def test_an_empty_balance_says_when_it_refills(db, clock):
    ledger = ledger_for(db, clock)
    with pytest.raises(InsufficientFunds) as over:
        ledger.reserve("ann", 1, 2 * USD)
    assert over.value.resets_at == JAN_1
    assert ledger.balance("ann").reserved_micros == 0


def test_free_local_images_are_counted_not_charged(db, clock):
    ledger = ledger_for(db, clock, allowance=0)
    caps = Caps(counted=True, images_per_period=2)
    ledger.reserve("ann", 1, 0, caps)
    ledger.settle(1, 0)
    ledger.reserve("ann", 2, 0, caps)
    ledger.release(2)  # failed: it does not count
    ledger.reserve("ann", 3, 0, caps)
    with pytest.raises(ImageLimitReached) as done:
        ledger.reserve("ann", 4, 0, caps)
    assert done.value.resets_at == JAN_1 and "your 2 free images" in str(done.value)
    clock.t = JAN_1
    ledger.reserve("ann", 4, 0, caps)  # a new period, a new count


def test_a_blocked_member_is_refused_everything_until_unblocked(db, clock):
    ledger = ledger_for(db, clock)
    ledger.set_blocked("ann", True, reason="spamming the channel", actor="discord:1")
    assert ledger.blocked("ann") == "spamming the channel"
    with pytest.raises(MemberBlocked) as refused:
        ledger.reserve("ann", 1, 1)
    assert "spamming" not in str(refused.value) and refused.value.reason == "spamming the channel"
    assert db.query("SELECT COUNT(*) FROM reservations")[0][0] == 0
    ledger.set_blocked("ann", False, actor="discord:1")
    assert ledger.blocked("ann") is None
    ledger.reserve("ann", 1, 1)
    assert [e[0] for e in entries(db)][-3:] == ["block", "unblock", "reserve"]


def test_exempt_members_and_roles_skip_limits_and_are_not_charged(db, clock):
    rules, ledger = BudgetRules(db), ledger_for(db, clock, allowance=100)
    rules.set_exempt("role", "staff", True, "admin")
    rules.set_exempt("user", "bob", True, "admin")
    caps = Caps(roles=("staff",), user_images_per_hour=1, guild_id="g", guild_cap_micros=10)
    for job in (1, 2, 3):
        ledger.reserve("ann", job, 5 * USD, caps)  # over the balance, the rate and the guild cap
        assert ledger.settle(job, 5 * USD) == 5 * USD  # the cost is recorded...
    assert ledger.balance("ann", ("staff",)).balance_micros == 100  # ...but not charged
    assert ledger.spent_since("ann", 0) == 15 * USD
    ledger.reserve("bob", 4, 5 * USD)
    paid = Caps(paid=True, daily_cap_micros=USD)
    with pytest.raises(SpendCapReached):  # the operator's daily cap still applies
        ledger.reserve("bob", 5, 2 * USD, paid)
    rules.set_exempt("role", "staff", False, "admin")
    with pytest.raises(RateLimited):
        ledger.reserve("ann", 6, 5 * USD, caps)
    with pytest.raises(InsufficientFunds):
        ledger.reserve("ann", 6, 5 * USD, Caps(roles=("staff",)))
    assert_derived(ledger)
    assert_derived(ledger, "bob")


def test_spend_alerts_are_claimed_once_and_only_the_highest_is_told(db, clock):
    ledger, other = ledger_for(db, clock, allowance=10 * USD), ledger_for(db, clock, allowance=10 * USD)
    paid = Caps(paid=True, daily_cap_micros=USD)
    ledger.reserve("ann", 1, 550_000, paid)
    ledger.settle(1, 550_000)
    [alert] = ledger.claim_alerts(USD)
    assert (alert.cap, alert.threshold, alert.spent_micros) == ("daily", 50, 550_000)
    assert other.claim_alerts(USD) == []  # another process asks: already told
    ledger.reserve("bob", 2, 450_000, paid)
    ledger.settle(2, 450_000)
    assert [a.threshold for a in other.claim_alerts(USD)] == [100]  # 80 passed too, and is claimed
    assert ledger.claim_alerts(USD) == []
    clock.t += 86400  # a new day
    assert ledger.claim_alerts(USD) == []


def test_history_is_newest_first_with_who_and_why(db, clock):
    ledger = ledger_for(db, clock)
    ledger.grant("ann", 250_000, actor="cli:root", reason="bug bounty")
    ledger.reserve("ann", 7, 100_000)
    ledger.settle(7, 40_000)
    kinds = [(h.kind, h.amount_micros, h.held_micros, h.job_id) for h in ledger.history("ann")]
    assert kinds == [("settle", -40_000, -100_000, 7), ("reserve", 0, 100_000, 7), ("grant", 250_000, 0, None),
                     ("refill", USD, 0, None)]
    assert ledger.history("ann")[0].balance_after_micros == USD + 250_000 - 40_000
    assert len(ledger.history("ann", limit=2)) == 2


def test_a_database_from_before_keeps_every_balance_as_credit(tmp_path, clock):
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    for i, migration in enumerate(MIGRATIONS[:10]):
        conn.executescript(migration)
        conn.execute(f"PRAGMA user_version = {i + 1}")
    conn.execute("INSERT INTO accounts (user_id, balance_micros, reserved_micros, created_at, updated_at)"
                 " VALUES ('ann', 3500000, 200000, 0, 0)")
    conn.execute("INSERT INTO ledger_entries (user_id, kind, amount_micros, balance_after_micros, created_at)"
                 " VALUES ('ann', 'allowance', 1000000, 1000000, 0)")
    conn.execute("INSERT INTO reservations (job_id, user_id, amount_micros, state, created_at)"
                 " VALUES (1, 'ann', 200000, 'held', 0)")
    conn.commit()
    conn.close()
    db = Database(path)  # migrates
    try:
        ledger = ledger_for(db, clock)
        assert ledger.entry_sums("ann") == (3_500_000, 200_000)  # the opening entry made them agree
        b = ledger.balance("ann")  # first touch: this period's allowance on top of the old balance
        assert (b.balance_micros, b.reserved_micros) == (4_500_000, 200_000)
        assert ledger.settle(1, 150_000) == 150_000  # paid from the allowance first
        clock.t = JAN_1
        assert ledger.balance("ann").balance_micros == 4_500_000  # the allowance's 0.85 lapsed, not credit
        assert entries(db)[-2:] == [("lapse", -850_000, 0), ("refill", USD, 0)]
        assert_derived(ledger)
    finally:
        db.close()
