"""Who gets what: allowances per period (the default, per role, per member) and members or roles
exempt from limits, as admins set them. The ledger reads them inside its own transactions
(`member_allowance`, `is_exempt`), so a change applies to the next reservation in any process."""
from __future__ import annotations

import sqlite3

from bot.core.money import allowance_for

from .db import Database, now

SCOPES = ("default", "role", "user")
EXEMPT_SCOPES = ("role", "user")


def member_allowance(conn: sqlite3.Connection, user_id: str, roles: tuple[str, ...], default: int) -> int:
    """The member's allowance per period: their own, else their most generous role's, else the
    admins' default, else the settings' `default`."""
    rows = conn.execute(
        "SELECT scope, subject_id, amount_micros FROM allowances WHERE (scope = 'user' AND subject_id = ?)"
        f" OR scope = 'default' OR (scope = 'role' AND subject_id IN ({','.join('?' * len(roles))}))",
        (user_id, *roles),
    ).fetchall()
    found = {(r[0], r[1]): r[2] for r in rows}
    return allowance_for(
        found.get(("default", ""), default),
        roles,
        {s: m for (scope, s), m in found.items() if scope == "role"},
        found.get(("user", user_id)),
    )


def is_exempt(conn: sqlite3.Connection, user_id: str, roles: tuple[str, ...]) -> bool:
    return conn.execute(
        "SELECT 1 FROM exemptions WHERE (scope = 'user' AND subject_id = ?)"
        f" OR (scope = 'role' AND subject_id IN ({','.join('?' * len(roles))})) LIMIT 1",
        (user_id, *roles),
    ).fetchone() is not None


class BudgetRules:
    def __init__(self, db: Database):
        self.db = db

    def set_allowance(self, scope: str, subject_id: str, amount_micros: int | None, actor: str | None) -> None:
        """The allowance per period of the default (subject ""), a role or a member; None
        removes it (a member or role then gets what the rest says)."""
        if scope not in SCOPES:
            raise ValueError(f"unknown allowance scope {scope!r}; scopes: {', '.join(SCOPES)}")
        if amount_micros is not None and amount_micros < 0:
            raise ValueError("an allowance cannot be negative")
        subject_id = "" if scope == "default" else subject_id
        with self.db.transaction() as conn:
            if amount_micros is None:
                conn.execute("DELETE FROM allowances WHERE scope = ? AND subject_id = ?", (scope, subject_id))
            else:
                conn.execute(
                    "INSERT INTO allowances (scope, subject_id, amount_micros, actor, updated_at)"
                    " VALUES (?, ?, ?, ?, ?) ON CONFLICT (scope, subject_id) DO UPDATE SET"
                    " amount_micros = excluded.amount_micros, actor = excluded.actor,"
                    " updated_at = excluded.updated_at",
                    (scope, subject_id, amount_micros, actor, now()),
                )

    def allowances(self) -> dict[tuple[str, str], int]:
        """(scope, subject) -> allowance per period, as admins set them."""
        rows = self.db.query("SELECT scope, subject_id, amount_micros FROM allowances ORDER BY scope, subject_id")
        return {(r[0], r[1]): r[2] for r in rows}

    def allowance_of(self, user_id: str, roles: tuple[str, ...], default: int) -> int:
        with self.db.transaction() as conn:
            return member_allowance(conn, user_id, roles, default)

    def set_exempt(self, scope: str, subject_id: str, exempt: bool, actor: str | None) -> None:
        if scope not in EXEMPT_SCOPES:
            raise ValueError(f"only a role or a user can be exempt, not {scope!r}")
        with self.db.transaction() as conn:
            if exempt:
                conn.execute(
                    "INSERT OR IGNORE INTO exemptions (scope, subject_id, actor, created_at) VALUES (?, ?, ?, ?)",
                    (scope, subject_id, actor, now()),
                )
            else:
                conn.execute("DELETE FROM exemptions WHERE scope = ? AND subject_id = ?", (scope, subject_id))

    def exemptions(self) -> list[tuple[str, str]]:
        return [(r[0], r[1]) for r in self.db.query("SELECT scope, subject_id FROM exemptions ORDER BY scope, subject_id")]

    def exempt(self, user_id: str, roles: tuple[str, ...] = ()) -> bool:
        with self.db.transaction() as conn:
            return is_exempt(conn, user_id, roles)
