"""Getting work to members: acknowledging at once, progress edits (queue position, step previews
that pass the image screen), fitting results within the upload limit, and falling back to the
channel (or a DM for private results) once the 15-minute interaction token has expired."""
from __future__ import annotations

import asyncio
import io
import logging
import time
from collections.abc import Awaitable, Callable

import discord

from ..bootstrap import App
from ..config import DiscordSettings
from ..core.gallery import page_link
from ..core.models import ErrorCode, EventSink, JobEvent, JobOutcome, JobRecord, UserSettings
from .context import channel_is_nsfw
from .errors import CANCELLED_BY_RESTART, RESTARTING, refusal_text, tell_privately
from .views import REACTIONS, progress_text, result_embed, result_view

log = logging.getLogger(__name__)
# Interaction tokens last 15 minutes; past this age easel posts to the channel instead.
TOKEN_LIFETIME_S = 15 * 60 - 30
Run = Callable[[EventSink], Awaitable[list[JobOutcome]]]


def token_expired(started: float) -> bool:
    return time.monotonic() - started > TOKEN_LIFETIME_S


def is_expired_token_error(exc: Exception) -> bool:
    # 50027: Invalid Webhook Token. A 404 Unknown Webhook / Interaction is the same for us.
    return isinstance(exc, discord.NotFound) or getattr(exc, "code", None) in (50027, 10015, 10062)


def image_file(job: JobRecord, data: bytes, limit_bytes: int) -> tuple[discord.File, bool]:
    """The image as an attachment within `limit_bytes`: the PNG itself, or a JPEG of it (then
    True: the embed links to the full image on easel's server)."""
    name = f"SPOILER_easel-{job.id}" if job.spoiler else f"easel-{job.id}"  # Discord blurs SPOILER_ files
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


class ProgressMessage:
    """Edits one message with the queue position and progress, at most once per `interval_s`.
    A step preview is shown only if `preview_allowed` (the image screen) passes it."""

    def __init__(self, edit: Callable[..., Awaitable[object]], interval_s: float,
                 preview_allowed: Callable[[bytes], Awaitable[bool]] | None = None):
        self._edit, self._interval = edit, interval_s
        self._preview_allowed = preview_allowed
        self._latest: JobEvent | None = None
        self._changed = asyncio.Event()
        self._last_edit = 0.0
        self._task: asyncio.Task | None = None

    def on_event(self, event: JobEvent) -> None:
        self._latest = event
        self._changed.set()
        if self._task is None:
            self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            await self._changed.wait()
            wait = self._last_edit + self._interval - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            self._changed.clear()
            event = self._latest
            assert event is not None
            kwargs: dict = {"content": progress_text(event.state, event.position, event.fraction)}
            if event.preview and self._preview_allowed is not None:
                if await self._preview_allowed(event.preview):
                    kwargs["attachments"] = [discord.File(io.BytesIO(event.preview), filename="preview.png")]
                else:
                    self._preview_allowed = None  # one blocked preview: show no more of this job
            self._last_edit = time.monotonic()
            try:
                await self._edit(**kwargs)
            except discord.HTTPException as exc:
                log.info("progress edit failed (%s); no more progress for this job", exc)
                return

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass


