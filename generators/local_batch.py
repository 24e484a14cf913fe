"""Merging the local generator's calls into batches. Calls run one pipeline call at a time in the
worker thread; calls that wait together and share a batch key (generators.batching) go into one
call, up to the batch size. The oldest waiting call always heads the next batch, and only calls
compatible with it join, so a call is never overtaken by a newer one: the fair order in which the
admission queue let the calls in is kept."""
from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

from bot.core.models import GenerationRequest, GeneratorError, ProgressCallback
from generators.batching import batch_key


@dataclass(eq=False)
class Call:
    """One generate() call waiting for, or running in, a batch."""

    request: GenerationRequest
    progress: ProgressCallback | None
    cancel: threading.Event
    future: asyncio.Future[Any]
    key: Hashable | None = None
    arrived: float = field(default_factory=time.monotonic)


# Runs a batch in the worker thread; returns one result (or exception) per call, in order.
RunBatch = Callable[[list[Call]], list[Any]]


class Batcher:
    def __init__(self, executor: concurrent.futures.Executor, run: RunBatch, *, size: int = 1,
                 window_s: float = 0.05):
        if size < 1 or window_s < 0:
            raise ValueError("the batch size must be at least 1 and the window 0 or more")
        self._executor, self._run, self.size, self.window_s = executor, run, size, window_s
        self._waiting: list[Call] = []
        self._arrival = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def submit(self, request: GenerationRequest, progress: ProgressCallback | None,
                     cancel: threading.Event) -> Any:
        """Run `request` (alone or in a batch) and return its result."""
        call = Call(request, progress, cancel, asyncio.get_running_loop().create_future(),
                    batch_key(request) if self.size > 1 else None)
        self._waiting.append(call)
        self._arrival.set()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._dispatch(), name="easel-local-batches")
        try:
            return await asyncio.shield(call.future)
        except asyncio.CancelledError:
            cancel.set()
            if call in self._waiting:
                self._waiting.remove(call)
            raise

    async def close(self) -> None:
        """Fail the waiting calls and let the running batch end (its callers' cancel events stop
        it at its next step)."""
        waiting, self._waiting = self._waiting, []
        for call in waiting:
            call.cancel.set()
            if not call.future.done():
                call.future.set_exception(GeneratorError("the local generator was closed during the generation"))
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)

    async def _dispatch(self) -> None:
        loop = asyncio.get_running_loop()
        while self._waiting:
            batch = await self._next_batch()
            if not batch:
                continue
            try:
                results = await loop.run_in_executor(self._executor, self._run, batch)
            except Exception as exc:  # a failure of the whole call fails each of its images
                results = [exc] * len(batch)
            for call, result in zip(batch, results, strict=True):
                if call.future.done():
                    continue
                if isinstance(result, BaseException):
                    call.future.set_exception(result)
                else:
                    call.future.set_result(result)

    async def _next_batch(self) -> list[Call]:
        head = self._waiting[0]
        if head.key is not None:
            # Wait a moment for compatible calls, counted from when the head arrived: under load
            # they are already waiting, and a lone call waits at most the window.
            while len(self._compatible(head)) < self.size:
                left = head.arrived + self.window_s - time.monotonic()
                if left <= 0:
                    break
                self._arrival.clear()
                try:
                    await asyncio.wait_for(self._arrival.wait(), left)
                except TimeoutError:
                    break
            if head not in self._waiting:  # cancelled while it waited
                return []
        batch = self._compatible(head)[: self.size] if head.key is not None else [head]
        for call in batch:
            self._waiting.remove(call)
        return batch

    def _compatible(self, head: Call) -> list[Call]:
        return [c for c in self._waiting if c is head or (c.key == head.key and not c.cancel.is_set())]
