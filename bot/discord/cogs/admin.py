"""Admins' tools besides budgets (bot.discord.cogs.budget): the moderation log and tips."""
from __future__ import annotations

import discord
from discord import app_commands
from discord.ext import commands

from ...core.models import ErrorCode
from ..context import is_admin
from ..delivery import Delivery
from ..errors import Refused


class Admin(commands.Cog):
    def __init__(self, delivery: Delivery):
        self.app, self.settings = delivery.app, delivery.settings

    async def interaction_check(self, interaction: discord.Interaction) -> bool:  # type: ignore[override]
        if not is_admin(interaction.user, self.settings):
            command = getattr(interaction.command, "qualified_name", "") or ""
            what = {"moderation": "see the moderation log"}.get(command.split(" ")[0], "switch tips")
            raise Refused(f"only admins can {what}", ErrorCode.FORBIDDEN)
        return True

    moderation = app_commands.Group(name="moderation", description="Moderation (admins)", guild_only=True,
                                    default_permissions=discord.Permissions(manage_guild=True))

    @moderation.command(name="log", description="Recent blocked requests in this server")
    @app_commands.describe(limit="how many (1-25)")
    async def moderation_log(self, interaction: discord.Interaction,
                             limit: app_commands.Range[int, 1, 25] = 10) -> None:
        events = await self.app.results.moderation_log(str(interaction.guild_id), limit)
        lines = [f"**Blocked requests** (newest first, {len(events)})"] + [
            f"<t:{int(e.created_at)}:R> <@{e.user_id}> \u00b7 {e.stage} \u00b7 `{e.rule}`"
            + (f" \u00b7 job {e.job_id}" if e.job_id else "")
            + (f" \u00b7 ||{discord.utils.escape_markdown(e.prompt[:80])}||" if e.prompt else "")
            for e in events] if events else ["No blocked requests in this server."]
        await interaction.response.send_message("\n".join(lines), ephemeral=True,
                                                allowed_mentions=discord.AllowedMentions.none())

    @app_commands.command(name="tips", description="Tips for short prompts in this server (admins)")
    @app_commands.describe(on="give members tips for short prompts (at most one a day each)")
    @app_commands.guild_only()
    @app_commands.default_permissions(manage_guild=True)
    async def tips(self, interaction: discord.Interaction, on: bool) -> None:
        assert interaction.guild_id is not None
        await self.app.accounts.set_guild_tips(str(interaction.guild_id), on)
        await interaction.response.send_message(
            f"Tips for short prompts are {'on' if on else 'off'} in this server.", ephemeral=True)
