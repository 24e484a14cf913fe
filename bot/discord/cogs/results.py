"""Acting on a result: its buttons and reactions (vary, reroll, upscale, details, delete), a grid's
U/V/reroll-all buttons, a waiting job's Cancel, and the remix modal. Whoever clicks pays; delete
and cancel are for the requester or an admin."""
from __future__ import annotations

import asyncio
import time

import discord
from discord.ext import commands

from ...core.access import find
from ...core.models import JobRecord, Refusal, Requester
from ..context import is_admin, of_interaction, requester
from ..delivery import CANCELLED, Delivery, Run
from ..errors import Refused, on_command_error, tell_privately
from ..views import OUTPAINTS, REMIXABLE, action_for_emoji, details_text


class Results(commands.Cog):
    def __init__(self, bot: commands.Bot, delivery: Delivery):
        self.bot, self.delivery = bot, delivery
        self.app, self.settings = delivery.app, delivery.settings

    def action(self, action: str, job: JobRecord, who: Requester, prompt: str | None = None) -> Run:
        """The service call a click, a reaction or a remix makes, charged to whoever clicked;
        `prompt` replaces the job's (a remix)."""
        service = self.app.service
        if action in OUTPAINTS:
            return lambda on_event: _one(service.outpaint(job.id, who, action, on_event))
        if action in ("variation", "subtle", "strong"):
            strength = {"subtle": self.settings.vary_subtle, "strong": self.settings.vary_strong}.get(action)
            return lambda on_event: _one(service.vary(job.id, who, on_event, strength=strength, prompt=prompt))
        if action == "reroll":
            return lambda on_event: _one(service.reroll(job.id, who, on_event, prompt=prompt))
        call = {"upscale": service.upscale, "enhance": service.enhance_again}[action]
        return lambda on_event: _one(call(job.id, who, on_event))

    async def on_result_action(self, interaction: discord.Interaction, action: str, job_id: int) -> None:
        if action == "cancel":
            await self.cancel(interaction, job_id)
            return
        if not await self.delivery.gatekeep(interaction):
            return
        started = time.monotonic()
        job = await self.app.results.job(job_id)
        if job is None:
            raise Refused(f"job {job_id} no longer exists")
        if action == "delete":
            await self._delete(interaction, job)
            return
        if action == "details":
            await self.details(interaction, job_id)
            return
        prefs = await self.app.accounts.user_settings(str(interaction.user.id))  # the clicker's
        if prefs.remix and action in REMIXABLE:
            await interaction.response.send_modal(RemixModal(self, action, job))
            return
        await self.run(interaction, self.action(action, job, of_interaction(interaction)), started)

    async def run(self, interaction: discord.Interaction, run: Run, started: float, *, grid: bool = False) -> None:
        """Acknowledge (privately, if the member asked for that) and deliver what `run` makes."""
        prefs = await self.app.accounts.user_settings(str(interaction.user.id))
        await self.delivery.defer(interaction, private=prefs.private)
        await self.delivery.for_interaction(interaction, run, private=prefs.private, started=started, grid=grid)

    async def on_reroll_all(self, interaction: discord.Interaction, job_ids: list[int]) -> None:
        """A grid's 🔁: all its images again with new seeds, as a new grid."""
        if not await self.delivery.gatekeep(interaction):
            return
        started, who = time.monotonic(), of_interaction(interaction)
        await self.run(interaction, lambda on_event: self.app.service.reroll_all(job_ids, who, on_event),
                       started, grid=True)

    async def details(self, interaction: discord.Interaction, job_id: int) -> None:
        """📋: the job's parameters and the lines that make it again, for the member alone."""
        try:
            job = await asyncio.to_thread(find, self.app.jobs, job_id, of_interaction(interaction))
        except Refusal as exc:
            raise Refused(str(exc), exc.code) from None
        await interaction.response.send_message(details_text(job, self.app.budgets.money.text), ephemeral=True)

    async def cancel(self, interaction: discord.Interaction, job_id: int) -> None:
        """❌: stop a waiting or running job of the member's (an admin: anyone's); it is refunded."""
        job = await self.app.results.job(job_id)
        if job is None or (str(interaction.user.id) != job.user_id and not is_admin(interaction.user, self.settings)):
            raise Refused("only the person who asked for this job, or an admin, can cancel it")
        if not (self.delivery.cancel(job_id) or await self.app.service.cancel(job_id)):
            raise Refused(f"job {job_id} is no longer waiting or running")
        await tell_privately(interaction, f"{CANCELLED} (job {job_id})")

    async def _delete(self, interaction: discord.Interaction, job: JobRecord) -> None:
        if str(interaction.user.id) != job.user_id and not is_admin(interaction.user, self.settings):
            raise Refused("only the person who asked for this image, or an admin, can delete it")
        # For a button, the "original response" is the message the button is on; deleting it
        # through the interaction's webhook reaches private results too.
        await interaction.response.defer()
        await interaction.delete_original_response()
        await self.app.results.delivered(job.id, None)

    @commands.Cog.listener()
    async def on_raw_reaction_add(self, payload: discord.RawReactionActionEvent) -> None:
        me = self.bot.user
        if not self.delivery.accepting or me is None or payload.user_id == me.id:
            return
        action = action_for_emoji(payload.emoji.name or "")
        if action is None:
            return
        job = await self.app.results.for_message(str(payload.message_id))
        if job is None:
            return
        channel = self.bot.get_channel(payload.channel_id) or self.bot.get_partial_messageable(payload.channel_id)
        if action == "delete":
            if str(payload.user_id) == job.user_id or is_admin(payload.member, self.settings):
                await channel.get_partial_message(payload.message_id).delete()  # type: ignore[union-attr]
                await self.app.results.delivered(job.id, None)
            return
        who = requester(payload, payload.user_id, channel, payload.member)
        await self.delivery.in_channel(channel, payload.user_id, self.action(action, job, who),
                                       payload.message_id, who.nsfw_channel)


class RemixModal(discord.ui.Modal):
    """Remix: the prompt to edit before a variation or reroll runs."""

    def __init__(self, cog: Results, action: str, job: JobRecord):
        super().__init__(title="Remix", timeout=15 * 60, custom_id=f"easel:remix:{action}:{job.id}")
        self.cog, self.action, self.job = cog, action, job
        self.prompt: discord.ui.TextInput = discord.ui.TextInput(
            label="Prompt", style=discord.TextStyle.paragraph, default=job.prompt[:4000], max_length=4000)
        self.add_item(self.prompt)

    async def on_submit(self, interaction: discord.Interaction) -> None:
        if not await self.cog.delivery.gatekeep(interaction):
            return
        started, who = time.monotonic(), of_interaction(interaction)
        await self.cog.run(interaction, self.cog.action(self.action, self.job, who, self.prompt.value), started)

    async def on_error(self, interaction: discord.Interaction, error: Exception) -> None:
        await on_command_error(interaction, error)


async def _one(outcome):
    return [await outcome]
