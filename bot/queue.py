"""Admission to a generator: a concurrency limit, served fairly across users.

Waiting jobs are granted slots round-robin by user, so one user's ten requests do not starve
another's one: each user with waiting jobs gets a turn before anyone gets a second.
"""
from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field


@dataclass
class _Waiter:
    job_id: int
    user_id: str
    future: asyncio.Future = field(repr=False)


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
