"""What the ledger has recorded, read back: a member's history of entries, spend for reports
(per user, role, guild, provider, model and day) and spend alerts, each claimed once."""
from __future__ import annotations

from collections.abc import Callable

from bot.core.models import period_start
from bot.core.money import ALERT_THRESHOLDS, LedgerEntry, SpendAlert, Terms

from .db import Database
from .limits import charged_since


class SpendRecords:
    """Mixed into the Ledger: the queries over its tables."""

    db: Database
    terms: Terms
    clock: Callable[[], float]

    def history(self, user_id: str, limit: int = 50, before_id: int | None = None) -> list[LedgerEntry]:
        """The member's entries, newest first."""
        rows = self.db.query(
            "SELECT id, user_id, kind, amount_micros, held_micros, balance_after_micros, created_at, job_id,"
            " actor, reason FROM ledger_entries WHERE user_id = ? AND (? IS NULL OR id < ?)"
            " ORDER BY id DESC LIMIT ?",
            (user_id, before_id, before_id, limit),
        )
        return [LedgerEntry(*tuple(r)) for r in rows]

    def entry_sums(self, user_id: str) -> tuple[int, int]:
        """(sum of amounts, sum of held) over every entry of the member: their balance and what
        is held, derived from the entries alone."""
        row = self.db.query_one(
            "SELECT COALESCE(SUM(amount_micros), 0), COALESCE(SUM(held_micros), 0) FROM ledger_entries"
            " WHERE user_id = ?",
            (user_id,),
        )
        assert row is not None
        return row[0], row[1]

    def spent_since(self, user_id: str, since: float) -> int:
        row = self.db.query_one(
            "SELECT COALESCE(SUM(charged_micros), 0) FROM reservations"
            " WHERE user_id = ? AND state = 'settled' AND closed_at >= ?",
            (user_id, since),
        )
        assert row is not None
        return row[0]

    def top_spenders(self, since: float, limit: int = 10, guild_id: str | None = None) -> list[tuple[str, int]]:
        rows = self.db.query(
            "SELECT user_id, SUM(charged_micros) AS spent FROM reservations WHERE state = 'settled'"
            " AND closed_at >= ? AND (? IS NULL OR guild_id = ?) GROUP BY user_id HAVING spent > 0"
            " ORDER BY spent DESC LIMIT ?",
            (since, guild_id, guild_id, limit),
        )
        return [(r[0], r[1]) for r in rows]

    def spend_by_provider(self, since: float, guild_id: str | None = None) -> dict[str, int]:
        rows = self.db.query(
            "SELECT provider, SUM(charged_micros) FROM reservations WHERE state = 'settled'"
            " AND closed_at >= ? AND (? IS NULL OR guild_id = ?) GROUP BY provider",
            (since, guild_id, guild_id),
        )
        return {r[0]: r[1] for r in rows}

    def spend_rows(self, since: float, guild_id: str | None = None) -> list[tuple]:
        """One row per settled reservation since `since` that cost something: (user, roles
        (comma-separated), guild, provider, model, closed_at, charged)."""
        return [tuple(r) for r in self.db.query(
            "SELECT r.user_id, r.roles, r.guild_id, r.provider, j.model, r.closed_at, r.charged_micros"
            " FROM reservations r LEFT JOIN jobs j ON j.id = r.job_id WHERE r.state = 'settled'"
            " AND r.closed_at >= ? AND r.charged_micros > 0 AND (? IS NULL OR r.guild_id = ?)",
            (since, guild_id, guild_id),
        )]

    def claim_alerts(self, daily_cap_micros: int, guild_id: str | None = None,
                     guild_cap_micros: int | None = None) -> list[SpendAlert]:
        """The thresholds (50, 80, 100% of a cap) that spend has reached and no one was told of
        yet, claimed now: each is claimed once, in whatever process asks first, and the highest
        newly claimed per cap is returned. Joins the caller's transaction (call it after
        settling)."""
        t = self.clock()
        caps: list[tuple[str, int, float, str]] = []
        if daily_cap_micros:
            caps.append(("daily", daily_cap_micros, period_start("day", t), "paid"))
        if guild_id is not None and guild_cap_micros:
            caps.append((f"guild:{guild_id}", guild_cap_micros, period_start(self.terms.period, t), f"guild:{guild_id}"))
        alerts: list[SpendAlert] = []
        with self.db.transaction() as conn:
            for cap, cap_micros, since, scope in caps:
                spent = charged_since(conn, scope, since)
                newest = None  # of several thresholds passed at once, only the highest is told
                for threshold in ALERT_THRESHOLDS:
                    if spent * 100 < threshold * cap_micros:
                        break
                    claimed = conn.execute(
                        "INSERT OR IGNORE INTO spend_alerts (cap, period_start, threshold, spent_micros,"
                        " cap_micros, created_at) VALUES (?, ?, ?, ?, ?, ?)",
                        (cap, since, threshold, spent, cap_micros, t),
                    ).rowcount
                    if claimed:
                        newest = SpendAlert(cap, threshold, spent, cap_micros, since)
                if newest is not None:
                    alerts.append(newest)
        return alerts