class Delivery:
    """Runs a service call for an interaction or a reaction and delivers what it made."""

    def __init__(self, app: App, settings: DiscordSettings, client: discord.Client | None = None):
        self.app, self.settings, self.client = app, settings, client
        self.accepting = True
        self._tasks: set[asyncio.Task] = set()
        self._noted: dict[int, float] = {}  # the cool-down each member's admin note was for

    # ---- lifetime -----------------------------------------------------------------------------

    def _track(self) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def shutdown(self, grace_s: float) -> None:
        """Take no new work; let running jobs finish for `grace_s`, then cancel (refund) the rest."""
        self.accepting = False
        pending = {t for t in self._tasks if not t.done()}
        if pending:
            _, still = await asyncio.wait(pending, timeout=grace_s)
            for task in still:
                task.cancel()
            if still:
                await asyncio.wait(still, timeout=10)

    async def gatekeep(self, interaction: discord.Interaction) -> bool:
        if not self.accepting:
            await tell_privately(interaction, RESTARTING)
            return False
        return True

    async def begin(self, interaction: discord.Interaction) -> tuple[UserSettings, float] | None:
        """Acknowledge a job command at once (privately if the member asked for that); None when
        easel is shutting down and has said so."""
        if not await self.gatekeep(interaction):
            return None
        started = time.monotonic()
        prefs = await self.app.accounts.user_settings(str(interaction.user.id))
        await self.defer(interaction, private=prefs.private)
        return prefs, started

    async def defer(self, interaction: discord.Interaction, *, private: bool) -> None:
        """The acknowledgement ("thinking..."), timed from the interaction's creation."""
        await interaction.response.defer(thinking=True, ephemeral=private)
        age = (discord.utils.utcnow() - interaction.created_at).total_seconds()
        self.app.metrics.ack.observe(max(0.0, age))

    def _preview_screen(self, nsfw_channel: bool) -> Callable[[bytes], Awaitable[bool]]:
        """Step previews pass the same image screen as results before anyone sees them."""
        return lambda png: self.app.results.preview_allowed(png, nsfw_channel)

    # ---- for an interaction -------------------------------------------------------------------

    async def for_interaction(self, interaction: discord.Interaction, run: Run, *, private: bool,
                              started: float) -> list[JobOutcome]:
        """`run(on_event)` makes the outcomes: one service call."""
        self._track()
        progress = ProgressMessage(interaction.edit_original_response, self.settings.progress_interval_s,
                                   self._preview_screen(channel_is_nsfw(interaction.channel)))
        try:
            outcomes = await run(progress.on_event)
        except asyncio.CancelledError:  # shutdown ran out of grace: the service refunded the job
            await progress.stop()
            try:
                await interaction.edit_original_response(content=CANCELLED_BY_RESTART, attachments=[])
            except discord.HTTPException:
                pass
            raise
        await progress.stop()
        delivered = 0
        for outcome in outcomes:
            if outcome.ok:
                await self._deliver(interaction, outcome, started, private=private, first=delivered == 0)
                delivered += 1
        refusals = [o for o in outcomes if not o.ok]
        if any(o.error_code == ErrorCode.BLOCKED for o in refusals):
            await self._note_cooldown(interaction.user.id)
        if refusals:
            text = "\n".join(dict.fromkeys(refusal_text(o) for o in refusals))
            if not delivered:
                # The deferred "thinking" message may be public; the refusal is for the member alone.
                try:
                    await interaction.delete_original_response()
                except discord.HTTPException:
                    pass
            await self._tell(interaction, text, started)
        return list(outcomes)

    async def advise(self, interaction: discord.Interaction, outcomes: list[JobOutcome]) -> None:
        """A private tip after a result of a short prompt, when the member is due one."""
        job = next((o.job for o in outcomes if o.ok and o.job is not None), None)
        if job is None:
            return
        guild = str(interaction.guild_id) if interaction.guild_id else None
        tip = await self.app.accounts.take_tip(str(interaction.user.id), guild, job.original_prompt or job.prompt,
                                               can_enhance=self.app.service.enhancer.available)
        if tip is not None:
            try:
                await interaction.followup.send(tip, ephemeral=True)
            except discord.HTTPException as exc:
                log.info("could not send a tip: %s", exc)

    def spend_alert_poster(self, loop: asyncio.AbstractEventLoop):
        """A listener for the metrics' spend alerts (called from worker threads) that posts each
        to the admin channel on `loop`."""

        def post(alert) -> None:
            text = "\U0001f4b8 " + alert.describe(self.app.budgets.money)
            asyncio.run_coroutine_threadsafe(self.to_admin_channel(text[0].upper() + text[1:] + "."), loop)

        return post

    async def to_admin_channel(self, text: str) -> bool:
        """Post to the configured admin channel; False when there is none or it failed."""
        channel_id, client = self.settings.admin_channel, self.client
        if not channel_id or client is None:
            return False
        try:
            channel = client.get_channel(int(channel_id)) or await client.fetch_channel(int(channel_id))
            await channel.send(text, allowed_mentions=discord.AllowedMentions.none())  # type: ignore[union-attr]
            return True
        except (discord.HTTPException, AttributeError) as exc:
            log.warning("could not post to the admin channel %s: %s", channel_id, exc)
            return False

    async def _note_cooldown(self, user_id: int) -> None:
        """Tell the admin channel, once, that a member is cooling down after repeated blocks."""
        channel_id = self.settings.admin_channel
        if not channel_id:
            return
        started = await self.app.service.cooldown_started(str(user_id))
        if started is None or self._noted.get(user_id) == started.created_at:
            return
        self._noted[user_id] = started.created_at
        p = self.app.service.policy
        until = int(started.created_at + p.cooldown_s)
        text = (f"\u26a0\ufe0f <@{user_id}> had {p.cooldown_after} requests blocked in a short time (latest: "
                f"{started.stage}, `{started.rule}`); they can ask again <t:{until}:R>. See /moderation log.")
        await self.to_admin_channel(text)

    async def _tell(self, interaction: discord.Interaction, text: str, started: float) -> None:
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

    async def _result_parts(self, outcome: JobOutcome, limit: int, *, private: bool = False):
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

    async def _deliver(self, interaction: discord.Interaction, outcome: JobOutcome, started: float,
                       *, private: bool, first: bool) -> None:
        file, embed, view = await self._result_parts(outcome, interaction.filesize_limit, private=private)
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
                message = await user.send(embed=embed, file=file, view=view)
            except discord.HTTPException:
                await channel.send(f"<@{user.id}> your private result (job {outcome.job.id}) is ready, "  # type: ignore[union-attr]
                                   f"but I cannot send you direct messages: see /usage", allowed_mentions=mention)
                return
        if message is None:  # the interaction token has expired: a normal message that mentions the member
            message = await channel.send(content=f"<@{user.id}> your image is ready", embed=embed,  # type: ignore[union-attr]
                                         file=file, view=view, allowed_mentions=mention)
        await self.app.results.delivered(outcome.job.id, str(message.id), public=not private)
        if not private:
            await self._add_reactions(message)

    async def _add_reactions(self, message) -> None:
        for emoji in REACTIONS:
            try:
                await message.add_reaction(emoji)
            except discord.HTTPException as exc:
                log.info("could not add reaction %s: %s", emoji, exc)
                return

    # ---- from a reaction (no interaction to answer) -------------------------------------------

    async def in_channel(self, channel, user_id: int, run: Run, reply_to: int, nsfw: bool) -> JobOutcome:
        self._track()
        mention = discord.AllowedMentions(users=True)
        reference = discord.MessageReference(message_id=reply_to, channel_id=channel.id, fail_if_not_exists=False)
        status = await channel.send(f"<@{user_id}> \u23f3 working on it\u2026", allowed_mentions=mention,
                                    reference=reference)
        progress = ProgressMessage(status.edit, self.settings.progress_interval_s, self._preview_screen(nsfw))
        (outcome,) = await run(progress.on_event)
        await progress.stop()
        if not outcome.ok:
            await status.edit(content=f"<@{user_id}> {refusal_text(outcome)}", delete_after=120)
            return outcome
        limit = getattr(getattr(channel, "guild", None), "filesize_limit", 10 * 1024 * 1024)
        file, embed, view = await self._result_parts(outcome, limit)
        message = await status.edit(content=f"<@{user_id}>", embed=embed, attachments=[file], view=view)
        await self.app.results.delivered(outcome.job.id, str(message.id), public=True)
        await self._add_reactions(message)
        return outcome
