"""The Discord front end: turns interactions, button clicks and reactions into pipeline requests,
and what the pipeline returns into messages. It formats; the pipeline decides."""
from __future__ import annotations

import asyncio
import io
import logging
import re
import time
from collections.abc import Awaitable, Callable

import discord

from ..bootstrap import App
from ..config import DiscordSettings
from ..core.flags import FlagError, parse_aspect, parse_flags
from ..core.models import (
    GenerationParams,
    JobEvent,
    JobOutcome,
    JobRecord,
    JobRequest,
    Kind,
    Refusal,
    Requester,
    UserSettings,
    micros_to_usd,
    usd_to_micros,
)
from .results import (
    REACTIONS,
    action_for_emoji,
    image_file,
    is_expired_token_error,
    progress_text,
    refusal_text,
    result_embed,
    result_view,
    token_expired,
)

log = logging.getLogger(__name__)
MESSAGE_LINK = re.compile(r"https://(?:\w+\.)?discord(?:app)?\.com/channels/(?:\d+|@me)/\d+/(\d+)")


class Refused(Exception):
    """A request the front end turns down before anything is spent; the message is for the user."""


class ProgressMessage:
    """Edits one message with the queue position and progress, at most once per `interval_s`.
    A step preview is shown only if `preview_allowed` (the image screen) passes it."""

    def __init__(self, edit: Callable[..., Awaitable[object]], interval_s: float,
                 preview_allowed: Callable[[bytes], bool] | None = None):
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
            kwargs: dict = {"content": progress_text(event.state, event.position, event.fraction)}
            if event.preview and self._preview_allowed is not None:
                if await asyncio.to_thread(self._preview_allowed, event.preview):
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


def _channel_is_nsfw(channel) -> bool:
    is_nsfw = getattr(channel, "is_nsfw", None)
    return bool(is_nsfw()) if callable(is_nsfw) else bool(getattr(channel, "nsfw", False))


