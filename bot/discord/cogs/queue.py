"""/queue: the member's own waiting and running jobs with their place and ETA; an admin sees the
whole queue by member. Each job listed has its Cancel button."""
from __future__ import annotations

import discord
from discord import app_commands
from discord.ext import commands

from ...core.models import QueueEntry
from ..context import is_admin
from ..delivery import Delivery
from ..views import ResultButton, eta_text

MAX_BUTTONS = 25  # five rows of five


def entry_line(entry: QueueEntry) -> str:
    where = "running" if entry.position is None else f"position {entry.position}{eta_text(entry.eta_s)}"
    return f"`{entry.job_id}` {entry.model or entry.provider} \u00b7 {where}"


def queue_text(entries: list[QueueEntry], *, by_user: bool) -> str:
    if not entries:
        return "Nothing is waiting or running." if by_user else "You have no jobs waiting or running."
    if not by_user:
        return "**Your jobs**\n" + "\n".join(entry_line(e) for e in entries)
    users: dict[str, list[QueueEntry]] = {}
    for entry in entries:
        users.setdefault(entry.user_id, []).append(entry)
    lines = [f"**The queue** ({len(entries)} job{'' if len(entries) == 1 else 's'})"]
    for user_id, theirs in users.items():
        lines.append(f"<@{user_id}>")
        lines += [f"\u2003{entry_line(e)}" for e in theirs]
    return "\n".join(lines)[:2000]


class Queue(commands.Cog):
    def __init__(self, delivery: Delivery):
        self.app, self.settings = delivery.app, delivery.settings

    @app_commands.command(name="queue", description="Your jobs waiting or running, with their place and ETA")
    async def queue(self, interaction: discord.Interaction) -> None:
        admin = is_admin(interaction.user, self.settings)
        entries = self.app.service.queue()
        if not admin:
            entries = [e for e in entries if e.user_id == str(interaction.user.id)]
        view = discord.ui.View(timeout=None)
        for entry in entries[:MAX_BUTTONS]:
            view.add_item(ResultButton("cancel", entry.job_id, label=f"Cancel {entry.job_id}"))
        await interaction.response.send_message(queue_text(entries, by_user=admin), view=view, ephemeral=True,
                                                allowed_mentions=discord.AllowedMentions.none())
