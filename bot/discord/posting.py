"""Posting finished results: fitting an image within the upload limit, one message per image or
one grid for a request, the reaction buttons, and falling back to the channel (or a DM for a
private result) once the 15-minute interaction token has expired."""
from __future__ import annotations

import asyncio
import io
import logging
import time

import discord

from ..bootstrap import App
from ..core.gallery import page_link
from ..core.models import JobOutcome, JobRecord
from .grid import grid_png
from .views import REACTIONS, grid_embed, grid_view, result_embed, result_view

log = logging.getLogger(__name__)
# Interaction tokens last 15 minutes; past this age easel posts to the channel instead.
TOKEN_LIFETIME_S = 15 * 60 - 30


def token_expired(started: float) -> bool:
    return time.monotonic() - started > TOKEN_LIFETIME_S


def is_expired_token_error(exc: Exception) -> bool:
    # 50027: Invalid Webhook Token. A 404 Unknown Webhook / Interaction is the same for us.
    return isinstance(exc, discord.NotFound) or getattr(exc, "code", None) in (50027, 10015, 10062)


def image_file(job: JobRecord, data: bytes, limit_bytes: int, *, stem: str | None = None,
               spoiler: bool | None = None) -> tuple[discord.File, bool]:
    """The image as an attachment within `limit_bytes` (the interaction's own upload limit): the
    PNG itself, or a JPEG of it (then True: the embed links to the full image on easel's server)."""
    stem = stem or f"easel-{job.id}"
    name = f"SPOILER_{stem}" if (job.spoiler if spoiler is None else spoiler) else stem  # Discord blurs these
    if len(data) <= limit_bytes:
        return discord.File(io.BytesIO(data), filename=f"{name}.png"), False
    from PIL import Image

    img = Image.open(io.BytesIO(data)).convert("RGB")
    for quality, scale in ((90, 1.0), (80, 1.0), (80, 0.7), (70, 0.5), (60, 0.35)):
        frame = img if scale == 1.0 else img.resize((max(1, int(img.width * scale)), max(1, int(img.height * scale))))
        buf = io.BytesIO()
        frame.save(buf, format="JPEG", quality=quality, optimize=True)
        if buf.tell() <= limit_bytes:
            buf.seek(0)
            return discord.File(buf, filename=f"{name}.jpg"), True
    raise ValueError("the image cannot be made small enough to upload")


class ResultPoster:
    """Puts what a job made (or a word about it) in front of the member who asked."""

    def __init__(self, app: App):
        self.app = app

    async def tell(self, interaction: discord.Interaction, text: str, started: float) -> None:
        """A private word to the member; once the token has expired, a mention in the channel."""
        if not token_expired(started):
            try:
                await interaction.followup.send(text, ephemeral=True)
                return
            except discord.HTTPException as exc:
                if not is_expired_token_error(exc):
                    raise
        if interaction.channel is not None:
            await interaction.channel.send(f"<@{interaction.user.id}> {text}", delete_after=120,
                                           allowed_mentions=discord.AllowedMentions(users=True))

    async def parts(self, outcome: JobOutcome, limit: int, *, private: bool = False):
        """The attachment (within `limit` bytes), embed and buttons of one result."""
        assert outcome.job is not None
        [job] = await self.app.results.fresh([outcome.job])  # a bucket's presigned URL, made now
        data = await self.app.results.image(job)
        file, compressed = await asyncio.to_thread(image_file, job, data, limit)
        page = page_link(self.app.settings.storage.public_url, job, public=not private)
        embed = result_embed(job, outcome.balance_usd, file.filename, page or job.image_url)
        if compressed:
            embed.add_field(name="Full size", value=f"[{job.width}\u00d7{job.height} PNG]({job.image_url})",
                            inline=False)
        return file, embed, result_view(job, can_enhance=self.app.service.enhancer.available)

    async def grid(self, interaction: discord.Interaction, outcomes: list[JobOutcome], started: float,
                   *, private: bool) -> None:
        """The images of one request in one message: a grid, with U and V buttons for each."""
        jobs = await self.app.results.fresh([o.job for o in outcomes if o.job is not None])
        images = [await self.app.results.image(j) for j in jobs]
        sheet = await asyncio.to_thread(grid_png, images)
        file, _ = await asyncio.to_thread(image_file, jobs[0], sheet, interaction.filesize_limit,
                                          stem=f"easel-grid-{jobs[0].id}", spoiler=any(j.spoiler for j in jobs))
        embed = grid_embed(jobs, outcomes[-1].balance_usd, file.filename)
        message = await self._post(interaction, outcomes[0], started, file, embed, grid_view(jobs),
                                   private=private, first=True)
        for job in jobs:
            await self.app.results.delivered(job.id, str(message.id) if message else None, public=not private)

    async def result(self, interaction: discord.Interaction, outcome: JobOutcome, started: float,
                     *, private: bool, first: bool) -> None:
        """One result in its own message (the interaction's answer when `first`)."""
        file, embed, view = await self.parts(outcome, interaction.filesize_limit, private=private)
        message = await self._post(interaction, outcome, started, file, embed, view, private=private, first=first)
        if message is None:
            return
        await self.app.results.delivered(outcome.job.id, str(message.id), public=not private)  # type: ignore[union-attr]
        if not private:
            await self.add_reactions(message)

    async def _post(self, interaction: discord.Interaction, outcome: JobOutcome, started: float,
                    file: discord.File, embed: discord.Embed, view: discord.ui.View, *, private: bool,
                    first: bool) -> discord.Message | None:
        """The result as the interaction's answer; once its token has expired, in the channel (or
        a direct message, for a private one). None: it could only be announced."""
        message = None
        if not token_expired(started):
            try:
                if first:
                    message = await interaction.edit_original_response(
                        content=None, embed=embed, attachments=[file], view=view)
                else:
                    message = await interaction.followup.send(embed=embed, file=file, view=view,
                                                              ephemeral=private, wait=True)
            except discord.HTTPException as exc:
                if not is_expired_token_error(exc):
                    raise
                file.reset()
        mention = discord.AllowedMentions(users=True)
        user, channel = interaction.user, interaction.channel
        if message is None and private:
            # The token has expired and the member wants privacy: a direct message, else a word
            # in the channel without the image.
            try:
                return await user.send(embed=embed, file=file, view=view)
            except discord.HTTPException:
                await channel.send(f"<@{user.id}> your private result (job {outcome.job.id}) is ready, "  # type: ignore[union-attr]
                                   f"but I cannot send you direct messages: see /usage", allowed_mentions=mention)
                return None
        if message is None:  # the interaction token has expired: a normal message that mentions the member
            message = await channel.send(content=f"<@{user.id}> your image is ready", embed=embed,  # type: ignore[union-attr]
                                         file=file, view=view, allowed_mentions=mention)
        return message

    async def add_reactions(self, message) -> None:
        for emoji in REACTIONS:
            try:
                await message.add_reaction(emoji)
            except discord.HTTPException as exc:
                log.info("could not add reaction %s: %s", emoji, exc)
                return
