"""/budget for admins: balances, allowances per period (default, role, member), grants, blocks,
exemptions, history, the server's cap and spend reports. Each calls one method of the core's
Budgets, the same ones `easel budget` calls."""
from __future__ import annotations

import asyncio
import io
from collections.abc import Awaitable
from typing import Literal, TypeVar

import discord
from discord import app_commands
from discord.ext import commands

from ...core.models import ErrorCode, Refusal
from ..context import is_admin, role_ids
from ..delivery import Delivery
from ..errors import Refused

Period = Literal["day", "week", "month"]
_T = TypeVar("_T")
NONE = discord.AllowedMentions.none()


class Budget(commands.Cog):
    budget = app_commands.Group(name="budget", description="Budgets (admins)", guild_only=True,
                                default_permissions=discord.Permissions(manage_guild=True))
    allowance = app_commands.Group(name="allowance", description="Allowances per period", parent=budget)

    def __init__(self, delivery: Delivery):
        self.app, self.settings = delivery.app, delivery.settings

    @property
    def money(self):
        return self.app.budgets.money

    async def interaction_check(self, interaction: discord.Interaction) -> bool:  # type: ignore[override]
        if not is_admin(interaction.user, self.settings):
            raise Refused("only admins can manage budgets", ErrorCode.FORBIDDEN)
        return True

    @budget.command(name="show", description="A member's balance, allowance, spend and state")
    @app_commands.describe(user="the member")
    async def show(self, interaction: discord.Interaction, user: discord.Member) -> None:
        await self._answer(interaction, user)

    @budget.command(name="set", description="Set a member's balance")
    @app_commands.describe(user="the member", amount="the new balance (USD, or credits where shown so)")
    async def set_balance(self, interaction: discord.Interaction, user: discord.Member, amount: float) -> None:
        if amount < 0:
            raise Refused("/budget set needs an amount (0 or more)")
        done = await _core(self.app.budgets.set_balance(str(user.id), self.money.to_micros(amount), _actor(interaction)))
        await self._answer(interaction, user, did=done.describe())

    @budget.command(name="grant", description="Credit on top of the allowance (never lapses)")
    @app_commands.describe(user="the member", amount="to add (negative to take away)", reason="why, for the history")
    async def grant(self, interaction: discord.Interaction, user: discord.Member, amount: float,
                    reason: str | None = None) -> None:
        done = await _core(self.app.budgets.grant(str(user.id), self.money.to_micros(amount), _actor(interaction),
                                                  reason))
        await self._answer(interaction, user, did=done.describe())

    @budget.command(name="reset", description="A member's allowance back to a full period's (credit is kept)")
    @app_commands.describe(user="the member")
    async def reset(self, interaction: discord.Interaction, user: discord.Member) -> None:
        done = await self.app.budgets.reset(str(user.id), _actor(interaction), role_ids(user))
        await self._answer(interaction, user, did=done.describe())

    @allowance.command(name="set", description="The allowance per period: the default, a role's or a member's")
    @app_commands.describe(amount="per period; -1 removes a role's or a member's", role="for this role",
                           user="for this member (overrides their roles)")
    async def allowance_set(self, interaction: discord.Interaction, amount: float, role: discord.Role | None = None,
                            user: discord.Member | None = None) -> None:
        if role is not None and user is not None:
            raise Refused("give a role or a member, not both")
        scope, subject = ("role", str(role.id)) if role else ("user", str(user.id)) if user else ("default", "")
        if amount < 0 and (amount != -1 or scope == "default"):
            raise Refused("an allowance is 0 or more (-1 removes a role's or a member's)")
        await _core(self.app.budgets.set_allowance(scope, subject, None if amount < 0 else self.money.to_micros(amount),
                                                   _actor(interaction)))
        await self._allowances(interaction, "Done; it applies from the next refill (/budget reset applies it now).")

    @allowance.command(name="show", description="The default, roles' and members' allowances, and exemptions")
    async def allowance_show(self, interaction: discord.Interaction) -> None:
        await self._allowances(interaction)

    async def _allowances(self, interaction: discord.Interaction, did: str | None = None) -> None:
        a, text = await self.app.budgets.allowances(), self.money.text
        lines = [did] if did else []
        lines.append(f"**Default** {text(a.default_micros)} per {a.period}; unspent carries over up to "
                     f"{text(a.carry_over_cap_micros)}")
        lines += [f"<@&{r}> {text(m)}" for r, m in a.roles.items()]
        lines += [f"<@{u}> {text(m)}" for u, m in a.users.items()]
        if a.exempt_roles or a.exempt_users:
            lines.append("**Exempt from limits** " + ", ".join([f"<@&{r}>" for r in a.exempt_roles]
                                                              + [f"<@{u}>" for u in a.exempt_users]))
        await interaction.response.send_message("\n".join(lines), ephemeral=True, allowed_mentions=NONE)

    @budget.command(name="block", description="Refuse every request of a member")
    @app_commands.describe(user="the member", reason="shown to admins only")
    async def block(self, interaction: discord.Interaction, user: discord.Member, reason: str | None = None) -> None:
        await self.app.budgets.block(str(user.id), reason, _actor(interaction))
        await self._answer(interaction, user, did="blocked them: every request of theirs is refused")

    @budget.command(name="unblock", description="Let a blocked member generate again")
    @app_commands.describe(user="the member")
    async def unblock(self, interaction: discord.Interaction, user: discord.Member) -> None:
        was = await self.app.budgets.unblock(str(user.id), _actor(interaction))
        await self._answer(interaction, user, did="unblocked them" if was else "they were not blocked")

    @budget.command(name="exempt", description="Exempt a member or a role from limits (the daily cap still applies)")
    @app_commands.describe(on="exempt (true) or not (false)", role="this role", user="this member")
    async def exempt(self, interaction: discord.Interaction, on: bool, role: discord.Role | None = None,
                     user: discord.Member | None = None) -> None:
        if (role is None) == (user is None):
            raise Refused("give a role or a member")
        scope, subject, mention = ("role", str(role.id), f"<@&{role.id}>") if role else (
            "user", str(user.id), f"<@{user.id}>")  # type: ignore[union-attr]
        await self.app.budgets.set_exempt(scope, subject, on, _actor(interaction))
        await interaction.response.send_message(
            f"{mention} {'is now' if on else 'is no longer'} exempt from limits.", ephemeral=True, allowed_mentions=NONE)

    @budget.command(name="history", description="A member's ledger entries, newest first")
    @app_commands.describe(user="the member", limit="how many (1-25)")
    async def history(self, interaction: discord.Interaction, user: discord.Member,
                      limit: app_commands.Range[int, 1, 25] = 15) -> None:
        entries, text = await self.app.budgets.history(str(user.id), limit), self.money.text
        lines = [f"**{user.mention}'s ledger** (newest first)"] + [
            f"<t:{int(e.created_at)}:f> `{e.kind}` {text(e.amount_micros)}"
            + (f" (held {text(e.held_micros)})" if e.held_micros else "")
            + f" \u2192 {text(e.balance_after_micros)}"
            + (f" \u00b7 job {e.job_id}" if e.job_id else "")
            + (f" \u00b7 by {_who(e.actor)}" if e.actor else "")
            + (f" \u00b7 {discord.utils.escape_markdown(e.reason[:80])}" if e.reason else "")
            for e in entries] if entries else [f"{user.mention} has no ledger entries."]
        await interaction.response.send_message("\n".join(lines)[:2000], ephemeral=True, allowed_mentions=NONE)

    @budget.command(name="report", description="Spend per member, role, provider, model and day, with a chart")
    @app_commands.describe(period="spend over this period (default: the budget period)")
    async def report(self, interaction: discord.Interaction, period: Period | None = None) -> None:
        from ...charts import spend_chart

        guild = str(interaction.guild_id) if interaction.guild_id else None
        report, text = await _core(self.app.budgets.report(guild, period)), self.money.text
        lines = [f"**Spend this {report.period}** {text(report.total_micros)}"]
        top = list(report.by["user"].items())[:10]
        lines += [f"{i}. <@{u}> {text(m)}" for i, (u, m) in enumerate(top, 1)] or ["nobody has spent anything"]
        for dimension, label in (("role", "By role"), ("provider", "By provider"), ("model", "By model")):
            rows = list(report.by[dimension].items())[:8]
            if rows:
                shown = ", ".join(f"{f'<@&{k}>' if dimension == 'role' else k}: {text(m)}" for k, m in rows)
                lines.append(f"**{label}** {shown}")
        if report.guild_cap_micros:
            lines.append(f"**Server cap** {text(report.guild_cap_micros)} per {report.period}")
        png = await asyncio.to_thread(spend_chart, report, self.money)
        await interaction.response.send_message("\n".join(lines)[:2000], ephemeral=True, allowed_mentions=NONE,
                                                file=discord.File(io.BytesIO(png), "spend.png"))

    @budget.command(name="guild-cap", description="This server's spending cap per period (0: none)")
    @app_commands.describe(amount="per budget period; 0 removes the cap")
    async def guild_cap(self, interaction: discord.Interaction, amount: float) -> None:
        if amount < 0:
            raise Refused("/budget guild-cap needs an amount (0 or more)")
        cap = self.money.to_micros(amount) if amount > 0 else None
        await _core(self.app.budgets.set_guild_cap(str(interaction.guild_id), cap))
        period = self.app.ledger.terms.period
        await interaction.response.send_message(
            f"This server's spending cap is now {self.money.text(cap)} per {period}." if cap
            else "This server has no spending cap now.", ephemeral=True)

    async def _answer(self, interaction: discord.Interaction, user: discord.Member, did: str | None = None) -> None:
        m, text = await self.app.budgets.member(str(user.id), role_ids(user)), self.money.text
        b = m.balance
        lines = [f"{did[0].upper()}{did[1:]}."] if did else []
        lines.append(f"{user.mention}: balance {text(b.balance_micros)}, available {text(b.available_micros)}, "
                     f"spent this {m.period} {text(m.spent_micros)}")
        lines.append(f"Allowance {text(m.allowance_micros)} per {m.period}, refills <t:{int(m.refills_at)}:R>"
                     + (" \u00b7 exempt from limits" if m.exempt else ""))
        if m.blocked is not None:
            lines.append("**Blocked**" + (f": {discord.utils.escape_markdown(m.blocked)}" if m.blocked else ""))
        await interaction.response.send_message("\n".join(lines), ephemeral=True, allowed_mentions=NONE)


async def _core(call: Awaitable[_T]) -> _T:
    try:
        return await call
    except Refusal as exc:
        raise Refused(str(exc), exc.code) from None


def _actor(interaction: discord.Interaction) -> str:
    return f"discord:{interaction.user.id}"


def _who(actor: str) -> str:
    return f"<@{actor[8:]}>" if actor.startswith("discord:") and actor[8:].isdigit() else f"`{actor}`"
