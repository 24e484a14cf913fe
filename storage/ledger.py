"""The budget ledger: per-user balances, and reservations that hold money while a job runs.

Amounts are integer micro-dollars (1 USD = 1_000_000), so sums never drift. A job's cost is
*reserved* before any money is spent, then *settled* (charged) or *released* exactly once: each
step is one transaction, and a reservation can only leave the `held` state once, so money is
never lost or counted twice, even across concurrent writers or a crash.

Every movement is an append-only entry in `ledger_entries` (refill, lapse, grant, adjust,
reserve, settle, release): a balance is the sum of its entries' amounts and what is held the sum
of their `held_micros`; the `accounts` row keeps both sums at hand. Allowances refill lazily: the
first transaction that touches an account in a new period lapses and refills it (bot.core.money),
once, under SQLite's write lock, so concurrent requests and restarts can never refill twice.
"""
from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable

from bot.core.models import (
    Adjustment,
    Balance,
    Caps,
    InsufficientFunds,
    MemberBlocked,
    period_start,
)
from bot.core.money import Terms, period_end, periods_between, refill

from . import limits
from .budget_rules import is_exempt, member_allowance
from .db import Database
from .spend import SpendRecords


class Ledger(SpendRecords):
    def __init__(self, db: Database, terms: Terms | int = 0, clock: Callable[[], float] = time.time):
        self.db = db
        self.terms = terms if isinstance(terms, Terms) else Terms(default_allowance_micros=terms)
        self.clock = clock

    # -- accounts and entries -------------------------------------------------------------------

    def _account(self, conn: sqlite3.Connection, user_id: str) -> sqlite3.Row | None:
        return conn.execute(
            "SELECT balance_micros, reserved_micros, allowance_micros, period_start, blocked_at,"
            " blocked_reason FROM accounts WHERE user_id = ?",
            (user_id,),
        ).fetchone()

    def _refresh(self, conn: sqlite3.Connection, user_id: str, roles: tuple[str, ...] = ()) -> sqlite3.Row:
        """The account, made if new and refilled if a period began since it was last touched."""
        t, terms = self.clock(), self.terms
        start = period_start(terms.period, t)
        row = self._account(conn, user_id)
        if row is not None and row["period_start"] >= start:
            return row
        amount = member_allowance(conn, user_id, roles, terms.default_allowance_micros)
        if row is None:
            conn.execute(
                "INSERT INTO accounts (user_id, balance_micros, reserved_micros, allowance_micros,"
                " period_start, created_at, updated_at) VALUES (?, 0, 0, 0, ?, ?, ?)",
                (user_id, start, t, t),
            )
            done = refill(0, 0, amount, terms.carry_over_cap_micros, 1)
        else:
            missed = periods_between(terms.period, row["period_start"], t) if row["period_start"] else 1
            done = refill(row["allowance_micros"], row["reserved_micros"], amount,
                          terms.carry_over_cap_micros, max(missed, 1))
        conn.execute(
            "UPDATE accounts SET balance_micros = balance_micros + ?, allowance_micros = ?,"
            " period_start = ?, updated_at = ? WHERE user_id = ?",
            (done.refilled_micros - done.lapsed_micros, done.allowance_micros, start, t, user_id),
        )
        if done.lapsed_micros:
            self._entry(conn, user_id, "lapse", -done.lapsed_micros, reason="unspent allowance of the last period")
        if done.refilled_micros:
            self._entry(conn, user_id, "refill", done.refilled_micros, period=start,
                        reason=f"allowance for the {terms.period}")
        row = self._account(conn, user_id)
        assert row is not None
        return row

    def _entry(self, conn: sqlite3.Connection, user_id: str, kind: str, amount: int = 0, held: int = 0, *,
               job_id: int | None = None, actor: str | None = None, reason: str | None = None,
               period: float | None = None) -> None:
        balance = conn.execute("SELECT balance_micros FROM accounts WHERE user_id = ?", (user_id,)).fetchone()[0]
        conn.execute(
            "INSERT INTO ledger_entries (user_id, job_id, kind, amount_micros, held_micros,"
            " balance_after_micros, actor, reason, period_start, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (user_id, job_id, kind, amount, held, balance, actor, reason, period, self.clock()),
        )

    def balance(self, user_id: str, roles: tuple[str, ...] = ()) -> Balance:
        """The balance now (refilled first when a period began since it was last touched)."""
        row = self.db.query_one("SELECT balance_micros, reserved_micros, period_start FROM accounts"
                                " WHERE user_id = ?", (user_id,))
        if row is None or row[2] < period_start(self.terms.period, self.clock()):
            with self.db.transaction() as conn:
                row = self._refresh(conn, user_id, roles)
        return Balance(user_id, row[0], row[1])

    # -- reservations ----------------------------------------------------------------------------

    def reserve(self, user_id: str, job_id: int, amount_micros: int, caps: Caps | None = None,
                provider: str | None = None) -> Balance:
        """Hold `amount_micros` for `job_id`, or raise a BudgetRefusal and hold nothing.

        Every limit must fit: a block, the requests in flight, images per hour (the member's and
        the guild's), the guild's cap per period, the daily cap on paid generation, free images
        per period, and the member's balance. Members and roles exempt from limits skip all but
        the block, the requests in flight and the daily cap, and are not charged."""
        caps = caps or Caps()
        if amount_micros < 0:
            raise ValueError("a reservation cannot be negative")
        with self.db.transaction() as conn:
            account = self._account(conn, user_id)
            if account is not None and account["blocked_at"] is not None:
                raise MemberBlocked(account["blocked_reason"])
            exempt = is_exempt(conn, user_id, caps.roles)
            t = self.clock()
            if caps.max_requests:
                limits.check_in_flight(conn, user_id, caps)
            if not exempt:
                limits.check_rates(conn, user_id, caps, t)
                limits.check_guild_cap(conn, amount_micros, caps)
            limits.check_daily_cap(conn, amount_micros, caps)
            if caps.counted and caps.images_per_period and not exempt:
                limits.check_count(conn, user_id, caps.images_per_period, self.terms.period, t)
            account = self._refresh(conn, user_id, caps.roles)
            balance, reserved = account["balance_micros"], account["reserved_micros"]
            if not exempt and balance - reserved < amount_micros:
                refills = self.terms.default_allowance_micros or account["allowance_micros"]
                raise InsufficientFunds(user_id, balance - reserved, amount_micros,
                                        period_end(self.terms.period, self.clock()) if refills else None)
            conn.execute(
                "INSERT INTO reservations (job_id, user_id, guild_id, provider, paid, amount_micros,"
                " state, created_at, request_group, roles, counted, exempt)"
                " VALUES (?, ?, ?, ?, ?, ?, 'held', ?, ?, ?, ?, ?)",
                (job_id, user_id, caps.guild_id, provider, int(caps.paid), amount_micros, self.clock(),
                 caps.group, ",".join(caps.roles), int(caps.counted), int(exempt)),
            )
            held = 0 if exempt else amount_micros
            conn.execute("UPDATE accounts SET reserved_micros = reserved_micros + ?, updated_at = ?"
                         " WHERE user_id = ?", (held, self.clock(), user_id))
            self._entry(conn, user_id, "reserve", 0, held, job_id=job_id,
                        reason=f"exempt from limits: {amount_micros} micros not held" if exempt else None)
            return Balance(user_id, balance, reserved + held)

    def _close(self, conn: sqlite3.Connection, job_id: int) -> sqlite3.Row | None:
        return conn.execute(
            "SELECT user_id, amount_micros, exempt, paid, guild_id FROM reservations WHERE job_id = ?"
            " AND state = 'held'", (job_id,)
        ).fetchone()

    def settle(self, job_id: int, actual_micros: int, provider: str | None = None) -> int:
        """Charge the job's actual cost, at most what was reserved; returns the amount charged.
        `provider` records who really served it (a fallback may have). An exempt member's job
        records its cost but takes nothing from the balance.

        Settling a reservation that is no longer held charges nothing (idempotent)."""
        with self.db.transaction() as conn:
            row = self._close(conn, job_id)
            if row is None:
                return 0
            user_id, amount, exempt, paid_job, guild_id = row
            charged = max(0, min(actual_micros, amount))
            if charged:
                limits.add_charge(conn, bool(paid_job), guild_id, charged, self.clock())
            conn.execute(
                "UPDATE reservations SET state = 'settled', charged_micros = ?, closed_at = ?,"
                " provider = COALESCE(?, provider) WHERE job_id = ?",
                (charged, self.clock(), provider, job_id),
            )
            held, paid = (0, 0) if exempt else (amount, charged)
            conn.execute(
                "UPDATE accounts SET reserved_micros = reserved_micros - ?, balance_micros = balance_micros - ?,"
                " allowance_micros = MAX(allowance_micros - ?, 0), updated_at = ? WHERE user_id = ?",
                (held, paid, paid, self.clock(), user_id),
            )
            self._entry(conn, user_id, "settle", -paid, -held, job_id=job_id,
                        reason=f"exempt from limits: {charged} micros not charged" if exempt and charged else None)
            return charged

    def release(self, job_id: int) -> bool:
        """Give back a held reservation uncharged; False when it was not held (idempotent)."""
        with self.db.transaction() as conn:
            row = self._close(conn, job_id)
            if row is None:
                return False
            user_id, amount, exempt = row[:3]
            conn.execute("UPDATE reservations SET state = 'released', charged_micros = 0, closed_at = ?"
                         " WHERE job_id = ?", (self.clock(), job_id))
            held = 0 if exempt else amount
            conn.execute("UPDATE accounts SET reserved_micros = reserved_micros - ?, updated_at = ?"
                         " WHERE user_id = ?", (held, self.clock(), user_id))
            self._entry(conn, user_id, "release", 0, -held, job_id=job_id)
            return True

    def held_job_ids(self) -> list[int]:
        return [r[0] for r in self.db.query("SELECT job_id FROM reservations WHERE state = 'held'")]

    # -- admins' changes -------------------------------------------------------------------------

    def set_balance(self, user_id: str, amount_micros: int, actor: str | None = None,
                    reason: str | None = None) -> Adjustment:
        """Set the balance, but never below what running jobs hold (the available balance never
        goes below zero); the adjustment says what was done."""
        if amount_micros < 0:
            raise ValueError("a balance cannot be set below zero")
        with self.db.transaction() as conn:
            account = self._refresh(conn, user_id)
            old, held = account["balance_micros"], account["reserved_micros"]
            return self._adjust(conn, user_id, "adjust", amount_micros - old, max(amount_micros, held) - old,
                                actor, reason)

    def grant(self, user_id: str, amount_micros: int, actor: str | None = None,
              reason: str | None = None) -> Adjustment:
        """Add credit, which never lapses; a negative grant takes away at most what is available."""
        with self.db.transaction() as conn:
            account = self._refresh(conn, user_id)
            applied = max(amount_micros, -max(0, account["balance_micros"] - account["reserved_micros"]))
            return self._adjust(conn, user_id, "grant", amount_micros, applied, actor, reason)

    def _adjust(self, conn: sqlite3.Connection, user_id: str, kind: str, asked: int, applied: int,
                actor: str | None, reason: str | None) -> Adjustment:
        # Money taken away comes out of credit first: the allowance is never more than the balance.
        conn.execute(
            "UPDATE accounts SET balance_micros = balance_micros + ?,"
            " allowance_micros = MIN(allowance_micros, balance_micros + ?), updated_at = ? WHERE user_id = ?",
            (applied, applied, self.clock(), user_id),
        )
        self._entry(conn, user_id, kind, applied, actor=actor, reason=reason)
        balance, held = conn.execute(
            "SELECT balance_micros, reserved_micros FROM accounts WHERE user_id = ?", (user_id,)
        ).fetchone()
        return Adjustment(user_id, balance, held, asked_micros=asked, applied_micros=applied,
                          kind="set" if kind == "adjust" else kind)

    def reset(self, user_id: str, actor: str | None = None, roles: tuple[str, ...] = ()) -> Adjustment:
        """The allowance back to a full period's (what is left of it lapses, held money is kept);
        credit from grants is kept."""
        with self.db.transaction() as conn:
            account = self._refresh(conn, user_id, roles)
            amount = member_allowance(conn, user_id, roles, self.terms.default_allowance_micros)
            allowance, held = account["allowance_micros"], account["reserved_micros"]
            free = max(allowance - min(held, allowance), 0)
            conn.execute(
                "UPDATE accounts SET balance_micros = balance_micros + ?, allowance_micros = allowance_micros + ?,"
                " updated_at = ? WHERE user_id = ?",
                (amount - free, amount - free, self.clock(), user_id),
            )
            if free:
                self._entry(conn, user_id, "lapse", -free, actor=actor, reason="reset: the allowance left lapses")
            self._entry(conn, user_id, "refill", amount, actor=actor, reason="reset: a full allowance")
            balance, held = conn.execute(
                "SELECT balance_micros, reserved_micros FROM accounts WHERE user_id = ?", (user_id,)
            ).fetchone()
            return Adjustment(user_id, balance, held, asked_micros=amount - free, applied_micros=amount - free,
                              kind="reset")

    def set_blocked(self, user_id: str, blocked: bool, reason: str | None = None, actor: str | None = None) -> None:
        """Block (every request refused; `reason` is for admins) or unblock a member."""
        with self.db.transaction() as conn:
            self._refresh(conn, user_id)
            conn.execute(
                "UPDATE accounts SET blocked_at = ?, blocked_reason = ?, blocked_by = ? WHERE user_id = ?",
                (self.clock() if blocked else None, reason if blocked else None, actor if blocked else None, user_id),
            )
            self._entry(conn, user_id, "block" if blocked else "unblock", actor=actor, reason=reason)

    def blocked(self, user_id: str) -> str | None:
        """Why the member is blocked ("" when no reason was given); None when not blocked."""
        row = self.db.query_one("SELECT blocked_at, blocked_reason FROM accounts WHERE user_id = ?", (user_id,))
        return None if row is None or row[0] is None else (row[1] or "")
