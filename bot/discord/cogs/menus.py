"""Message context menus (right-click > Apps): Vary, Upscale and Details on an easel result, and
"Use as image for /edit" on any message with an image, which asks for the prompt in a modal."""
from __future__ import annotations

import discord
from discord import app_commands
from discord.ext import commands

from ...core.models import GenerationParams, JobRequest, Kind, size_text
from ..context import of_interaction
from ..delivery import Delivery
from ..errors import Refused, on_command_error


class Menus(commands.Cog):
    def __init__(self, bot: commands.Bot, delivery: Delivery):
        self.bot, self.delivery, self.app = bot, delivery, delivery.app
        self.menus = [app_commands.ContextMenu(name=name, callback=callback) for name, callback in (
            ("Vary", self.vary), ("Upscale", self.upscale), ("Details", self.details),
            ("Use as image for /edit", self.use_for_edit))]

    async def cog_load(self) -> None:
        for menu in self.menus:
            self.bot.tree.add_command(menu)

    async def cog_unload(self) -> None:
        for menu in self.menus:
            self.bot.tree.remove_command(menu.name, type=menu.type)

    async def _on_result(self, interaction: discord.Interaction, message: discord.Message, action: str) -> None:
        job = await self.app.results.for_message(str(message.id))
        if job is None:
            raise Refused("that message is not an easel result")
        await self.bot.get_cog("Results").on_result_action(interaction, action, job.id)  # type: ignore[union-attr]

    async def vary(self, interaction: discord.Interaction, message: discord.Message) -> None:
        await self._on_result(interaction, message, "variation")

    async def upscale(self, interaction: discord.Interaction, message: discord.Message) -> None:
        await self._on_result(interaction, message, "upscale")

    async def details(self, interaction: discord.Interaction, message: discord.Message) -> None:
        await self._on_result(interaction, message, "details")

    async def use_for_edit(self, interaction: discord.Interaction, message: discord.Message) -> None:
        images = [a for a in message.attachments if (a.content_type or "").startswith("image/")]
        if not images:
            raise Refused("that message has no image")
        limit = self.app.settings.generation.max_upload_bytes
        if images[0].size > limit:
            raise Refused(f"the image is {size_text(images[0].size)}; the limit is {size_text(limit)}")
        await interaction.response.send_modal(EditModal(self, images[0]))


class EditModal(discord.ui.Modal, title="Edit this image"):
    """The prompt for an edit of another message's image."""

    prompt: discord.ui.TextInput = discord.ui.TextInput(label="What to paint", style=discord.TextStyle.paragraph,
                                                        max_length=4000)

    def __init__(self, menus: Menus, image: discord.Attachment):
        super().__init__(timeout=15 * 60)
        self.menus, self.image = menus, image

    async def on_submit(self, interaction: discord.Interaction) -> None:
        delivery, app = self.menus.delivery, self.menus.app
        begun = await delivery.begin(interaction)
        if begun is None:
            return
        prefs, started = begun
        request = JobRequest(Kind.EDIT, of_interaction(interaction), GenerationParams(prompt=self.prompt.value),
                             image=await self.image.read(), defaults=prefs)

        async def run(on_event):
            return [await app.service.submit(request, on_event)]

        await delivery.for_interaction(interaction, run, private=prefs.private, started=started)

    async def on_error(self, interaction: discord.Interaction, error: Exception) -> None:
        await on_command_error(interaction, error)
