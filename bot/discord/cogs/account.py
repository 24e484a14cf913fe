"""A member's own account: /usage (balance, spend, recent jobs) and /settings (their defaults)."""
from __future__ import annotations

import discord
from discord import app_commands
from discord.ext import commands

from ...core.enhancing import NOT_SET_UP
from ...core.models import Refusal, micros_to_usd
from ..delivery import Delivery
from ..errors import Refused
from .generate import model_autocomplete


def usd(micros: int) -> str:
    return f"${micros_to_usd(micros):.4f}"


class Account(commands.Cog):
    def __init__(self, delivery: Delivery):
        self.app = delivery.app

    @app_commands.command(description="Your balance, spend this period and recent jobs")
    async def usage(self, interaction: discord.Interaction) -> None:
        usage = await self.app.accounts.usage(str(interaction.user.id))
        balance = usage.balance
        held = f" ({usd(balance.reserved_micros)} held for running jobs)" if balance.reserved_micros else ""
        lines = [f"**Balance** {usd(balance.available_micros)}{held}",
                 f"**Spent this {usage.period}** {usd(usage.spent_micros)}"]
        if usage.recent:
            lines.append("**Recent jobs**")
            lines += [f"`{j.id}` {j.status} \u00b7 {j.kind} \u00b7 {j.model or '-'} \u00b7 {usd(j.cost_micros)} \u00b7 "
                      f"{discord.utils.escape_markdown(j.prompt[:60])}" for j in usage.recent]
        await interaction.response.send_message("\n".join(lines), ephemeral=True)

    @app_commands.command(name="settings", description="Your defaults: model, aspect, private results")
    @app_commands.describe(model="a model, or 'default'", aspect="like 16:9, or 'default'",
                           private="only you see your results", enhance="expand every prompt with a chat model")
    @app_commands.autocomplete(model=model_autocomplete)
    async def settings_command(self, interaction: discord.Interaction, model: str | None = None,
                               aspect: str | None = None, private: bool | None = None,
                               enhance: bool | None = None) -> None:
        if enhance and not self.app.service.enhancer.available:
            raise Refused(NOT_SET_UP)
        try:
            updated = await self.app.accounts.change_settings(
                str(interaction.user.id), model=model, aspect=aspect, private=private, enhance=enhance)
        except Refusal as exc:
            raise Refused(str(exc), exc.code) from None
        await interaction.response.send_message(
            f"Your defaults: model **{updated.model or 'server default'}**, aspect "
            f"**{updated.aspect or 'model default'}**, results **{'private' if updated.private else 'public'}**"
            + (", prompts **enhanced**." if updated.enhance else "."),
            ephemeral=True)
