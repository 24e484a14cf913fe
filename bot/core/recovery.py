"""Recovery, an explicit start-up step of every command that opens the database: jobs that a
dead easel process left queued or running are failed and refunded, and reservations whose job
already ended are given back.

A job's owner is `host:pid:start`, where `start` is the process's start time (Linux
/proc/<pid>/stat), so a dead process whose id now belongs to another live process is still seen
as dead. A job that has been running longer than the job timeout allows, or queued for longer
than `QUEUED_STALE_S`, is swept whatever its owner (another host's included): no live easel
keeps one that long."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

from .models import ErrorCode, JobRecord, JobStatus
from .ports import Clock, JobStore, Ledger, UnitOfWork

RUNNING_GRACE_S = 60.0  # beyond the job timeout, for the settling after it
QUEUED_STALE_S = 6 * 3600.0


def process_start(pid: int) -> str | None:
    """The start time of process `pid` in clock ticks since boot, or None where /proc cannot
    tell (not Linux, or no such process)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # Fields after the command name, which is in parentheses and may hold spaces: the state is
    # field 3, the start time field 22.
    fields = stat[stat.rindex(b")") + 2 :].split()
    return fields[19].decode() if len(fields) > 19 else None


def this_process() -> str:
    pid = os.getpid()
    start = process_start(pid)
    return f"{socket.gethostname()}:{pid}" + (f":{start}" if start else "")


def owner_alive(owner: str) -> bool:
    """Whether the process that owns a job still runs (another host's: assumed so). A process
    with the same id but another start time is another process: the owner is dead."""
    host, _, rest = owner.partition(":")
    if host != socket.gethostname():
        return True  # another machine's job: not ours to judge (but see the stale sweep)
    pid_text, _, start = rest.partition(":")
    try:
        pid = int(pid_text)
        os.kill(pid, 0)
    except (ProcessLookupError, ValueError, OverflowError):
        return False
    except PermissionError:
        pass  # it exists, run by another user
    if start:
        now_start = process_start(pid)
        return now_start is None or now_start == start
    return True


def stale(job: JobRecord, now: float, job_timeout_s: float) -> bool:
    if job.status == JobStatus.RUNNING and job.started_at is not None:
        return now - job.started_at > job_timeout_s + RUNNING_GRACE_S
    return now - job.created_at > max(QUEUED_STALE_S, job_timeout_s + RUNNING_GRACE_S)


def recover(
    jobs: JobStore,
    ledger: Ledger,
    uow: UnitOfWork,
    clock: Clock,
    *,
    owner: str,
    job_timeout_s: float,
    alive: Callable[[str], bool] = owner_alive,
) -> list[int]:
    """Fail and refund the unfinished jobs of dead owners, and stale ones; returns their ids.
    Fresh jobs of a live process (another `easel` on this host) are left alone."""
    recovered = []
    now = clock.time()
    for job in jobs.unfinished():
        # At start-up nothing of this process is in flight: a job under its own name was left
        # by an earlier process with the same id.
        if job.owner and job.owner != owner and alive(job.owner) and not stale(job, now, job_timeout_s):
            continue
        with uow.transaction():
            ledger.release(job.id)
            jobs.update(
                job.id,
                status=JobStatus.FAILED,
                error_code=ErrorCode.INTERRUPTED,
                finished_at=now,
                error="interrupted: easel stopped before the job finished; nothing was charged",
            )
        recovered.append(job.id)
    # A reservation whose job already ended can only be a leftover from a crash: give it back.
    for job_id in ledger.held_job_ids():
        held = jobs.get(job_id)
        if held is None or held.status.final:
            ledger.release(job_id)
    return recovered
