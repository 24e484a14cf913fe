"""Budgets for every front end: a member's own view (/usage), the admins' tools (allowances per
role and member, grants, blocks, exemptions, the guild cap, history) and spend reports. Each
method runs its storage work in a worker thread; the CLI and Discord call the same ones."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from dataclasses import dataclass, replace
from typing import Any

from .models import (
    MAX_ADJUSTMENT_MICROS,
    PERIODS,
    Adjustment,
    Balance,
    ErrorCode,
    GuildSettings,
    JobRecord,
    Refusal,
    period_start,
)
from .money import LedgerEntry, Money, period_end
from .policy import Policy
from .ports import BudgetRules, Clock, JobStore, Ledger, Preferences

DIMENSIONS = ("user", "role", "guild", "provider", "model", "day")


@dataclass(frozen=True)
class MemberBudget:
    """What a member has: the balance, their allowance per period and when it refills, what
    they spent this period, whether they are blocked or exempt, and their last jobs."""

    user_id: str
    balance: Balance
    allowance_micros: int
    period: str
    refills_at: float
    spent_micros: int
    blocked: str | None  # the reason (for admins); None: not blocked
    exempt: bool
    recent: list[JobRecord]


@dataclass(frozen=True)
class Allowances:
    period: str
    default_micros: int  # what members without their own or a role's get
    from_settings: bool  # the default is the settings' (no admin has set one)
    carry_over_cap_micros: int
    roles: dict[str, int]
    users: dict[str, int]
    exempt_roles: list[str]
    exempt_users: list[str]


@dataclass(frozen=True)
class SpendReport:
    period: str
    since: float
    total_micros: int
    by: dict[str, dict[str, int]]  # dimension (DIMENSIONS) -> key -> micros, largest first
    daily_cap_micros: int
    guild_cap_micros: int | None


class Budgets:
    def __init__(
        self,
        policy: Policy,
        ledger: Ledger,
        rules: BudgetRules,
        jobs: JobStore,
        preferences: Preferences,
        clock: Clock,
    ):
        self.policy, self.ledger, self.rules = policy, ledger, rules
        self.jobs, self.preferences, self.clock = jobs, preferences, clock

    @property
    def money(self) -> Money:
        return self.policy.money

    def _period(self, period: str | None) -> tuple[str, float]:
        period = period or self.ledger.terms.period
        if period not in PERIODS:
            raise Refusal(ErrorCode.USAGE, f"unknown period {period!r}; periods: {', '.join(PERIODS)}")
        return period, period_start(period, self.clock.time())

    async def member(self, user_id: str, roles: tuple[str, ...] = (), recent: int = 5) -> MemberBudget:
        terms = self.ledger.terms
        now = self.clock.time()

        def read() -> MemberBudget:
            return MemberBudget(
                user_id,
                self.ledger.balance(user_id, roles),
                self.rules.allowance_of(user_id, roles, terms.default_allowance_micros),
                terms.period,
                period_end(terms.period, now),
                self.ledger.spent_since(user_id, period_start(terms.period, now)),
                self.ledger.blocked(user_id),
                self.rules.exempt(user_id, roles),
                self.jobs.list(user_id=user_id, limit=recent),
            )

        return await asyncio.to_thread(read)

    async def allowances(self) -> Allowances:
        terms = self.ledger.terms

        def read() -> Allowances:
            set_ = self.rules.allowances()
            exempt = self.rules.exemptions()
            default = set_.get(("default", ""))
            return Allowances(
                terms.period,
                terms.default_allowance_micros if default is None else default,
                default is None,
                terms.carry_over_cap_micros,
                {s: m for (scope, s), m in set_.items() if scope == "role"},
                {s: m for (scope, s), m in set_.items() if scope == "user"},
                [s for scope, s in exempt if scope == "role"],
                [s for scope, s in exempt if scope == "user"],
            )

        return await asyncio.to_thread(read)

    async def set_allowance(self, scope: str, subject_id: str, amount_micros: int | None, actor: str) -> None:
        """The allowance per period of the default, a role or a member (None: remove theirs).
        It applies from the next refill; `reset` applies it now."""
        if amount_micros is not None:
            if amount_micros < 0:
                raise Refusal(ErrorCode.USAGE, "an allowance cannot be negative")
            _check_amount(amount_micros)
        await asyncio.to_thread(self.rules.set_allowance, scope, subject_id, amount_micros, actor)

    async def set_balance(self, user_id: str, amount_micros: int, actor: str) -> Adjustment:
        """Never below zero, nor below what running jobs hold: the adjustment says what it did."""
        if amount_micros < 0:
            raise Refusal(ErrorCode.USAGE, "a budget cannot be set below zero")
        _check_amount(amount_micros)
        return await asyncio.to_thread(self.ledger.set_balance, user_id, amount_micros, actor)

    async def grant(
        self, user_id: str, amount_micros: int, actor: str, reason: str | None = None
    ) -> Adjustment:
        """Credit on top of the allowance, which never lapses; a negative grant takes away at
        most what is available."""
        _check_amount(amount_micros)
        return await asyncio.to_thread(self.ledger.grant, user_id, amount_micros, actor, reason)

    async def reset(self, user_id: str, actor: str, roles: tuple[str, ...] = ()) -> Adjustment:
        return await asyncio.to_thread(self.ledger.reset, user_id, actor, roles)

    async def block(self, user_id: str, reason: str | None, actor: str) -> None:
        await asyncio.to_thread(self.ledger.set_blocked, user_id, True, reason, actor)

    async def unblock(self, user_id: str, actor: str) -> bool:
        """False when the member was not blocked."""

        def change() -> bool:
            if self.ledger.blocked(user_id) is None:
                return False
            self.ledger.set_blocked(user_id, False, None, actor)
            return True

        return await asyncio.to_thread(change)

    async def set_exempt(self, scope: str, subject_id: str, exempt: bool, actor: str) -> None:
        if scope not in ("user", "role"):
            raise Refusal(ErrorCode.USAGE, "only a member or a role can be exempt")
        await asyncio.to_thread(self.rules.set_exempt, scope, subject_id, exempt, actor)

    async def history(self, user_id: str, limit: int = 20) -> list[LedgerEntry]:
        return await asyncio.to_thread(self.ledger.history, user_id, limit)

    async def set_guild_cap(self, guild_id: str, cap_micros: int | None) -> GuildSettings:
        """The guild's spending cap per budget period; None (or 0) removes it."""
        if cap_micros:
            _check_amount(cap_micros)

        def change() -> GuildSettings:
            current = self.preferences.guild(guild_id)
            updated = replace(current, spend_cap_micros=cap_micros or None)
            self.preferences.set_guild(updated)
            return updated

        return await asyncio.to_thread(change)

    async def report(self, guild_id: str | None, period: str | None = None) -> SpendReport:
        period, since = self._period(period)

        def read() -> SpendReport:
            rows = self.ledger.spend_rows(since, guild_id)
            cap = None
            if guild_id is not None:
                cap = (
                    self.preferences.guild(guild_id).spend_cap_micros or self.policy.guild_cap_micros or None
                )
            return SpendReport(
                period,
                since,
                sum(r[6] for r in rows),
                spend_by(rows),
                self.policy.daily_spend_cap_micros,
                cap,
            )

        return await asyncio.to_thread(read)


def spend_by(rows: list[tuple[Any, ...]]) -> dict[str, dict[str, int]]:
    """Rows (user, roles, guild, provider, model, closed_at, charged) summed per dimension; a
    job of a member with several roles counts for each of them."""
    sums: dict[str, dict[str, int]] = {d: defaultdict(int) for d in DIMENSIONS}
    for user, roles, guild, provider, model, closed_at, charged in rows:
        sums["user"][user] += charged
        for role in filter(None, (roles or "").split(",")):
            sums["role"][role] += charged
        sums["guild"][guild or "-"] += charged
        sums["provider"][provider or "-"] += charged
        sums["model"][model or "-"] += charged
        sums["day"][time.strftime("%Y-%m-%d", time.gmtime(closed_at))] += charged
    return {
        d: dict(sorted(v.items(), key=(lambda kv: kv[0]) if d == "day" else (lambda kv: (-kv[1], kv[0]))))
        for d, v in sums.items()
    }


def _check_amount(micros: int) -> None:
    if abs(micros) > MAX_ADJUSTMENT_MICROS:
        raise Refusal(
            ErrorCode.USAGE, f"an amount must be at most ${MAX_ADJUSTMENT_MICROS / 1e6:,.0f} either way"
        )
