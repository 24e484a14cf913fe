"""The budget vocabulary: allowances that refill each period, the terms they refill by, ledger
entries, spend alerts, and money shown in dollars or in credits.

Pure data and arithmetic (standard library only); the SQLite ledger applies it inside its
transactions, the core and the front ends read it.

A member's balance has two parts. The *allowance* refills at each period boundary (UTC): what is
left of it lapses then, or carries over up to a cap. *Credit* (one-off grants) sits on top and
never lapses. Spending draws on the allowance first. Money held for running jobs is never lapsed.
"""

from __future__ import annotations

import calendar
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .models import MICROS_PER_USD, PERIODS, period_start

ENTRY_KINDS = ("refill", "lapse", "grant", "adjust", "reserve", "settle", "release")
ALERT_THRESHOLDS = (50, 80, 100)  # per cent of a cap; each posted once per period


def period_end(period: str, t: float) -> float:
    """The start (UTC) of the period after the one that contains `t`: when it refills."""
    start = period_start(period, t)
    if period == "day":
        return start + 86400
    if period == "week":
        return start + 7 * 86400
    g = time.gmtime(start)
    year, month = (g.tm_year + 1, 1) if g.tm_mon == 12 else (g.tm_year, g.tm_mon + 1)
    return calendar.timegm((year, month, 1, 0, 0, 0))


def periods_between(period: str, earlier: float, later: float, limit: int = 1000) -> int:
    """How many period boundaries lie after `earlier` up to `later` (at most `limit`)."""
    n, t = 0, period_start(period, earlier)
    while n < limit:
        t = period_end(period, t)
        if t > later:
            break
        n += 1
    return n


@dataclass(frozen=True)
class Terms:
    """What allowances refill by: the period, the default allowance (an admin's default, set in
    the database, overrides the settings'), the carry-over cap (0: the unspent part lapses)."""

    period: str = "month"
    default_allowance_micros: int = 0
    carry_over_cap_micros: int = 0

    def __post_init__(self) -> None:
        if self.period not in PERIODS:
            raise ValueError(f"unknown budget period {self.period!r}; periods: {', '.join(PERIODS)}")


@dataclass(frozen=True)
class Refill:
    lapsed_micros: int  # the unspent allowance that did not carry over (>= 0)
    refilled_micros: int  # added: the period's allowance (with carry-over of missed periods)
    allowance_micros: int  # the allowance part of the balance afterwards


def refill(allowance: int, reserved: int, amount: int, carry_cap: int, boundaries: int) -> Refill:
    """The allowance after `boundaries` (>= 1) period boundaries passed with no spending between,
    exactly as if they had passed one at a time.

    At each boundary held money is kept (jobs running across it are paid from the allowance
    first); of the free part at most `carry_cap` carries over, the rest lapses; then `amount` is
    added. The lapse is the first boundary's; what missed periods left is counted in the refill."""
    if boundaries < 1:
        raise ValueError("a refill needs at least one period boundary")
    reserved, current = max(reserved, 0), max(allowance, 0)
    lapsed = 0
    for i in range(min(boundaries, 1000)):
        held = min(reserved, current)
        free = current - held
        carried = min(free, carry_cap)
        if i == 0:
            lapsed = free - carried
        after = held + carried + amount
        if after == current and i:  # a steady state: further boundaries change nothing
            break
        current = after
    return Refill(lapsed, current - (max(allowance, 0) - lapsed), current)


def allowance_for(
    default_micros: int,
    roles: Iterable[str] = (),
    role_allowances: Mapping[str, int] | None = None,
    user_allowance: int | None = None,
) -> int:
    """A member's allowance per period: their own override, else the most generous of their
    roles' allowances, else the default."""
    if user_allowance is not None:
        return user_allowance
    given = [role_allowances[r] for r in roles if role_allowances and r in role_allowances]
    return max(given) if given else default_micros


@dataclass(frozen=True)
class LedgerEntry:
    """One movement, append-only: `amount_micros` changes the balance, `held_micros` what is
    held for running jobs; the balance is the sum of the amounts."""

    id: int
    user_id: str
    kind: str
    amount_micros: int
    held_micros: int
    balance_after_micros: int
    created_at: float
    job_id: int | None = None
    actor: str | None = None
    reason: str | None = None


@dataclass(frozen=True)
class SpendAlert:
    """A cap's spend passed `threshold` per cent this period (posted once)."""

    cap: str  # "daily" (all paid generation today) or "guild:<id>" (a guild's period)
    threshold: int
    spent_micros: int
    cap_micros: int
    period_start: float

    def describe(self, money: Money) -> str:
        what = (
            "today's paid generation" if self.cap == "daily" else f"server {self.cap[6:]}'s spend this period"
        )
        return (
            f"spend alert: {what} is at {self.spent_micros * 100 // max(self.cap_micros, 1)}% of its cap "
            f"({money.text(self.spent_micros)} of {money.text(self.cap_micros)}; passed {self.threshold}%)"
        )


def crossed(before: int, after: int, cap: int) -> list[int]:
    """The thresholds a change of spend from `before` to `after` passed."""
    if cap <= 0:
        return []
    return [t for t in ALERT_THRESHOLDS if before * 100 < t * cap <= after * 100]


@dataclass(frozen=True)
class Money:
    """Amounts as members see them: dollars, or credits of `credit_micros` each."""

    credit_micros: int = 0  # 0: dollars

    @property
    def unit(self) -> str:
        return "credits" if self.credit_micros else "USD"

    def text(self, micros: int) -> str:
        if not self.credit_micros:
            return f"{'-' if micros < 0 else ''}${abs(micros) / MICROS_PER_USD:.4f}"
        credits = micros / self.credit_micros
        shown = f"{credits:,.0f}" if credits == int(credits) else f"{credits:,.2f}"
        return f"{shown} credit{'' if abs(credits) == 1 else 's'}"

    def to_micros(self, amount: float) -> int:
        """An amount typed by an admin, in this unit."""
        return int(round(amount * (self.credit_micros or MICROS_PER_USD)))
