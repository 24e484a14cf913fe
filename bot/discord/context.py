"""Who is asking, from where: a core Requester from an interaction or a reaction, admin checks,
and turning a job number or a result link into a job id."""
from __future__ import annotations

import re

import discord

from ..config import DiscordSettings
from ..core.models import Requester
from .errors import Refused

MESSAGE_LINK = re.compile(r"https://(?:\w+\.)?discord(?:app)?\.com/channels/(?:\d+|@me)/\d+/(\d+)")
JOB_NUMBER = re.compile(r"(?:job\s*)?#?(\d{1,12})", re.I)


def channel_is_nsfw(channel) -> bool:
    is_nsfw = getattr(channel, "is_nsfw", None)
    return bool(is_nsfw()) if callable(is_nsfw) else bool(getattr(channel, "nsfw", False))


def role_ids(member) -> tuple[str, ...]:
    """A guild member's role ids (allowances and exemptions go by them); none in a DM."""
    return tuple(str(r.id) for r in getattr(member, "roles", None) or () if not getattr(r, "is_default", lambda: False)())


def requester(source: discord.Interaction | discord.RawReactionActionEvent, user_id: int, channel,
              member=None) -> Requester:
    guild_id = getattr(source, "guild_id", None)
    return Requester(str(user_id), str(guild_id) if guild_id else None,
                     str(channel.id) if channel is not None else None, channel_is_nsfw(channel),
                     roles=role_ids(member))


def of_interaction(interaction: discord.Interaction) -> Requester:
    return requester(interaction, interaction.user.id, interaction.channel, interaction.user)


def is_admin(member, settings: DiscordSettings) -> bool:
    roles = set(settings.admin_roles)
    if roles:
        return any(str(r.id) in roles or r.name in roles for r in getattr(member, "roles", []))
    perms = getattr(member, "guild_permissions", None)
    return bool(perms and perms.manage_guild)


def job_reference(text: str | None) -> tuple[int | None, str | None]:
    """(job id, None) from '17', 'job 17' or '#17'; (None, message id) from a link to a result
    message; (None, None) for nothing given (the member's last job)."""
    if not text or not text.strip():
        return None, None
    text = text.strip()
    if m := JOB_NUMBER.fullmatch(text):
        return int(m.group(1)), None
    if m := MESSAGE_LINK.fullmatch(text):
        return None, m.group(1)
    raise Refused("give a job number (like 17) or a link to a result message")
