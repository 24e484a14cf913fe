"""The budget ledger: per-user balances, and reservations that hold money while a job runs.

Amounts are integer micro-dollars (1 USD = 1_000_000), so sums never drift. A job's cost is
*reserved* before any money is spent, then *settled* (charged) or *released* exactly once: each
step is one transaction, and a reservation can only leave the `held` state once, so money is
never lost or counted twice, even across concurrent writers or a crash.
"""
from __future__ import annotations

from bot.core.models import (
    Adjustment,
    Balance,
    Caps,
    GuildCapReached,
    InsufficientFunds,
    SpendCapReached,
    TooManyRequests,
)

from .db import Database, now


class Ledger:
    def __init__(self, db: Database, default_allowance_micros: int):
        self.db = db
        self.default_allowance_micros = default_allowance_micros

    def _ensure_account(self, conn, user_id: str) -> None:
        t = now()
        cur = conn.execute(
            "INSERT OR IGNORE INTO accounts (user_id, balance_micros, reserved_micros, created_at,"
            " updated_at) VALUES (?, ?, 0, ?, ?)",
            (user_id, self.default_allowance_micros, t, t),
        )
        if cur.rowcount:
            self._entry(conn, user_id, None, "allowance", self.default_allowance_micros, None)

    def _entry(self, conn, user_id, job_id, kind, amount, actor) -> None:
        balance = conn.execute(
            "SELECT balance_micros FROM accounts WHERE user_id = ?", (user_id,)
        ).fetchone()[0]
        conn.execute(
            "INSERT INTO ledger_entries (user_id, job_id, kind, amount_micros,"
            " balance_after_micros, actor, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (user_id, job_id, kind, amount, balance, actor, now()),
        )

    def balance(self, user_id: str) -> Balance:
        row = self.db.query_one(
            "SELECT balance_micros, reserved_micros FROM accounts WHERE user_id = ?", (user_id,)
        )
        if row is None:
            return Balance(user_id, self.default_allowance_micros, 0)
        return Balance(user_id, row[0], row[1])

    def reserve(self, user_id: str, job_id: int, amount_micros: int, caps: Caps | None = None,
                provider: str | None = None) -> Balance:
        """Hold `amount_micros` for `job_id`, or raise a BudgetRefusal and hold nothing.

        `caps.paid` marks money really spent with a provider: with a daily cap, the paid spend
        settled since `caps.day_start` plus what is held for paid jobs may not exceed it. With a
        guild cap, the same holds for the guild's spend since `caps.period_start`."""
        caps = caps or Caps()
        guild_id, guild_cap_micros = caps.guild_id, caps.guild_cap_micros
        paid, daily_cap_micros = caps.paid, caps.daily_cap_micros
        day_start, period_start = caps.day_start, caps.period_start
        if amount_micros < 0:
            raise ValueError("a reservation cannot be negative")
        with self.db.transaction() as conn:
            if caps.max_requests:
                # Other requests of this user holding money, in any process (one group: once).
                in_flight = conn.execute(
                    "SELECT COUNT(DISTINCT COALESCE(request_group, 'job:' || job_id)) FROM reservations"
                    " WHERE user_id = ? AND state = 'held' AND (? IS NULL OR request_group IS NOT ?)",
                    (user_id, caps.group, caps.group),
                ).fetchone()[0]
                if in_flight >= caps.max_requests:
                    raise TooManyRequests(in_flight, caps.max_requests)
            if guild_id is not None and guild_cap_micros is not None:
                committed = conn.execute(
                    "SELECT COALESCE(SUM(CASE WHEN state = 'held' THEN amount_micros"
                    " ELSE charged_micros END), 0) FROM reservations WHERE guild_id = ?"
                    " AND (state = 'held' OR (state = 'settled' AND closed_at >= ?))",
                    (guild_id, period_start),
                ).fetchone()[0]
                if committed + amount_micros > guild_cap_micros:
                    raise GuildCapReached(guild_cap_micros)
            if paid and daily_cap_micros:
                committed = conn.execute(
                    "SELECT COALESCE(SUM(CASE WHEN state = 'held' THEN amount_micros"
                    " ELSE charged_micros END), 0) FROM reservations WHERE paid = 1"
                    " AND (state = 'held' OR (state = 'settled' AND closed_at >= ?))",
                    (day_start,),
                ).fetchone()[0]
                if committed + amount_micros > daily_cap_micros:
                    raise SpendCapReached(daily_cap_micros)
            self._ensure_account(conn, user_id)
            balance, reserved = conn.execute(
                "SELECT balance_micros, reserved_micros FROM accounts WHERE user_id = ?",
                (user_id,),
            ).fetchone()
            if balance - reserved < amount_micros:
                raise InsufficientFunds(user_id, balance - reserved, amount_micros)
            conn.execute(
                "INSERT INTO reservations (job_id, user_id, guild_id, provider, paid, amount_micros,"
                " state, created_at, request_group) VALUES (?, ?, ?, ?, ?, ?, 'held', ?, ?)",
                (job_id, user_id, guild_id, provider, int(paid), amount_micros, now(), caps.group),
            )
            conn.execute(
                "UPDATE accounts SET reserved_micros = reserved_micros + ?, updated_at = ?"
                " WHERE user_id = ?",
                (amount_micros, now(), user_id),
            )
            return Balance(user_id, balance, reserved + amount_micros)

    def settle(self, job_id: int, actual_micros: int, provider: str | None = None) -> int:
        """Charge the job's actual cost, at most what was reserved; returns the amount charged.
        `provider` records who really served it (a fallback may have).

        Settling a reservation that is no longer held charges nothing (idempotent)."""
        with self.db.transaction() as conn:
            row = conn.execute(
                "SELECT user_id, amount_micros FROM reservations WHERE job_id = ? AND state = 'held'",
                (job_id,),
            ).fetchone()
            if row is None:
                return 0
            user_id, held = row
            charged = max(0, min(actual_micros, held))
            conn.execute(
                "UPDATE reservations SET state = 'settled', charged_micros = ?, closed_at = ?,"
                " provider = COALESCE(?, provider) WHERE job_id = ?",
                (charged, now(), provider, job_id),
            )
            conn.execute(
                "UPDATE accounts SET reserved_micros = reserved_micros - ?,"
                " balance_micros = balance_micros - ?, updated_at = ? WHERE user_id = ?",
                (held, charged, now(), user_id),
            )
            self._entry(conn, user_id, job_id, "charge", -charged, None)
            return charged

    def release(self, job_id: int) -> bool:
        """Give back a held reservation uncharged; False when it was not held (idempotent)."""
        with self.db.transaction() as conn:
            row = conn.execute(
                "SELECT user_id, amount_micros FROM reservations WHERE job_id = ? AND state = 'held'",
                (job_id,),
            ).fetchone()
            if row is None:
                return False
            user_id, held = row
            conn.execute(
                "UPDATE reservations SET state = 'released', charged_micros = 0, closed_at = ?"
                " WHERE job_id = ?",
                (now(), job_id),
            )
            conn.execute(
                "UPDATE accounts SET reserved_micros = reserved_micros - ?, updated_at = ?"
                " WHERE user_id = ?",
                (held, now(), user_id),
            )
            return True

    def held_job_ids(self) -> list[int]:
        return [r[0] for r in self.db.query("SELECT job_id FROM reservations WHERE state = 'held'")]

    def set_balance(self, user_id: str, amount_micros: int, actor: str | None = None) -> Adjustment:
        """Set the balance, but never below what running jobs hold (the available balance never
        goes below zero); the adjustment says what was done."""
        if amount_micros < 0:
            raise ValueError("a balance cannot be set below zero")
        with self.db.transaction() as conn:
            self._ensure_account(conn, user_id)
            old, held = conn.execute(
                "SELECT balance_micros, reserved_micros FROM accounts WHERE user_id = ?", (user_id,)
            ).fetchone()
            return self._adjust(conn, user_id, "set", amount_micros - old, max(amount_micros, held) - old, actor)

    def grant(self, user_id: str, amount_micros: int, actor: str | None = None) -> Adjustment:
        """Add to the balance; a negative grant takes away at most what is available."""
        with self.db.transaction() as conn:
            self._ensure_account(conn, user_id)
            balance, held = conn.execute(
                "SELECT balance_micros, reserved_micros FROM accounts WHERE user_id = ?", (user_id,)
            ).fetchone()
            applied = max(amount_micros, -max(0, balance - held))
            return self._adjust(conn, user_id, "grant", amount_micros, applied, actor)

    def _adjust(self, conn, user_id: str, kind: str, asked: int, applied: int, actor: str | None) -> Adjustment:
        conn.execute(
            "UPDATE accounts SET balance_micros = balance_micros + ?, updated_at = ? WHERE user_id = ?",
            (applied, now(), user_id),
        )
        self._entry(conn, user_id, None, kind, applied, actor)
        balance, held = conn.execute(
            "SELECT balance_micros, reserved_micros FROM accounts WHERE user_id = ?", (user_id,)
        ).fetchone()
        return Adjustment(user_id, balance, held, asked_micros=asked, applied_micros=applied, kind=kind)

    def reset(self, user_id: str, actor: str | None = None) -> Adjustment:
        """Back to the default allowance."""
        return self.set_balance(user_id, self.default_allowance_micros, actor)

    def top_spenders(self, since: float, limit: int = 10, guild_id: str | None = None) -> list[tuple[str, int]]:
        sql = ("SELECT user_id, SUM(charged_micros) AS spent FROM reservations"
               " WHERE state = 'settled' AND closed_at >= ?")
        params: tuple = (since,)
        if guild_id is not None:
            sql += " AND guild_id = ?"
            params += (guild_id,)
        sql += " GROUP BY user_id HAVING spent > 0 ORDER BY spent DESC LIMIT ?"
        return [(r[0], r[1]) for r in self.db.query(sql, params + (limit,))]

    def spend_by_provider(self, since: float, guild_id: str | None = None) -> dict[str, int]:
        sql = ("SELECT provider, SUM(charged_micros) FROM reservations"
               " WHERE state = 'settled' AND closed_at >= ?")
        params: tuple = (since,)
        if guild_id is not None:
            sql += " AND guild_id = ?"
            params += (guild_id,)
        return {r[0]: r[1] for r in self.db.query(sql + " GROUP BY provider", params)}

    def spent_since(self, user_id: str, since: float) -> int:
        row = self.db.query_one(
            "SELECT COALESCE(SUM(charged_micros), 0) FROM reservations"
            " WHERE user_id = ? AND state = 'settled' AND closed_at >= ?",
            (user_id, since),
        )
        return row[0]
