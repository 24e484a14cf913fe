"""/gallery: a member's link to their page of the web gallery, a signed link that takes one of
their images out of it, and hiding an image of the server (admins). Every answer is private."""
from __future__ import annotations

import asyncio

import discord
from discord import app_commands
from discord.ext import commands

from ...core.gallery import Gallery as GalleryService
from ...core.models import ErrorCode, JobRecord, Refusal
from ...gallery import build_gallery
from ..context import is_admin, job_reference
from ..delivery import Delivery
from ..errors import Refused

JOB_HELP = "the job number (see /usage) or a link to the result message"


class Gallery(commands.Cog):
    gallery = app_commands.Group(name="gallery", description="The web gallery of this server's images")

    def __init__(self, delivery: Delivery):
        self.app, self.settings = delivery.app, delivery.settings
        self.service: GalleryService | None = None

    async def cog_load(self) -> None:
        self.service = await asyncio.to_thread(build_gallery, self.app)  # may make the secret file

    @gallery.command(name="mine", description="The link to your page of the gallery")
    async def mine(self, interaction: discord.Interaction) -> None:
        service = self._service()
        lines = [f"Your images in the gallery: {service.member_url(str(interaction.user.id))}"]
        if interaction.guild_id:
            lines.append(f"This server's recent images: {service.guild_url(str(interaction.guild_id))}")
        lines.append("Only images posted where the channel sees them are listed; private results never are.")
        await interaction.response.send_message("\n".join(lines), ephemeral=True)

    @gallery.command(name="delete", description="A link that takes one of your images out of the gallery")
    @app_commands.describe(job=JOB_HELP)
    async def delete(self, interaction: discord.Interaction, job: str) -> None:
        record = await self._job(job)
        if record is None or record.user_id != str(interaction.user.id):
            raise Refused(f"you have no job {job.strip()}", ErrorCode.NOT_FOUND)
        link = self._service().delete_link(record)
        await interaction.response.send_message(
            f"This link takes job {record.id} out of the gallery; it works for a week, and only you can "
            f"see it: {link}", ephemeral=True)

    @gallery.command(name="hide", description="Take an image of this server out of the gallery (admins)")
    @app_commands.describe(job=JOB_HELP)
    async def hide(self, interaction: discord.Interaction, job: str) -> None:
        if interaction.guild_id is None or not is_admin(interaction.user, self.settings):
            raise Refused("only a server's admins can hide its images", ErrorCode.FORBIDDEN)
        record = await self._job(job)
        if record is None or record.guild_id != str(interaction.guild_id):
            raise Refused(f"this server has no job {job.strip()}", ErrorCode.NOT_FOUND)
        try:
            await self._service().hide(record.id, f"discord:{interaction.user.id}")
        except Refusal as exc:
            raise Refused(str(exc), exc.code) from None
        await interaction.response.send_message(f"Job {record.id} is hidden from the gallery.", ephemeral=True)

    async def _job(self, text: str) -> JobRecord | None:
        job_id, message_id = job_reference(text)
        if job_id is not None:
            return await self.app.results.job(job_id)
        if message_id is not None:
            return await self.app.results.for_message(message_id)
        raise Refused(f"give {JOB_HELP}")

    def _service(self) -> GalleryService:
        assert self.service is not None, "cog_load builds the gallery"
        return self.service
