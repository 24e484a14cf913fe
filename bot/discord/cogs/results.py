"""Acting on a result: its buttons and reactions (vary, reroll, upscale, delete). Whoever clicks
pays; delete is for the requester or an admin."""
from __future__ import annotations

import time

import discord
from discord.ext import commands

from ...core.models import JobRecord, Requester
from ..context import is_admin, of_interaction, requester
from ..delivery import Delivery, Run
from ..errors import Refused
from ..views import OUTPAINTS, action_for_emoji


class Results(commands.Cog):
    def __init__(self, bot: commands.Bot, delivery: Delivery):
        self.bot, self.delivery = bot, delivery
        self.app, self.settings = delivery.app, delivery.settings

    def action(self, action: str, job: JobRecord, who: Requester) -> Run:
        """The service call a click or a reaction makes, charged to whoever clicked."""
        if action in OUTPAINTS:
            return lambda on_event: _one(self.app.service.outpaint(job.id, who, action, on_event))
        call = {"reroll": self.app.service.reroll, "variation": self.app.service.vary,
                "upscale": self.app.service.upscale, "enhance": self.app.service.enhance_again}[action]
        return lambda on_event: _one(call(job.id, who, on_event))

    async def on_result_action(self, interaction: discord.Interaction, action: str, job_id: int) -> None:
        if not await self.delivery.gatekeep(interaction):
            return
        started = time.monotonic()
        job = await self.app.results.job(job_id)
        if job is None:
            raise Refused(f"job {job_id} no longer exists")
        if action == "delete":
            await self._delete(interaction, job)
            return
        prefs = await self.app.accounts.user_settings(str(interaction.user.id))  # the clicker's
        await self.delivery.defer(interaction, private=prefs.private)
        run = self.action(action, job, of_interaction(interaction))
        await self.delivery.for_interaction(interaction, run, private=prefs.private, started=started)

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


async def _one(outcome):
    return [await outcome]
