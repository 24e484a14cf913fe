"""The job's records around the service's steps: creating the job, keeping its uploads,
storing its result, the requests made again from a job (reroll, enhance), and the log line and
metrics when it ends."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace

from .models import (
    Blocked,
    ErrorCode,
    GeneratedImage,
    JobOutcome,
    JobRecord,
    JobRequest,
    JobStatus,
    Kind,
    ModerationEvent,
    Refusal,
    Requester,
    StoredBlob,
)
from .planning import Plan
from .policy import Policy
from .ports import (
    BlobStore,
    Clock,
    DecodedImage,
    ImageCodec,
    JobStore,
    ModerationLog,
    Observer,
    Provenance,
)

log = logging.getLogger("bot.core.service")


class Records:
    def __init__(
        self,
        jobs: JobStore,
        blobs: BlobStore,
        codec: ImageCodec,
        owner: str,
        observer: Observer,
        policy: Policy,
        moderation: ModerationLog | None = None,
        clock: Clock | None = None,
        review: BlobStore | None = None,
        provenance: Provenance | None = None,
    ):
        self.jobs, self.blobs, self.codec, self.owner, self.observer = jobs, blobs, codec, owner, observer
        self.provenance = provenance
        self.policy, self.moderation = policy, moderation
        self.clock = clock or _SystemClock()
        self.review = review  # blocked outputs kept for admins, where no public server reaches them

    def cooldown_started(self, user_id: str) -> ModerationEvent | None:
        """The block that has just put this member into a cool-down (the one that reached the
        count), or None: for a note to the admins, once per cool-down."""
        p = self.policy
        if self.moderation is None or p.cooldown_after <= 0:
            return None
        events = self.moderation.recent(user_id=user_id, limit=p.cooldown_after + 1)
        if len(events) < p.cooldown_after:
            return None
        window = events[: p.cooldown_after]
        if window[-1].created_at < window[0].created_at - p.cooldown_window_s:
            return None
        before = events[p.cooldown_after] if len(events) > p.cooldown_after else None
        # The block before this run, if it was itself within a cool-down, already started one.
        if before is not None and window[0].created_at - before.created_at < p.cooldown_s:
            return None
        return window[0]

    def check_cooldown(self, who: Requester) -> None:
        """After `cooldown_after` blocked requests within `cooldown_window_s`, a member waits
        `cooldown_s` from the last one before asking again (moderation.cooldown_*)."""
        p = self.policy
        if self.moderation is None or p.cooldown_after <= 0:
            return
        events = self.moderation.recent(user_id=who.user_id, limit=p.cooldown_after)
        now = self.clock.time()
        if len(events) < p.cooldown_after or events[-1].created_at < now - p.cooldown_window_s:
            return
        until = events[0].created_at + p.cooldown_s
        if until > now:
            minutes = max(1, round((until - now) / 60))
            raise Refusal(
                ErrorCode.BLOCKED,
                f"{len(events)} of your requests were blocked in a short time; you can ask again in "
                f"about {minutes} minute{'s' if minutes != 1 else ''}",
            )

    def create(self, request: JobRequest, plan: Plan) -> JobRecord:
        who = request.requester
        return self.jobs.create(
            kind=plan.request.kind,
            status=JobStatus.QUEUED,
            user_id=who.user_id,
            guild_id=who.guild_id,
            channel_id=who.channel_id,
            nsfw_channel=who.nsfw_channel,
            params=plan.request.params,
            provider=plan.route.spec.provider,
            source_job_id=plan.source.id if plan.source else None,
            owner=self.owner,
            outpaint=plan.outpaint,
        )

    async def keep_uploads(self, job: JobRecord, request: JobRequest, plan: Plan) -> None:
        """Store uploaded inputs next to the results, so that the job can be made again."""
        kept = {}
        if (request.image is not None or plan.outpaint) and plan.request.source_image is not None:
            kept["source_sha256"] = (await asyncio.to_thread(self.blobs.put, plan.request.source_image)).key
        elif plan.request.control_image is not None:  # what a ControlNet followed: the job's input
            kept["source_sha256"] = (await asyncio.to_thread(self.blobs.put, plan.request.control_image)).key
        if plan.request.mask_image is not None:
            kept["mask_sha256"] = (await asyncio.to_thread(self.blobs.put, plan.request.mask_image)).key
        if kept:
            await asyncio.to_thread(self.jobs.update, job.id, **kept)

    async def keep_for_review(self, blocked: Blocked, result: GeneratedImage) -> None:
        """With moderation.keep_blocked_outputs: the blocked image, kept for the moderation log."""
        if self.review is not None:
            blocked.review_sha256 = (await asyncio.to_thread(self.review.put, result.data)).key

    async def store(
        self, result: GeneratedImage, checked: DecodedImage, job: JobRecord, source: bytes | None
    ) -> StoredBlob:
        """The image stored under the hash of its final bytes: with its provenance stamped first
        (the parameters that made it, as served; `source`, an edit's or variation's input)."""
        data = result.data if result.format == "png" else await asyncio.to_thread(self.codec.to_png, checked)
        if self.provenance is not None:
            served = replace(
                job,
                params=job.params.but(
                    model=result.model, seed=result.seed, size=(result.width, result.height)
                ),
                provider=result.provider,
            )
            data = await asyncio.to_thread(self.provenance.stamp, data, served, source=source)
        return await asyncio.to_thread(self.blobs.put, data)

    def composite(self, result: GeneratedImage, plan: Plan) -> GeneratedImage:
        """An outpainting keeps the source's pixels exactly: the model draws only the new area."""
        canvas, mask = plan.request.source_image, plan.request.mask_image
        assert canvas is not None and mask is not None
        data = self.codec.composite(result.data, canvas, mask)
        decoded = self.codec.decode(canvas)
        return replace(result, data=data, width=decoded.width, height=decoded.height, format="png")

    def reroll_request(self, job: JobRecord, requester: Requester) -> JobRequest:
        """The job's request again, without its seed (a new one is chosen)."""
        params = job.params.but(seed=None)
        source = self.blobs.get(job.source_sha256) if job.source_sha256 else None
        mask = self.blobs.get(job.mask_sha256) if job.mask_sha256 else None
        if job.kind == Kind.IMAGINE:  # with the image its ControlNet followed, if it had one
            return JobRequest(Kind.IMAGINE, requester, params, image=source)
        if job.outpaint and job.source_job_id is not None:  # the same source, extended again
            return JobRequest(
                Kind.EDIT,
                requester,
                params.but(size=None),
                source_job_id=job.source_job_id,
                outpaint=job.outpaint,
            )
        if job.kind == Kind.EDIT:
            return JobRequest(Kind.EDIT, requester, params.but(size=None), image=source, mask=mask)
        # A variation or upscale starts again from the same job or upload.
        return JobRequest(
            job.kind, requester, params.but(size=None), source_job_id=job.source_job_id, image=source
        )

    def enhance_request(self, job: JobRecord, requester: Requester) -> JobRequest:
        """The job's prompt as typed, to be enhanced, with its seed and size."""
        params = job.params.but(prompt=job.original_prompt or job.prompt)
        return JobRequest(Kind.IMAGINE, requester, params, enhance=True)

    def finished(self, outcome: JobOutcome, blocked: Blocked | None, request: JobRequest) -> None:
        """One log line with the job's fields, the metrics, and a moderation block in the
        moderation log (blocking: call it in a thread)."""
        job = outcome.job
        if blocked is not None and self.moderation is not None:
            who = request.requester
            self.moderation.record(
                ModerationEvent(
                    user_id=who.user_id,
                    guild_id=who.guild_id,
                    channel_id=who.channel_id,
                    job_id=job.id if job else None,
                    stage=blocked.stage,
                    rule=blocked.rule,
                    score=blocked.score,
                    prompt=(job.prompt if job else request.params.prompt)
                    if self.policy.log_prompts
                    else None,
                    created_at=self.clock.time(),
                    review_sha256=blocked.review_sha256,
                )
            )
        if job is None:
            return
        self.observer.job_finished(job)
        log.info(
            "job %s %s",
            job.id,
            job.status,
            extra={
                "job_id": job.id,
                "user_id": job.user_id,
                "guild_id": job.guild_id,
                "kind": str(job.kind),
                "model": job.model,
                "provider": job.provider,
                "status": str(job.status),
                "cost_usd": job.cost_micros / 1e6,
                "duration_ms": round(((job.finished_at or job.created_at) - job.created_at) * 1000, 1),
            },
        )


class _SystemClock:
    def time(self) -> float:
        return time.time()
