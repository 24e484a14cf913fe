"""A member's own account: /usage (balance, spend, recent jobs) and /settings (their defaults)."""
from __future__ import annotations

import discord
from discord import app_commands
from discord.ext import commands

from ...core.enhancing import NOT_SET_UP
from ...core.models import Refusal
from ..context import role_ids
from ..delivery import Delivery
from ..errors import Refused
from .generate import model_autocomplete


class Account(commands.Cog):
    def __init__(self, delivery: Delivery):
        self.app = delivery.app

    @app_commands.command(description="Your allowance, what is left, when it refills, and your recent jobs")
    async def usage(self, interaction: discord.Interaction) -> None:
        m = await self.app.budgets.member(str(interaction.user.id), role_ids(interaction.user))
        text, b = self.app.budgets.money.text, m.balance
        held = f" ({text(b.reserved_micros)} held for running jobs)" if b.reserved_micros else ""
        lines = [f"**Available** {text(b.available_micros)}{held}"]
        if m.exempt:
            lines.append("You are exempt from limits.")
        else:
            lines.append(f"**Allowance** {text(m.allowance_micros)} per {m.period}, refills <t:{int(m.refills_at)}:R>")
        lines.append(f"**Spent this {m.period}** {text(m.spent_micros)}")
        if m.blocked is not None:
            lines.append("\U0001f6ab An admin has blocked you from generating images.")
        if m.recent:
            lines.append("**Recent jobs**")
            lines += [f"`{j.id}` {j.status} \u00b7 {j.kind} \u00b7 {j.model or '-'} \u00b7 {text(j.cost_micros)} \u00b7 "
                      f"{discord.utils.escape_markdown(j.prompt[:60])}" for j in m.recent]
        await interaction.response.send_message("\n".join(lines), ephemeral=True)

    @app_commands.command(name="settings", description="Your defaults: model, aspect, private results, remix")
    @app_commands.describe(model="a model, or 'default'", aspect="like 16:9, or 'default'",
                           private="only you see your results", enhance="expand every prompt with a chat model",
                           remix="vary and reroll let you edit the prompt first")
    @app_commands.autocomplete(model=model_autocomplete)
    async def settings_command(self, interaction: discord.Interaction, model: str | None = None,
                               aspect: str | None = None, private: bool | None = None,
                               enhance: bool | None = None, remix: bool | None = None) -> None:
        if enhance and not self.app.service.enhancer.available:
            raise Refused(NOT_SET_UP)
        try:
            updated = await self.app.accounts.change_settings(
                str(interaction.user.id), model=model, aspect=aspect, private=private, enhance=enhance, remix=remix)
        except Refusal as exc:
            raise Refused(str(exc), exc.code) from None
        await interaction.response.send_message(
            f"Your defaults: model **{updated.model or 'server default'}**, aspect "
            f"**{updated.aspect or 'model default'}**, results **{'private' if updated.private else 'public'}**"
            + (", prompts **enhanced**" if updated.enhance else "") + (", remix **on**." if updated.remix else "."),
            ephemeral=True)

