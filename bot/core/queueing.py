"""The jobs in flight in this process, as front ends see them: the queue for the generators and
a job's place in it, the tasks running now, and cancelling one (it then ends refunded, with a
cancelled outcome rather than an exception)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager

from .admission import Admission
from .models import JobOutcome, QueueEntry


class Queueing:
    def __init__(self, admission: Admission) -> None:
        self.admission = admission
        self._tasks: dict[int, asyncio.Task[JobOutcome]] = {}
        self._cancelling: set[int] = set()  # jobs `cancel` was asked for

    def entries(self) -> list[QueueEntry]:
        """The jobs running and waiting for a generator, for /queue."""
        return self.admission.entries()

    def position(self, job_id: int) -> int | None:
        return self.admission.position(job_id)

    def in_flight(self) -> set[asyncio.Task[JobOutcome]]:
        """The tasks of the jobs running now."""
        return {t for t in self._tasks.values() if not t.done()}

    def cancel(self, job_id: int) -> bool:
        """Cancel a queued or running job; True if it was in flight here."""
        task = self._tasks.get(job_id)
        if task is None or task.done():
            return False
        self._cancelling.add(job_id)  # the job ends with a cancelled outcome, not an exception
        task.cancel()
        return True

    def cancelled_here(self, job_id: int) -> bool:
        """True when `cancel` stopped the job (rather than its caller being cancelled)."""
        return job_id in self._cancelling

    @contextmanager
    def running(self, job_id: int, task: asyncio.Task[JobOutcome] | None) -> Iterator[None]:
        """While the job runs in `task` (None: there is none to cancel), `cancel` can stop it."""
        if task is not None:
            self._tasks[job_id] = task
        try:
            yield
        finally:
            self._tasks.pop(job_id, None)
            self._cancelling.discard(job_id)
