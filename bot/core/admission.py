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

from .models import ErrorCode, EventSink, EventState, JobEvent, QueueEntry, Refusal

RECENT = 10  # generation times kept per model for the ETA


@dataclass
class _Held:
    """A job in a slot or waiting for one: what /queue and the ETA need."""

    user_id: str
    provider: str
    model: str | None
    started: float | None = None  # loop time it got its slot


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
        self._held: dict[int, _Held] = {}
        self._durations: dict[str | None, deque[float]] = {}  # recent generation seconds per model

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
        self,
        provider: str,
        job_id: int,
        user_id: str,
        on_event: EventSink | None,
        model: str | None = None,
    ) -> AsyncIterator[None]:
        """Wait for the provider's turn (telling `on_event` the queue position and ETA), hold the
        slot for the body (timed, for later ETAs of `model`), then hand it on."""
        queue = self._queue(provider)
        held = self._held[job_id] = _Held(user_id, provider, model)
        acquire = asyncio.ensure_future(queue.acquire(job_id, user_id))
        await asyncio.sleep(0)  # let it enqueue (or take a free slot) before we report
        if not acquire.done() and on_event is not None:
            self._sinks[job_id] = on_event
            pos = queue.position(job_id)
            on_event(JobEvent(job_id, EventState.QUEUED, position=pos, eta_s=self.eta_s(job_id)))
        try:
            await acquire
        except asyncio.CancelledError:
            acquire.cancel()
            self._held.pop(job_id, None)
            raise
        finally:
            self._sinks.pop(job_id, None)
            self._announce(queue)
        held.started = asyncio.get_running_loop().time()
        try:
            yield
            recent = self._durations.setdefault(model, deque(maxlen=RECENT))
            recent.append(asyncio.get_running_loop().time() - held.started)
        finally:
            self._held.pop(job_id, None)
            queue.release()
            self._announce(queue)

    def mean_s(self, model: str | None) -> float | None:
        """The mean of `model`'s recent generation times; None before the first."""
        recent = self._durations.get(model)
        return sum(recent) / len(recent) if recent else None

    def eta_s(self, job_id: int) -> float | None:
        """Seconds until a waiting job is done: the work ahead of it (the rest of the running
        jobs, the waiting ones before it) spread over the slots, then its own; None if it is not
        waiting or its model has no recent times."""
        held = self._held.get(job_id)
        own = self.mean_s(held.model) if held is not None else None
        if held is None or held.started is not None or own is None:
            return None
        queue, now = self._queues[held.provider], asyncio.get_running_loop().time()
        order = queue.order()
        ahead = order[: order.index(job_id)] if job_id in order else []
        work = sum(self.mean_s(self._held[j].model) or own for j in ahead if j in self._held)
        for other in self._held.values():
            if other.provider == held.provider and other.started is not None:
                work += max(0.0, (self.mean_s(other.model) or own) - (now - other.started))
        return work / queue.limit + own

    def entries(self) -> list[QueueEntry]:
        """Every job running or waiting, running first, then waiting in the order served."""
        out = [
            QueueEntry(j, h.user_id, h.provider, h.model, None)
            for j, h in self._held.items()
            if h.started is not None
        ]
        for provider, queue in self._queues.items():
            for position, j in enumerate(queue.order(), start=1):
                h = self._held.get(j)
                if h is not None:
                    out.append(QueueEntry(j, h.user_id, provider, h.model, position, self.eta_s(j)))
        return out

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
                sink(JobEvent(job_id, EventState.QUEUED, position=position, eta_s=self.eta_s(job_id)))
