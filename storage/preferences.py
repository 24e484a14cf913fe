"""What users and guilds chose: a user's defaults (model, aspect, private results, remix) and a guild's
default model and spending cap."""
from __future__ import annotations

from bot.core.models import GuildSettings, UserSettings

from .db import Database, now


class Preferences:
    def __init__(self, db: Database):
        self.db = db

    _USER = "SELECT user_id, model, aspect, private, enhance, tipped_at, remix FROM user_settings"

    def user(self, user_id: str) -> UserSettings:
        row = self.db.query_one(self._USER + " WHERE user_id = ?", (user_id,))
        return _user(row) if row else UserSettings(user_id)

    def users(self) -> list[UserSettings]:
        return [_user(r) for r in self.db.query(self._USER)]

    def set_user(self, settings: UserSettings) -> None:
        with self.db.transaction() as conn:
            conn.execute(
                "INSERT INTO user_settings (user_id, model, aspect, private, enhance, tipped_at, remix, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(user_id) DO UPDATE SET model = excluded.model,"
                " aspect = excluded.aspect, private = excluded.private, enhance = excluded.enhance,"
                " tipped_at = excluded.tipped_at, remix = excluded.remix, updated_at = excluded.updated_at",
                (settings.user_id, settings.model, settings.aspect, int(settings.private),
                 int(settings.enhance), settings.tipped_at, int(settings.remix), now()),
            )

    def guild(self, guild_id: str) -> GuildSettings:
        row = self.db.query_one(
            "SELECT default_model, spend_cap_micros, tips FROM guild_settings WHERE guild_id = ?", (guild_id,))
        if row is None:
            return GuildSettings(guild_id)
        return GuildSettings(guild_id, row[0], row[1], bool(row[2]))

    def set_guild(self, settings: GuildSettings) -> None:
        with self.db.transaction() as conn:
            conn.execute(
                "INSERT INTO guild_settings (guild_id, default_model, spend_cap_micros, tips, updated_at)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT(guild_id) DO UPDATE SET"
                " default_model = excluded.default_model, spend_cap_micros = excluded.spend_cap_micros,"
                " tips = excluded.tips, updated_at = excluded.updated_at",
                (settings.guild_id, settings.default_model, settings.spend_cap_micros, int(settings.tips), now()),
            )


def _user(row) -> UserSettings:
    return UserSettings(row[0], row[1], row[2], bool(row[3]), bool(row[4]), float(row[5]), bool(row[6]))
