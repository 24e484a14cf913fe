"""The generator call of a job: marked running, progress passed on from the generator's thread,
a deadline, and the generator's errors turned into the job's refusals."""

from __future__ import annotations

import asyncio
import time

from .models import (
    Blocked,
    ContentPolicyError,
    ErrorCode,
    EventSink,
    EventState,
    GeneratedImage,
    GeneratorError,
    JobEvent,
    JobRecord,
    JobStatus,
    Refusal,
)
from .planning import Plan
from .ports import JobStore, Observer
from .routing import Router


async def generate(
    router: Router,
    jobs: JobStore,
    observer: Observer,
    job: JobRecord,
    plan: Plan,
    timeout_s: float,
    on_event: EventSink | None,
) -> GeneratedImage:
    await asyncio.to_thread(jobs.update, job.id, status=JobStatus.RUNNING, started_at=time.time())
    loop = asyncio.get_running_loop()
    if on_event is not None:
        on_event(JobEvent(job.id, EventState.RUNNING))

    def progress(fraction: float, preview: bytes | None = None) -> None:
        if on_event is not None:  # generators call this from their worker threads
            event = JobEvent(job.id, EventState.PROGRESS, fraction=fraction, preview=preview)
            loop.call_soon_threadsafe(on_event, event)

    name, timeout = plan.route.spec.name, timeout_s
    try:
        deadline = loop.time() + timeout
        return await asyncio.wait_for(
            router.generate(plan.route, plan.request, progress, deadline=deadline), timeout=timeout
        )
    except ContentPolicyError as exc:
        observer.blocked("provider", plan.route.spec.provider)
        raise Blocked(
            f"the provider refused this request on content grounds: {exc}",
            stage="provider",
            rule=plan.route.spec.provider,
        ) from None
    except TimeoutError:
        raise Refusal(ErrorCode.FAILED, f"{name} took longer than {timeout:g}s", JobStatus.FAILED) from None
    except GeneratorError as exc:
        raise Refusal(ErrorCode.FAILED, f"{name} failed: {exc}", JobStatus.FAILED) from None
