"""Recovery, an explicit start-up step: jobs that a dead easel process left queued or running
are failed and refunded, and reservations whose job already ended are given back."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

from .models import ErrorCode, JobStatus
from .ports import Clock, JobStore, Ledger, UnitOfWork


def this_process() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def owner_alive(owner: str) -> bool:
    """Whether the `host:pid` that owns a job still runs (another host's jobs: assumed so)."""
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname():
        return True  # another machine's job: not ours to judge
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError):
        return False
    except PermissionError:
        return True
    return True


def recover(
    jobs: JobStore,
    ledger: Ledger,
    uow: UnitOfWork,
    clock: Clock,
    *,
    owner: str,
    alive: Callable[[str], bool] = owner_alive,
) -> list[int]:
    """Fail and refund the unfinished jobs of dead owners; returns their ids. Jobs of a live
    process (another `easel` on this host) are left alone."""
    recovered = []
    for job in jobs.unfinished():
        if job.owner and job.owner != owner and alive(job.owner):
            continue
        with uow.transaction():
            ledger.release(job.id)
            jobs.update(
                job.id,
                status=JobStatus.FAILED,
                error_code=ErrorCode.INTERRUPTED,
                finished_at=clock.time(),
                error="interrupted: easel stopped before the job finished; nothing was charged",
            )
        recovered.append(job.id)
    # A reservation whose job already ended can only be a leftover from a crash: give it back.
    for job_id in ledger.held_job_ids():
        held = jobs.get(job_id)
        if held is None or held.status.final:
            ledger.release(job_id)
    return recovered
