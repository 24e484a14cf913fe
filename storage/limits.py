"""The limits a reservation must fit, checked inside the ledger's transaction (under SQLite's
write lock, so that no two processes can both take the last of one): requests in flight, images
per rolling hour, a guild's cap per period, the daily cap on paid generation, and free images
per period. Each raises the core's refusal, saying when the limit lifts."""
from __future__ import annotations

import sqlite3

from bot.core.models import (
    Caps,
    GuildCapReached,
    ImageLimitReached,
    RateLimited,
    SpendCapReached,
    TooManyRequests,
    period_start,
)
from bot.core.money import period_end

HOUR = 3600.0


def check_in_flight(conn: sqlite3.Connection, user_id: str, caps: Caps) -> None:
    """Other requests of this user holding money, in any process (one group counts once)."""
    in_flight = conn.execute(
        "SELECT COUNT(DISTINCT COALESCE(request_group, 'job:' || job_id)) FROM reservations"
        " WHERE user_id = ? AND state = 'held' AND (? IS NULL OR request_group IS NOT ?)",
        (user_id, caps.group, caps.group),
    ).fetchone()[0]
    if in_flight >= caps.max_requests:
        raise TooManyRequests(in_flight, caps.max_requests)


def check_rates(conn: sqlite3.Connection, user_id: str, caps: Caps, now: float) -> None:
    """Images per rolling hour, the member's and the guild's: what is held or charged counts, a
    refunded job does not."""
    for whose, column, subject, limit in (("your", "user_id", user_id, caps.user_images_per_hour),
                                          ("the server's", "guild_id", caps.guild_id, caps.guild_images_per_hour)):
        if not limit or subject is None:
            continue
        # The limit-th newest in the hour, if there are that many: one more is allowed once it
        # is an hour old. (The index covers the query: no row is read.)
        row = conn.execute(
            f"SELECT created_at FROM reservations WHERE {column} = ? AND created_at > ?"
            " AND state != 'released' ORDER BY created_at DESC LIMIT 1 OFFSET ?",
            (subject, now - HOUR, limit - 1),
        ).fetchone()
        if row is not None:
            raise RateLimited(whose, limit, row[0] + HOUR)


def check_guild_cap(conn: sqlite3.Connection, amount_micros: int, caps: Caps) -> None:
    if caps.guild_id is None or caps.guild_cap_micros is None:
        return
    if committed(conn, "+guild_id = ?", (caps.guild_id,), f"guild:{caps.guild_id}", caps.period_start) \
            + amount_micros > caps.guild_cap_micros:
        raise GuildCapReached(caps.guild_cap_micros, caps.period_end)


def check_daily_cap(conn: sqlite3.Connection, amount_micros: int, caps: Caps) -> None:
    """Money really spent with providers today, by everyone (exempt members too)."""
    if not (caps.paid and caps.daily_cap_micros):
        return
    if committed(conn, "+paid = 1", (), "paid", caps.day_start) + amount_micros > caps.daily_cap_micros:
        raise SpendCapReached(caps.daily_cap_micros, caps.day_end)


def check_count(conn: sqlite3.Connection, user_id: str, limit: int, period: str, now: float) -> None:
    made = conn.execute(
        "SELECT COUNT(*) FROM reservations WHERE user_id = ? AND counted = 1 AND state != 'released'"
        " AND created_at >= ?",
        (user_id, period_start(period, now)),
    ).fetchone()[0]
    if made >= limit:
        raise ImageLimitReached(limit, period_end(period, now))


def committed(conn: sqlite3.Connection, where: str, params: tuple, scope: str, since: float) -> int:
    """Held now by the reservations `where` selects, plus what `scope` was charged since `since`
    (a UTC day's start): a few rows read, however many jobs the period had. (`where` writes its
    column as `+column`, so that SQLite walks the few held rows by their state, not every paid
    or guild row.)"""
    held = conn.execute(
        f"SELECT COALESCE(SUM(amount_micros), 0) FROM reservations WHERE state = 'held' AND {where}", params
    ).fetchone()[0]
    return held + charged_since(conn, scope, since)


def charged_since(conn: sqlite3.Connection, scope: str, since: float) -> int:
    return conn.execute(
        "SELECT COALESCE(SUM(charged_micros), 0) FROM spend_days WHERE scope = ? AND day >= ?",
        (scope, day_of(since)),
    ).fetchone()[0]


def day_of(t: float) -> float:
    """The start of the UTC day of `t`."""
    return float(int(t // 86400) * 86400)


def add_charge(conn: sqlite3.Connection, paid: bool, guild_id: str | None, charged: int, t: float) -> None:
    """Count a settled charge in its day's totals (the paid total, the guild's)."""
    for scope in (["paid"] if paid else []) + ([f"guild:{guild_id}"] if guild_id is not None else []):
        conn.execute(
            "INSERT INTO spend_days (scope, day, charged_micros) VALUES (?, ?, ?) ON CONFLICT (scope, day)"
            " DO UPDATE SET charged_micros = charged_micros + excluded.charged_micros",
            (scope, day_of(t), charged),
        )
