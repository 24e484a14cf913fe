"""What users and guilds chose: a user's defaults (model, aspect, private results) and a guild's
default model and spending cap."""
from __future__ import annotations

from bot.core.models import GuildSettings, UserSettings

from .db import Database, now


class Preferences:
    def __init__(self, db: Database):
        self.db = db

    def user(self, user_id: str) -> UserSettings:
        row = self.db.query_one("SELECT model, aspect, private FROM user_settings WHERE user_id = ?", (user_id,))
        if row is None:
            return UserSettings(user_id)
        return UserSettings(user_id, row[0], row[1], bool(row[2]))

    def users(self) -> list[UserSettings]:
        rows = self.db.query("SELECT user_id, model, aspect, private FROM user_settings")
        return [UserSettings(r[0], r[1], r[2], bool(r[3])) for r in rows]

    def set_user(self, settings: UserSettings) -> None:
        with self.db.transaction() as conn:
            conn.execute(
                "INSERT INTO user_settings (user_id, model, aspect, private, updated_at) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT(user_id) DO UPDATE SET model = excluded.model, aspect = excluded.aspect,"
                " private = excluded.private, updated_at = excluded.updated_at",
                (settings.user_id, settings.model, settings.aspect, int(settings.private), now()),
            )

    def guild(self, guild_id: str) -> GuildSettings:
        row = self.db.query_one(
            "SELECT default_model, spend_cap_micros FROM guild_settings WHERE guild_id = ?", (guild_id,))
        if row is None:
            return GuildSettings(guild_id)
        return GuildSettings(guild_id, row[0], row[1])

    def set_guild(self, settings: GuildSettings) -> None:
        with self.db.transaction() as conn:
            conn.execute(
                "INSERT INTO guild_settings (guild_id, default_model, spend_cap_micros, updated_at)"
                " VALUES (?, ?, ?, ?) ON CONFLICT(guild_id) DO UPDATE SET"
                " default_model = excluded.default_model, spend_cap_micros = excluded.spend_cap_micros,"
                " updated_at = excluded.updated_at",
                (settings.guild_id, settings.default_model, settings.spend_cap_micros, now()),
            )
