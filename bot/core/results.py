"""Results as front ends show them: finding a job by id or by the message that shows it, its
image bytes, where it was delivered, and whether a step preview may be shown."""

from __future__ import annotations

import asyncio
from dataclasses import replace

from .models import JobRecord, ModerationEvent
from .ports import BlobStore, JobStore, ModerationLog
from .screening import Screening


class Results:
    def __init__(
        self, jobs: JobStore, blobs: BlobStore, screening: Screening, moderation: ModerationLog | None = None
    ):
        self.jobs, self.blobs, self.screening, self.moderation = jobs, blobs, screening, moderation

    async def moderation_log(self, guild_id: str, limit: int = 20) -> list[ModerationEvent]:
        """Recent blocks in a guild, newest first."""
        log = self.moderation
        if log is None:
            return []
        return await asyncio.to_thread(lambda: log.recent(guild_id=guild_id, limit=limit))

    async def job(self, job_id: int) -> JobRecord | None:
        return await asyncio.to_thread(self.jobs.get, job_id)

    async def for_message(self, message_id: str) -> JobRecord | None:
        return await asyncio.to_thread(self.jobs.by_message, message_id)

    async def fresh(self, jobs: list[JobRecord]) -> list[JobRecord]:
        """The jobs with the URLs to show now: a bucket's presigned URLs expire, so they are made
        afresh whenever one is shown."""

        def urls() -> list[JobRecord]:
            return [replace(j, image_url=self.blobs.url_for(j.sha256)) if j.sha256 else j for j in jobs]

        return await asyncio.to_thread(urls)

    async def image(self, job: JobRecord) -> bytes:
        assert job.sha256 is not None, "only a finished job has an image"
        return await asyncio.to_thread(self.blobs.get, job.sha256)

    async def delivered(self, job_id: int, message_id: str | None, *, public: bool = False) -> None:
        """Record the message that shows the job (None: it was deleted), and whether the channel
        sees it."""
        await asyncio.to_thread(
            self.jobs.update, job_id, message_id=message_id, public=public and message_id is not None
        )

    async def preview_allowed(self, png: bytes, nsfw_channel: bool) -> bool:
        return await asyncio.to_thread(self.screening.preview_allowed, png, nsfw_channel)

    async def recent(self, user_id: str | None = None, limit: int = 20) -> list[JobRecord]:
        return await asyncio.to_thread(lambda: self.jobs.list(user_id=user_id, limit=limit))
