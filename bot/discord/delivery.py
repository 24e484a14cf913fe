"""Getting work to members: acknowledging at once, progress edits (queue position, step previews
that pass the image screen), cancelling, and the refusals; `posting.py` puts the results out."""
from __future__ import annotations

import asyncio
import io
import logging
import time
from collections.abc import Awaitable, Callable

import discord

from ..bootstrap import App
from ..config import DiscordSettings
from ..core.models import ErrorCode, EventSink, JobEvent, JobOutcome, JobStatus, UserSettings
from .context import channel_is_nsfw
from .errors import CANCELLED_BY_RESTART, RESTARTING, refusal_text, tell_privately, wording
from .posting import ResultPoster
from .views import cancel_view, progress_text

log = logging.getLogger(__name__)
Run = Callable[[EventSink], Awaitable[list[JobOutcome]]]
CANCELLED = wording(ErrorCode.CANCELLED, None)


class ProgressMessage:
    """Edits one message with the queue position and progress, at most once per `interval_s`.
    A step preview is shown only if `preview_allowed` (the image screen) passes it."""

    def __init__(self, edit: Callable[..., Awaitable[object]], interval_s: float,
                 preview_allowed: Callable[[bytes], Awaitable[bool]] | None = None,
                 on_job: Callable[[int], None] | None = None):
        self._edit, self._interval = edit, interval_s
        self._preview_allowed = preview_allowed
        self._on_job = on_job  # told the job id once, then the message gets a Cancel button
        self.job_id: int | None = None
        self._latest: JobEvent | None = None
        self._changed = asyncio.Event()
        self._last_edit = 0.0
        self._task: asyncio.Task | None = None

    def on_event(self, event: JobEvent) -> None:
        if self.job_id is None and self._on_job is not None:
            self.job_id = event.job_id
            self._on_job(event.job_id)
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
            kwargs: dict = {"content": progress_text(event.state, event.position, event.fraction, event.eta_s)}
            if self._on_job is not None:
                kwargs["view"] = cancel_view(event.job_id)
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
        self._runs: dict[int, asyncio.Task] = {}  # a job's id -> the task delivering it (to cancel)
        self._cancelled: set[asyncio.Task] = set()  # tasks a member cancelled
        self.poster = ResultPoster(app)

    def _watch(self) -> Callable[[int], None]:
        """Remember which task delivers a job, so that its Cancel button can stop it."""
        task = asyncio.current_task()
        assert task is not None

        def seen(job_id: int) -> None:
            self._runs[job_id] = task
            task.add_done_callback(lambda _: self._runs.pop(job_id, None))

        return seen

    def cancel(self, job_id: int) -> bool:
        """Stop delivering a job (and the request it is part of): the service refunds it. True if
        it was in flight."""
        task = self._runs.get(job_id)
        if task is None or task.done():
            return False
        self._cancelled.add(task)
        task.add_done_callback(self._cancelled.discard)
        task.cancel()
        return True

    def _member_cancelled(self) -> bool:
        """In an except CancelledError: True (and the cancellation undone) when a member's Cancel
        did it, rather than a shutdown."""
        task = asyncio.current_task()
        if task not in self._cancelled:
            return False
        task.uncancel()  # type: ignore[union-attr]
        return True

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
                              started: float, grid: bool = False) -> list[JobOutcome]:
        """`run(on_event)` makes the outcomes: one service call; with `grid`, the images it made
        go out as one grid."""
        self._track()
        progress = ProgressMessage(interaction.edit_original_response, self.settings.progress_interval_s,
                                   self._preview_screen(channel_is_nsfw(interaction.channel)), self._watch())
        try:
            outcomes = await run(progress.on_event)
        except asyncio.CancelledError:  # a member's Cancel, or shutdown out of grace: refunded
            await progress.stop()
            mine = self._member_cancelled()
            try:
                await interaction.edit_original_response(content=CANCELLED if mine else CANCELLED_BY_RESTART,
                                                         attachments=[], view=None)
            except discord.HTTPException:
                pass
            if mine:
                return []
            raise
        await progress.stop()
        made = [o for o in outcomes if o.ok]
        if grid and len(made) > 1:
            await self.poster.grid(interaction, made, started, private=private)
        else:
            for i, outcome in enumerate(made):
                await self.poster.result(interaction, outcome, started, private=private, first=i == 0)
        delivered = len(made)
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
            await self.poster.tell(interaction, text, started)
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

    # ---- from a reaction (no interaction to answer) -------------------------------------------

    async def in_channel(self, channel, user_id: int, run: Run, reply_to: int, nsfw: bool) -> JobOutcome:
        self._track()
        mention = discord.AllowedMentions(users=True)
        reference = discord.MessageReference(message_id=reply_to, channel_id=channel.id, fail_if_not_exists=False)
        status = await channel.send(f"<@{user_id}> \u23f3 working on it\u2026", allowed_mentions=mention,
                                    reference=reference)
        progress = ProgressMessage(status.edit, self.settings.progress_interval_s, self._preview_screen(nsfw),
                                   self._watch())
        try:
            (outcome,) = await run(progress.on_event)
        except asyncio.CancelledError:
            await progress.stop()
            if not self._member_cancelled():
                raise
            await status.edit(content=f"<@{user_id}> {CANCELLED}", view=None, delete_after=120)
            return JobOutcome(status=JobStatus.CANCELLED, error_code=ErrorCode.CANCELLED)
        await progress.stop()
        if not outcome.ok:
            await status.edit(content=f"<@{user_id}> {refusal_text(outcome)}", view=None, delete_after=120)
            return outcome
        limit = getattr(getattr(channel, "guild", None), "filesize_limit", 10 * 1024 * 1024)
        file, embed, view = await self.poster.parts(outcome, limit)
        message = await status.edit(content=f"<@{user_id}>", embed=embed, attachments=[file], view=view)
        await self.app.results.delivered(outcome.job.id, str(message.id), public=True)
        await self.poster.add_reactions(message)
        return outcome
