"""The moderation log: every block, with who, where, at which stage and what decided it (the
prompt text only when the settings keep it)."""
from __future__ import annotations

from bot.core.models import ModerationEvent

from .db import Database

_COLUMNS = ("user_id", "guild_id", "channel_id", "job_id", "stage", "rule", "score", "prompt", "created_at",
            "review_sha256")


class ModerationLog:
    def __init__(self, db: Database):
        self.db = db

    def record(self, event: ModerationEvent) -> None:
        with self.db.transaction() as conn:
            conn.execute(
                f"INSERT INTO moderation_events ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})",
                tuple(getattr(event, c) for c in _COLUMNS),
            )

    def recent(
        self, *, user_id: str | None = None, guild_id: str | None = None, limit: int = 50
    ) -> list[ModerationEvent]:
        where = {"user_id": user_id, "guild_id": guild_id}
        clauses = [f"{column} = ?" for column, value in where.items() if value is not None]
        params = tuple(value for value in where.values() if value is not None)
        sql = f"SELECT {', '.join(_COLUMNS)} FROM moderation_events"
        if clauses:
            sql += " WHERE " + " AND ".join(clauses)
        rows = self.db.query(sql + " ORDER BY created_at DESC, id DESC LIMIT ?", params + (limit,))
        return [ModerationEvent(**dict(zip(_COLUMNS, row, strict=True))) for row in rows]

    def counts(self, since: float) -> dict[str, int]:
        rows = self.db.query(
            "SELECT rule, COUNT(*) FROM moderation_events WHERE created_at >= ? GROUP BY rule ORDER BY 2 DESC",
            (since,),
        )
        return {r[0]: r[1] for r in rows}

    def blocks_since(self, user_id: str, since: float) -> int:
        row = self.db.query_one(
            "SELECT COUNT(*) FROM moderation_events WHERE user_id = ? AND created_at >= ?", (user_id, since)
        )
        return int(row[0]) if row else 0
