"""/budget for admins: show, set, grant, reset, report and the server's spending cap."""
from __future__ import annotations

from collections.abc import Awaitable
from typing import Literal

import discord
from discord import app_commands
from discord.ext import commands

from ...core.models import Adjustment, ErrorCode, Refusal, usd_to_micros
from ..context import is_admin
from ..delivery import Delivery
from ..errors import Refused
from .account import usd

Period = Literal["day", "week", "month"]


class Admin(commands.Cog):
    budget = app_commands.Group(name="budget", description="Budgets (admins)", guild_only=True,
                                default_permissions=discord.Permissions(manage_guild=True))

    def __init__(self, delivery: Delivery):
        self.app, self.settings = delivery.app, delivery.settings

    async def interaction_check(self, interaction: discord.Interaction) -> bool:  # type: ignore[override]
        if not is_admin(interaction.user, self.settings):
            command = getattr(interaction.command, "qualified_name", "") or ""
            what = {"moderation": "see the moderation log", "tips": "switch tips"}.get(command.split(" ")[0],
                                                                                       "manage budgets")
            raise Refused(f"only admins can {what}", ErrorCode.FORBIDDEN)
        return True

    @budget.command(name="show", description="A member's balance and spend")
    @app_commands.describe(user="the member", period="spend over this period (default: the budget period)")
    async def show(self, interaction: discord.Interaction, user: discord.Member, period: Period | None = None) -> None:
        await self._answer(interaction, user, period)

    @budget.command(name="set", description="Set a member's balance")
    @app_commands.describe(user="the member", amount="the new balance in USD")
    async def set_balance(self, interaction: discord.Interaction, user: discord.Member, amount: float) -> None:
        if amount < 0:
            raise Refused("/budget set needs an amount in USD (0 or more)")
        done = await self._adjusting(self.app.accounts.set_balance(str(user.id), usd_to_micros(amount),
                                                                   _actor(interaction)))
        await self._answer(interaction, user, did=done.describe())

    @budget.command(name="grant", description="Add to a member's balance")
    @app_commands.describe(user="the member", amount="USD to add (negative to take away)")
    async def grant(self, interaction: discord.Interaction, user: discord.Member, amount: float) -> None:
        done = await self._adjusting(self.app.accounts.grant(str(user.id), usd_to_micros(amount), _actor(interaction)))
        await self._answer(interaction, user, did=done.describe())

    @budget.command(name="reset", description="Put a member's balance back to the default allowance")
    @app_commands.describe(user="the member")
    async def reset(self, interaction: discord.Interaction, user: discord.Member) -> None:
        done = await self.app.accounts.reset(str(user.id), _actor(interaction))
        await self._answer(interaction, user, did=done.describe())

    @budget.command(name="report", description="Top spenders and spend per provider")
    @app_commands.describe(period="spend over this period (default: the budget period)")
    async def report(self, interaction: discord.Interaction, period: Period | None = None) -> None:
        guild = str(interaction.guild_id) if interaction.guild_id else None
        report = await self.app.accounts.report(guild, period)
        lines = [f"**Spend this {report.period}**"]
        lines += [f"{i}. <@{u}> {usd(m)}" for i, (u, m) in enumerate(report.top, 1)] or ["nobody has spent anything"]
        if report.by_provider:
            lines.append("**By provider** " + ", ".join(f"{p}: {usd(m)}" for p, m in sorted(report.by_provider.items())))
        if report.guild_cap_micros:
            lines.append(f"**Server cap** ${report.guild_cap_micros / 1e6:.2f} per {self.app.settings.budget.period}")
        await interaction.response.send_message("\n".join(lines), ephemeral=True)

    @budget.command(name="guild-cap", description="This server's spending cap per period (0: none)")
    @app_commands.describe(amount="USD per budget period; 0 removes the cap")
    async def guild_cap(self, interaction: discord.Interaction, amount: float) -> None:
        if amount < 0:
            raise Refused("/budget guild-cap needs an amount in USD (0 or more)")
        if interaction.guild_id is None:
            raise Refused("a guild cap is set in a server")
        cap = usd_to_micros(amount) if amount > 0 else None
        await self.app.accounts.set_guild_cap(str(interaction.guild_id), cap)
        text = (f"This server's spending cap is now ${amount:.2f} per {self.app.settings.budget.period}."
                if cap else "This server has no spending cap now.")
        await interaction.response.send_message(text, ephemeral=True)

    @staticmethod
    async def _adjusting(change: Awaitable[Adjustment]) -> Adjustment:
        try:
            return await change
        except Refusal as exc:
            raise Refused(str(exc), exc.code) from None

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

    async def _answer(self, interaction: discord.Interaction, user: discord.Member, period: str | None = None,
                      did: str | None = None) -> None:
        usage = await self.app.accounts.usage(str(user.id), period)
        b = usage.balance
        await interaction.response.send_message(
            (f"{did[0].upper()}{did[1:]}.\n" if did else "") + f"{user.mention}: balance {usd(b.balance_micros)}, available {usd(b.available_micros)}, "
            f"spent this {usage.period} {usd(usage.spent_micros)}",
            ephemeral=True, allowed_mentions=discord.AllowedMentions.none())


def _actor(interaction: discord.Interaction) -> str:
    return f"discord:{interaction.user.id}"