class Frontend:
    def __init__(self, client: discord.Client, app: App, settings: DiscordSettings):
        self.client, self.app, self.settings = client, app, settings
        self.accepting = True
        self._tasks: set[asyncio.Task] = set()

    # ---- shared -------------------------------------------------------------------------------

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

    def _base_request(self, interaction_or_payload, user_id: int, channel) -> Requester:
        guild_id = getattr(interaction_or_payload, "guild_id", None)
        return Requester(str(user_id), str(guild_id) if guild_id else None,
                         str(channel.id) if channel is not None else None, _channel_is_nsfw(channel))

    def _preview_screen(self, nsfw_channel: bool) -> Callable[[bytes], bool]:
        """Step previews pass the same image screen as results before anyone sees them."""
        return lambda png: self.app.screening.preview_allowed(png, nsfw_channel)

    def is_admin(self, member) -> bool:
        roles = set(self.settings.admin_roles)
        if roles:
            return any(str(r.id) in roles or r.name in roles for r in getattr(member, "roles", []))
        perms = getattr(member, "guild_permissions", None)
        return bool(perms and perms.manage_guild)

    async def _refuse(self, interaction: discord.Interaction, text: str) -> None:
        if interaction.response.is_done():
            await interaction.followup.send(text, ephemeral=True)
        else:
            await interaction.response.send_message(text, ephemeral=True)

    async def _gatekeep(self, interaction: discord.Interaction) -> bool:
        if not self.accepting:
            await self._refuse(interaction, "\u23f8\ufe0f easel is restarting; try again in a minute.")
            return False
        return True

    async def _begin(self, interaction: discord.Interaction) -> tuple[UserSettings, float] | None:
        """Acknowledge a job command at once (privately if the member asked for that); None when
        easel is shutting down and has said so."""
        if not await self._gatekeep(interaction):
            return None
        started = time.monotonic()
        prefs = await self.app.accounts.user_settings(str(interaction.user.id))
        await interaction.response.defer(thinking=True, ephemeral=prefs.private)
        return prefs, started

    def _resolve_job(self, text: str | None, user_id: int) -> int | None:
        """A job id from '17', 'job 17' or a link to its result message; None: the user's last."""
        if not text:
            return None
        text = text.strip()
        m = re.fullmatch(r"(?:job\s*)?#?(\d{1,12})", text, re.I)
        if m:
            return int(m.group(1))
        m = MESSAGE_LINK.fullmatch(text)
        if m:
            job = self.app.jobs.by_message(m.group(1))
            if job is None:
                raise Refused("that message is not an easel result")
            return job.id
        raise Refused("give a job number (like 17) or a link to a result message")

    # ---- running jobs for an interaction ---------------------------------------------------------

    async def run_for_interaction(self, interaction: discord.Interaction, run,
                                  *, private: bool, started: float) -> list[JobOutcome]:
        """`run(on_event)` makes the outcomes: one service call."""
        self._track()
        progress = ProgressMessage(interaction.edit_original_response, self.settings.progress_interval_s,
                                   self._preview_screen(_channel_is_nsfw(interaction.channel)))
        try:
            outcomes = await run(progress.on_event)
        except asyncio.CancelledError:  # shutdown ran out of grace: the pipeline refunded the job
            await progress.stop()
            try:
                await interaction.edit_original_response(
                    content="\u274c easel is restarting, so this job was cancelled. Nothing was charged.",
                    attachments=[])
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
        if refusals:
            text = "\n".join(dict.fromkeys(refusal_text(o) for o in refusals))
            if not delivered:
                # The deferred "thinking" message may be public; the refusal is for the user alone.
                try:
                    await interaction.delete_original_response()
                except discord.HTTPException:
                    pass
            await self._tell(interaction, text, started)
        return list(outcomes)

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

    async def _result_parts(self, outcome: JobOutcome, limit: int):
        job = outcome.job
        data = await asyncio.to_thread(self.app.blobs.get, job.sha256)
        file, compressed = await asyncio.to_thread(image_file, job, data, limit)
        embed = result_embed(job, outcome.balance_usd, file.filename, job.image_url)
        if compressed:
            embed.add_field(name="Full size", value=f"[{job.width}\u00d7{job.height} PNG]({job.image_url})", inline=False)
        return file, embed, result_view(job)

    async def _deliver(self, interaction: discord.Interaction, outcome: JobOutcome, started: float,
                       *, private: bool, first: bool) -> None:
        file, embed, view = await self._result_parts(outcome, interaction.filesize_limit)
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
        if message is None and private:
            # The token has expired and the member wants privacy: a direct message, else a word
            # in the channel without the image.
            try:
                message = await interaction.user.send(embed=embed, file=file, view=view)
            except discord.HTTPException:
                await interaction.channel.send(
                    f"<@{interaction.user.id}> your private result (job {outcome.job.id}) is ready, "
                    f"but I cannot send you direct messages: see /usage",
                    allowed_mentions=discord.AllowedMentions(users=True))
                return
        if message is None:
            # The interaction token has expired: post as a normal message that mentions the user.
            message = await interaction.channel.send(
                content=f"<@{interaction.user.id}> your image is ready", embed=embed, file=file,
                view=view, allowed_mentions=discord.AllowedMentions(users=True))
        await self.app.results.delivered(outcome.job.id, str(message.id))
        if not private:
            await self._add_reactions(message)

    async def _add_reactions(self, message) -> None:
        for emoji in REACTIONS:
            try:
                await message.add_reaction(emoji)
            except discord.HTTPException as exc:
                log.info("could not add reaction %s: %s", emoji, exc)
                return

    # ---- running jobs from a reaction (no interaction to answer) --------------------------------

    async def run_in_channel(self, channel, user_id: int, run, reply_to: int, nsfw: bool) -> JobOutcome:
        self._track()
        mention = discord.AllowedMentions(users=True)
        status = await channel.send(
            f"<@{user_id}> \u23f3 working on it\u2026", allowed_mentions=mention,
            reference=discord.MessageReference(message_id=reply_to, channel_id=channel.id, fail_if_not_exists=False))
        progress = ProgressMessage(status.edit, self.settings.progress_interval_s,
                                   self._preview_screen(nsfw))
        outcome = await run(progress.on_event)
        await progress.stop()
        if not outcome.ok:
            await status.edit(content=f"<@{user_id}> {refusal_text(outcome)}", delete_after=120)
            return outcome
        limit = getattr(getattr(channel, "guild", None), "filesize_limit", 10 * 1024 * 1024)
        file, embed, view = await self._result_parts(outcome, limit)
        message = await status.edit(content=f"<@{user_id}>", embed=embed, attachments=[file], view=view)
        await self.app.results.delivered(outcome.job.id, str(message.id))
        await self._add_reactions(message)
        return outcome

    # ---- actions on a result (buttons and reactions) ------------------------------------------

    def action(self, action: str, job: JobRecord, requester: Requester):
        """The service call a click or reaction makes; it is charged to whoever clicked."""
        service = self.app.service
        if action == "variation":
            request = JobRequest(Kind.VARIATION, requester, GenerationParams(model=job.model),
                                 source_job_id=job.id)
            return lambda on_event: service.submit(request, on_event)
        if action == "upscale":
            request = JobRequest(Kind.UPSCALE, requester, source_job_id=job.id)
            return lambda on_event: service.submit(request, on_event)
        return lambda on_event: service.reroll(job.id, requester, on_event)

    async def on_result_action(self, interaction: discord.Interaction, action: str, job_id: int) -> None:
        if not await self._gatekeep(interaction):
            return
        started = time.monotonic()
        job = await self.app.results.job(job_id)
        if job is None:
            await self._refuse(interaction, f"job {job_id} no longer exists")
            return
        if action == "delete":
            await self._delete_result(interaction, job)
            return
        prefs = await self.app.accounts.user_settings(str(interaction.user.id))  # the clicker's
        await interaction.response.defer(thinking=True, ephemeral=prefs.private)
        run = self.action(action, job, self._base_request(interaction, interaction.user.id, interaction.channel))

        async def one(on_event):
            return [await run(on_event)]

        await self.run_for_interaction(interaction, one, private=prefs.private, started=started)

    async def _delete_result(self, interaction: discord.Interaction, job: JobRecord) -> None:
        if str(interaction.user.id) != job.user_id and not self.is_admin(interaction.user):
            await self._refuse(interaction, "only the person who asked for this image, or an admin, can delete it")
            return
        # For a button, the "original response" is the message the button is on; deleting it
        # through the interaction's webhook reaches ephemeral results too.
        await interaction.response.defer()
        await interaction.delete_original_response()
        await self.app.results.delivered(job.id, None)

    async def on_reaction(self, payload: discord.RawReactionActionEvent) -> None:
        if not self.accepting or self.client.user is None or payload.user_id == self.client.user.id:
            return
        action = action_for_emoji(payload.emoji.name or "")
        if action is None:
            return
        job = await self.app.results.for_message(str(payload.message_id))
        if job is None:
            return
        channel = self.client.get_channel(payload.channel_id) or self.client.get_partial_messageable(payload.channel_id)
        if action == "delete":
            if str(payload.user_id) == job.user_id or self.is_admin(payload.member):
                await channel.get_partial_message(payload.message_id).delete()
                await self.app.results.delivered(job.id, None)
            return
        requester = self._base_request(payload, payload.user_id, channel)
        await self.run_in_channel(channel, payload.user_id, self.action(action, job, requester),
                                  payload.message_id, requester.nsfw_channel)

    # ---- slash commands --------------------------------------------------------------------------

    async def imagine(self, interaction: discord.Interaction, prompt: str, negative: str | None,
                      seed: int | None, model: str | None, aspect: str | None, options: dict,
                      count: int) -> None:
        begun = await self._begin(interaction)
        if begun is None:
            return
        prefs, started = begun
        try:
            if count > self.settings.max_count:
                raise Refused(f"at most {self.settings.max_count} images at once")
            ratio = parse_aspect(aspect) if aspect else None
            if ratio is None and prefs.aspect:
                try:
                    has_inline = parse_flags(prompt).aspect is not None
                except FlagError:
                    has_inline = False  # the pipeline reports the flag error
                ratio = None if has_inline else parse_aspect(prefs.aspect)
        except (Refused, FlagError) as exc:
            await self._finish_refused(interaction, str(exc))
            return
        base = self._base_request(interaction, interaction.user.id, interaction.channel)
        options = {k: v for k, v in options.items() if v}
        request = JobRequest(Kind.IMAGINE, base, GenerationParams(
            prompt=prompt, negative_prompt=negative, seed=seed, model=model or prefs.model,
            options=options), aspect=ratio, group=f"interaction:{interaction.id}")

        async def run(on_event):
            return await self.app.service.imagine(request, count, on_event)

        await self.run_for_interaction(interaction, run, private=prefs.private, started=started)

    async def _finish_refused(self, interaction: discord.Interaction, text: str) -> None:
        try:
            await interaction.delete_original_response()
        except discord.HTTPException:
            pass
        await interaction.followup.send(f"\u2753 {text}.", ephemeral=True)

    async def _attachment_bytes(self, attachment: discord.Attachment | None, what: str) -> bytes | None:
        if attachment is None:
            return None
        limit = self.app.settings.generation.max_upload_bytes
        if not (attachment.content_type or "").startswith("image/"):
            raise Refused(f"the {what} must be an image (PNG, JPEG or WebP), not {attachment.content_type or 'an unknown type'}")
        if attachment.size > limit:
            raise Refused(f"the {what} is {attachment.size / 1e6:.1f} MB; the limit is {limit / 1e6:.0f} MB")
        return await attachment.read()

    async def edit(self, interaction: discord.Interaction, image: discord.Attachment,
                   mask: discord.Attachment | None, prompt: str, model: str | None) -> None:
        begun = await self._begin(interaction)
        if begun is None:
            return
        prefs, started = begun
        try:
            image_bytes = await self._attachment_bytes(image, "image")
            mask_bytes = await self._attachment_bytes(mask, "mask")
        except Refused as exc:
            await self._finish_refused(interaction, str(exc))
            return
        request = JobRequest(Kind.EDIT, self._base_request(interaction, interaction.user.id, interaction.channel),
                             GenerationParams(prompt=prompt, model=model or prefs.model),
                             image=image_bytes, mask=mask_bytes)
        await self._submit(interaction, request, prefs.private, started)

    async def variation(self, interaction: discord.Interaction, job: str | None,
                        image: discord.Attachment | None, seed: int | None, strength: float | None) -> None:
        await self._from_earlier(interaction, "variation", job, image, seed=seed, strength=strength)

    async def upscale(self, interaction: discord.Interaction, job: str | None) -> None:
        await self._from_earlier(interaction, "upscale", job, None)

    async def _from_earlier(self, interaction, kind: str, job: str | None, image, **extra) -> None:
        begun = await self._begin(interaction)
        if begun is None:
            return
        prefs, started = begun
        try:
            job_id = self._resolve_job(job, interaction.user.id)
            image_bytes = await self._attachment_bytes(image, "image")
        except Refused as exc:
            await self._finish_refused(interaction, str(exc))
            return
        request = JobRequest(Kind(kind), self._base_request(interaction, interaction.user.id, interaction.channel),
                             GenerationParams(**{k: v for k, v in extra.items() if v is not None}),
                             source_job_id=job_id, image=image_bytes)
        await self._submit(interaction, request, prefs.private, started)

    async def _submit(self, interaction, request: JobRequest, private: bool, started: float) -> None:
        async def run(on_event):
            return [await self.app.service.submit(request, on_event)]

        await self.run_for_interaction(interaction, run, private=private, started=started)

    async def usage(self, interaction: discord.Interaction) -> None:
        usage = await self.app.accounts.usage(str(interaction.user.id))
        balance = usage.balance
        lines = [f"**Balance** ${micros_to_usd(balance.available_micros):.4f}"
                 + (f" (${micros_to_usd(balance.reserved_micros):.4f} held for running jobs)" if balance.reserved_micros else ""),
                 f"**Spent this {usage.period}** ${micros_to_usd(usage.spent_micros):.4f}"]
        if usage.recent:
            lines.append("**Recent jobs**")
            for j in usage.recent:
                lines.append(f"`{j.id}` {j.status} \u00b7 {j.kind} \u00b7 {j.model or '-'} \u00b7 "
                             f"${micros_to_usd(j.cost_micros):.4f} \u00b7 {discord.utils.escape_markdown(j.prompt[:60])}")
        await interaction.response.send_message("\n".join(lines), ephemeral=True)

    async def user_settings(self, interaction: discord.Interaction, model: str | None,
                            aspect: str | None, private: bool | None) -> None:
        try:
            updated = await self.app.accounts.change_settings(
                str(interaction.user.id), model=model, aspect=aspect, private=private)
        except Refusal as exc:
            await interaction.response.send_message(f"\u2753 {exc}", ephemeral=True)
            return
        await interaction.response.send_message(
            f"Your defaults: model **{updated.model or 'server default'}**, aspect "
            f"**{updated.aspect or 'model default'}**, results **{'private' if updated.private else 'public'}**.",
            ephemeral=True)

    def option_choices(self, option: str, current: str) -> list[str]:
        """The values some usable model takes for `option`."""
        values = {v for s in self.app.router.healthy_models() for v in s.options.get(option, ())}
        return sorted(v for v in values if current.lower() in v)[:25]

    def model_choices(self, current: str) -> list[str]:
        current = current.lower()
        names = sorted(s.name for s in self.app.router.healthy_models())
        return [n for n in names if current in n.lower()][:25]

    # ---- /budget (admins) --------------------------------------------------------------------

    async def budget(self, interaction: discord.Interaction, action: str, user: discord.Member | None = None,
                     amount: float | None = None, period: str | None = None) -> None:
        if not self.is_admin(interaction.user):
            await self._refuse(interaction, "\U0001f512 only admins can manage budgets")
            return
        accounts = self.app.accounts
        actor = f"discord:{interaction.user.id}"
        if action in ("set", "grant", "guild-cap") and (amount is None or amount < 0 and action != "grant"):
            await self._refuse(interaction, f"/budget {action} needs an amount in USD (0 or more)")
            return
        budget_period = self.app.settings.budget.period
        if action == "report":
            await interaction.response.send_message(await self._report(interaction, period), ephemeral=True)
            return
        if action == "guild-cap":
            if interaction.guild_id is None:
                await self._refuse(interaction, "a guild cap is set in a server")
                return
            cap = usd_to_micros(amount) if amount > 0 else None
            await accounts.set_guild_cap(str(interaction.guild_id), cap)
            text = f"This server's spending cap is now ${amount:.2f} per {budget_period}." if cap else \
                "This server has no spending cap now."
            await interaction.response.send_message(text, ephemeral=True)
            return
        if user is None:
            await self._refuse(interaction, f"/budget {action} needs a user")
            return
        uid = str(user.id)
        if action == "set":
            await accounts.set_balance(uid, usd_to_micros(amount), actor)
        elif action == "grant":
            await accounts.grant(uid, usd_to_micros(amount), actor)
        elif action == "reset":
            await accounts.reset(uid, actor)
        usage = await accounts.usage(uid, period)
        b = usage.balance
        await interaction.response.send_message(
            f"{user.mention}: balance ${micros_to_usd(b.balance_micros):.4f}, available "
            f"${micros_to_usd(b.available_micros):.4f}, spent this {usage.period} ${micros_to_usd(usage.spent_micros):.4f}",
            ephemeral=True, allowed_mentions=discord.AllowedMentions.none())

    async def _report(self, interaction: discord.Interaction, period: str | None) -> str:
        guild = str(interaction.guild_id) if interaction.guild_id else None
        report = await self.app.accounts.report(guild, period)
        lines = [f"**Spend this {report.period}**"]
        lines += [f"{i}. <@{u}> ${micros_to_usd(m):.4f}" for i, (u, m) in enumerate(report.top, 1)] or ["nobody has spent anything"]
        if report.by_provider:
            lines.append("**By provider** " + ", ".join(f"{p}: ${micros_to_usd(m):.4f}" for p, m in sorted(report.by_provider.items())))
        if report.guild_cap_micros:
            lines.append(f"**Server cap** ${micros_to_usd(report.guild_cap_micros):.2f} per {self.app.settings.budget.period}")
        return "\n".join(lines)
