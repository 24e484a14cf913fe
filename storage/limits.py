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
        times = conn.execute(
            f"SELECT created_at FROM reservations WHERE {column} = ? AND created_at > ?"
            " AND state != 'released' ORDER BY created_at DESC LIMIT ?",
            (subject, now - HOUR, limit),
        ).fetchall()
        if len(times) >= limit:  # one more is allowed once the oldest of these is an hour old
            raise RateLimited(whose, limit, times[-1][0] + HOUR)


def check_guild_cap(conn: sqlite3.Connection, amount_micros: int, caps: Caps) -> None:
    if caps.guild_id is None or caps.guild_cap_micros is None:
        return
    if committed(conn, "guild_id = ?", (caps.guild_id,), caps.period_start) + amount_micros > caps.guild_cap_micros:
        raise GuildCapReached(caps.guild_cap_micros, caps.period_end)


def check_daily_cap(conn: sqlite3.Connection, amount_micros: int, caps: Caps) -> None:
    """Money really spent with providers today, by everyone (exempt members too)."""
    if not (caps.paid and caps.daily_cap_micros):
        return
    if committed(conn, "paid = 1", (), caps.day_start) + amount_micros > caps.daily_cap_micros:
        raise SpendCapReached(caps.daily_cap_micros, caps.day_end)


def check_count(conn: sqlite3.Connection, user_id: str, limit: int, period: str, now: float) -> None:
    made = conn.execute(
        "SELECT COUNT(*) FROM reservations WHERE user_id = ? AND counted = 1 AND state != 'released'"
        " AND created_at >= ?",
        (user_id, period_start(period, now)),
    ).fetchone()[0]
    if made >= limit:
        raise ImageLimitReached(limit, period_end(period, now))


def committed(conn: sqlite3.Connection, where: str, params: tuple, since: float) -> int:
    """Held now plus charged since `since`, of the reservations `where` selects."""
    return conn.execute(
        "SELECT COALESCE(SUM(CASE WHEN state = 'held' THEN amount_micros ELSE charged_micros END), 0)"
        f" FROM reservations WHERE {where} AND (state = 'held' OR (state = 'settled' AND closed_at >= ?))",
        (*params, since),
    ).fetchone()[0]
