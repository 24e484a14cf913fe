"""Accounts: members' preferences (defaults, privacy, tips), for every front end (budgets are
bot.core.budgets').
Each method runs its storage work in a worker thread."""

from __future__ import annotations

import asyncio
from dataclasses import replace

from .advice import TIP_INTERVAL_S, tip_for
from .flags import FlagError, parse_aspect
from .models import (
    ErrorCode,
    GuildSettings,
    Refusal,
    UserSettings,
)
from .policy import Policy
from .ports import Clock, Preferences
from .routing import Router, UnknownModel

# A preference given as one of these goes back to the default.
CLEAR = ("default", "none", "")


class Accounts:
    def __init__(self, policy: Policy, preferences: Preferences, router: Router, clock: Clock):
        self.policy = policy
        self.preferences, self.router, self.clock = preferences, router, clock
        # Members' settings are read before every acknowledgement (privacy decides how to
        # acknowledge), so a bot loads them all once (`load_settings`) and keeps them here: no
        # thread hop and no wait behind job work on that hot path. Only this process changes
        # them (the bot owns /settings).
        self._settings: dict[str, UserSettings] = {}
        self._all_loaded = False

    async def load_settings(self) -> None:
        for settings in await asyncio.to_thread(self.preferences.users):
            self._settings[settings.user_id] = settings
        self._all_loaded = True

    async def user_settings(self, user_id: str) -> UserSettings:
        if user_id not in self._settings:
            read = (
                UserSettings(user_id)
                if self._all_loaded
                else await asyncio.to_thread(self.preferences.user, user_id)
            )
            self._settings.setdefault(user_id, read)
        return self._settings[user_id]

    async def change_settings(
        self,
        user_id: str,
        *,
        model: str | None = None,
        aspect: str | None = None,
        private: bool | None = None,
        enhance: bool | None = None,
        remix: bool | None = None,
    ) -> UserSettings:
        """Change what is given (a CLEAR word resets it); Refusal(USAGE) for a bad value."""
        try:
            if model is not None and model.lower() not in CLEAR:
                model = self.router.resolve(model).spec.name
            if aspect is not None and aspect.lower() not in CLEAR:
                parse_aspect(aspect)
        except (UnknownModel, FlagError) as exc:
            raise Refusal(ErrorCode.USAGE, str(exc)) from None

        def change() -> UserSettings:
            current = self.preferences.user(user_id)
            updated = replace(
                current,
                model=_pick(model, current.model),
                aspect=_pick(aspect, current.aspect),
                private=current.private if private is None else private,
                enhance=current.enhance if enhance is None else enhance,
                remix=current.remix if remix is None else remix,
            )
            if updated != current:
                self.preferences.set_user(updated)
            return updated

        self._settings[user_id] = await asyncio.to_thread(change)
        return self._settings[user_id]

    async def take_tip(
        self, user_id: str, guild_id: str | None, prompt: str, *, can_enhance: bool
    ) -> str | None:
        """The advice for a short prompt, if this member is due one (once a day, and not where
        the guild switched tips off); recorded as given."""
        tip = tip_for(prompt, self.policy.tip_under_words, can_enhance=can_enhance)
        if tip is None:
            return None
        now = self.clock.time()
        current = await self.user_settings(user_id)
        if now - current.tipped_at < TIP_INTERVAL_S:
            return None

        def record() -> UserSettings | None:
            if guild_id is not None and not self.preferences.guild(guild_id).tips:
                return None
            updated = replace(self.preferences.user(user_id), tipped_at=now)
            self.preferences.set_user(updated)
            return updated

        updated = await asyncio.to_thread(record)
        if updated is None:
            return None
        self._settings[user_id] = updated
        return tip

    async def set_guild_tips(self, guild_id: str, on: bool) -> GuildSettings:
        def change() -> GuildSettings:
            updated = replace(self.preferences.guild(guild_id), tips=on)
            self.preferences.set_guild(updated)
            return updated

        return await asyncio.to_thread(change)


def _pick(new: str | None, old: str | None) -> str | None:
    if new is None:
        return old
    return None if new.lower() in CLEAR else new
