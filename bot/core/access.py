"""Who may act on a job. A member may vary, upscale or reroll a job only if it is theirs, or if it
was posted publicly in a channel of the guild they are asking from. Any other job is treated as
missing: the refusal gives no hint that it exists (job numbers are sequential)."""

from __future__ import annotations

from .models import ErrorCode, JobRecord, Refusal, Requester
from .ports import JobStore

MAX_JOB_ID = 2**63 - 1  # SQLite's largest integer: beyond it there is no job to find


def may_use(job: JobRecord, who: Requester) -> bool:
    if job.user_id == who.user_id:
        return True
    return job.public and job.guild_id is not None and job.guild_id == who.guild_id


def usable(job: JobRecord | None, job_id: int, who: Requester) -> JobRecord:
    """The job, if `who` may use it; else the same refusal as for a job that does not exist."""
    if job is None or not may_use(job, who):
        raise Refusal(ErrorCode.NOT_FOUND, f"there is no job {job_id}")
    return job


def find(jobs: JobStore, job_id: int, who: Requester) -> JobRecord:
    """Job `job_id` if it exists and `who` may use it (any whole number may be asked for)."""
    if isinstance(job_id, bool) or not isinstance(job_id, int) or not 0 < job_id <= MAX_JOB_ID:
        raise Refusal(ErrorCode.NOT_FOUND, f"there is no job {job_id}")
    return usable(jobs.get(job_id), job_id, who)
