"""Admission: how many requests a user may have in flight, and a concurrency limit per
generator, served fairly across users.

Waiting jobs are granted slots round-robin by user, so one user's ten requests do not starve
another's one: each user with waiting jobs gets a turn before anyone gets a second.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from .models import ErrorCode, EventSink, EventState, JobEvent, Refusal


@dataclass
class _Waiter:
    job_id: int
    user_id: str
    future: asyncio.Future[None] = field(repr=False)


class FairQueue:
    def __init__(self, limit: int):
        if limit < 1:
            raise ValueError("a queue needs at least one slot")
        self.limit = limit
        self.running = 0
        self._waiting: dict[str, deque[_Waiter]] = {}
        self._turns: deque[str] = deque()  # users with waiting jobs, in the order they are served

    def __len__(self) -> int:
        return sum(len(q) for q in self._waiting.values())

    def order(self) -> list[int]:
        """Waiting job ids in the order they will be granted slots."""
        queues = {u: list(self._waiting[u]) for u in self._turns}
        turns = list(self._turns)
        out: list[int] = []
        depth = 0
        while turns:
            still = []
            for user in turns:
                if depth < len(queues[user]):
                    out.append(queues[user][depth].job_id)
                    still.append(user)
            turns = still
            depth += 1
        return out

    def position(self, job_id: int) -> int | None:
        """1 for the next job to start; None if the job is not waiting."""
        order = self.order()
        return order.index(job_id) + 1 if job_id in order else None

    async def acquire(self, job_id: int, user_id: str) -> None:
        """Wait for a slot; cancelling the waiting task removes the job from the queue."""
        if self.running < self.limit and not self._turns:
            self.running += 1
            return
        waiter = _Waiter(job_id, user_id, asyncio.get_running_loop().create_future())
        if user_id not in self._waiting:
            self._waiting[user_id] = deque()
            self._turns.append(user_id)
        self._waiting[user_id].append(waiter)
        try:
            await waiter.future
        except asyncio.CancelledError:
            if waiter.future.done() and not waiter.future.cancelled():
                self.release()  # the slot was granted just as we were cancelled: hand it on
            else:
                self._remove(waiter)
            raise

    def release(self) -> None:
        self.running -= 1
        self._dispatch()

    def _remove(self, waiter: _Waiter) -> None:
        queue = self._waiting.get(waiter.user_id)
        if queue and waiter in queue:
            queue.remove(waiter)
            if not queue:
                del self._waiting[waiter.user_id]
                self._turns.remove(waiter.user_id)

    def _dispatch(self) -> None:
        while self.running < self.limit and self._turns:
            user = self._turns.popleft()
            queue = self._waiting[user]
            waiter = queue.popleft()
            if queue:
                self._turns.append(user)
            else:
                del self._waiting[user]
            if waiter.future.done():  # cancelled while waiting
                continue
            self.running += 1
            waiter.future.set_result(None)


class Admission:
    """The per-user limit on requests in flight, and one fair queue per provider."""

    def __init__(self, limits: Mapping[str, int], max_requests_per_user: int, default_limit: int = 4):
        self._limits = dict(limits)
        self._default_limit = default_limit
        self.max_requests_per_user = max_requests_per_user
        self._queues: dict[str, FairQueue] = {}
        self._in_flight: dict[str, dict[str, int]] = {}  # user -> request group -> jobs
        self._sinks: dict[int, EventSink] = {}  # jobs waiting for a slot, to tell their position

    def set_limits(self, limits: Mapping[str, int]) -> None:
        """New per-provider limits (a reload): a higher limit lets waiting jobs in at once; a
        lower one lets running jobs finish and admits no more until they are under it."""
        self._limits = dict(limits)
        for provider, queue in self._queues.items():
            queue.limit = self._limits.get(provider, self._default_limit)
            queue._dispatch()

    def load(self) -> dict[str, tuple[int, int]]:
        """Per provider: (jobs waiting for a slot, jobs running)."""
        return {provider: (len(q), q.running) for provider, q in self._queues.items()}

    @asynccontextmanager
    async def request(self, user_id: str, group: str) -> AsyncIterator[None]:
        """Count one job of a request against the user's limit while it is in flight; the jobs
        of one group (one /imagine count=4) count once together."""
        groups = self._in_flight.setdefault(user_id, {})
        if group not in groups and len(groups) >= self.max_requests_per_user:
            n = len(groups)
            raise Refusal(
                ErrorCode.BUSY,
                f"you already have {n} request{'' if n == 1 else 's'} in flight (the limit is "
                f"{self.max_requests_per_user}); wait for one to finish",
            )
        groups[group] = groups.get(group, 0) + 1
        try:
            yield
        finally:
            groups[group] -= 1
            if not groups[group]:
                del groups[group]
            if not groups:
                del self._in_flight[user_id]

    @asynccontextmanager
    async def slot(
        self, provider: str, job_id: int, user_id: str, on_event: EventSink | None
    ) -> AsyncIterator[None]:
        """Wait for the provider's turn (telling `on_event` the queue position), hold the slot
        for the body, then hand it on."""
        queue = self._queue(provider)
        acquire = asyncio.ensure_future(queue.acquire(job_id, user_id))
        await asyncio.sleep(0)  # let it enqueue (or take a free slot) before we report
        if not acquire.done() and on_event is not None:
            self._sinks[job_id] = on_event
            on_event(JobEvent(job_id, EventState.QUEUED, position=queue.position(job_id)))
        try:
            await acquire
        except asyncio.CancelledError:
            acquire.cancel()
            raise
        finally:
            self._sinks.pop(job_id, None)
            self._announce(queue)
        try:
            yield
        finally:
            queue.release()
            self._announce(queue)

    def position(self, job_id: int) -> int | None:
        for queue in self._queues.values():
            pos = queue.position(job_id)
            if pos is not None:
                return pos
        return None

    def _queue(self, provider: str) -> FairQueue:
        if provider not in self._queues:
            self._queues[provider] = FairQueue(self._limits.get(provider, self._default_limit))
        return self._queues[provider]

    def _announce(self, queue: FairQueue) -> None:
        for position, job_id in enumerate(queue.order(), start=1):
            sink = self._sinks.get(job_id)
            if sink is not None:
                sink(JobEvent(job_id, EventState.QUEUED, position=position))
