"""The service every front end calls: it sequences the steps (normalise, plan, screen, admit,
reserve, generate, check, re-host, settle) and decides nothing itself. A bad request or a failed
job never raises: the outcome says what happened. Cancelling the calling task cancels the job,
which is refunded."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

from .access import find
from .admission import Admission
from .billing import Billing, Ending
from .enhancing import NOT_SET_UP, Enhancement, Enhancer
from .models import (
    MAX_SEED,
    BudgetRefusal,
    ContentPolicyError,
    ErrorCode,
    EventSink,
    EventState,
    GeneratedImage,
    GeneratorError,
    JobEvent,
    JobOutcome,
    JobRecord,
    JobRequest,
    JobStatus,
    Kind,
    Refusal,
    Requester,
    StoredBlob,
)
from .planning import Plan, Planner
from .policy import Policy
from .ports import BlobStore, DecodedImage, ImageCodec, JobStore, NoObserver, Observer
from .prompting import Normalised, normalise
from .routing import Router
from .screening import Screening

log = logging.getLogger(__name__)


class EaselService:
    def __init__(
        self,
        *,
        policy: Policy,
        planner: Planner,
        screening: Screening,
        billing: Billing,
        admission: Admission,
        router: Router,
        jobs: JobStore,
        blobs: BlobStore,
        codec: ImageCodec,
        owner: str,
        enhancer: Enhancer | None = None,
        observer: Observer | None = None,
    ):
        self.policy, self.planner, self.screening, self.billing = policy, planner, screening, billing
        self.admission, self.router, self.jobs, self.blobs = admission, router, jobs, blobs
        self.codec, self.owner = codec, owner
        self.observer: Observer = observer or NoObserver()
        self.enhancer = enhancer or Enhancer(
            None, on_failure="original", max_prompt_chars=policy.max_prompt_chars
        )
        self._tasks: dict[int, asyncio.Task[JobOutcome]] = {}

    # ---- what front ends ask for --------------------------------------------------------------

    async def imagine(
        self, request: JobRequest, count: int = 1, on_event: EventSink | None = None
    ) -> list[JobOutcome]:
        """`count` images of one request; with a seed, image i gets seed + i."""
        try:
            asked = normalise(request, self.policy.max_prompt_chars)
        except Refusal as exc:
            return [_refused(exc)]
        if count == 1:
            return [await self._run(request, asked, on_event)]
        group = replace(request, group=request.group or f"request:{uuid.uuid4().hex}")
        seeds = [
            None if asked.params.seed is None else (asked.params.seed + i) % (MAX_SEED + 1)
            for i in range(count)
        ]
        return list(
            await asyncio.gather(
                *[
                    self._run(
                        group,
                        replace(asked, params=asked.params.but(seed=seed)),
                        on_event if i == 0 else None,
                    )
                    for i, seed in enumerate(seeds)
                ]
            )
        )

    async def submit(self, request: JobRequest, on_event: EventSink | None = None) -> JobOutcome:
        """One job of any kind: an edit, a variation or upscale of a job or an upload."""
        try:
            asked = normalise(request, self.policy.max_prompt_chars)
        except Refusal as exc:
            return _refused(exc)
        return await self._run(request, asked, on_event)

    async def reroll(
        self, job_id: int, requester: Requester, on_event: EventSink | None = None
    ) -> JobOutcome:
        """The job's request again with a new seed, charged to `requester`."""
        try:
            job = await asyncio.to_thread(find, self.jobs, job_id, requester)
        except Refusal as exc:
            return _refused(exc)
        return await self.submit(await asyncio.to_thread(self._reroll_request, job, requester), on_event)

    async def vary(self, job_id: int, requester: Requester, on_event: EventSink | None = None) -> JobOutcome:
        """A variation of an earlier result, with its model (a result's Vary button)."""
        request = JobRequest(Kind.VARIATION, requester, source_job_id=job_id)
        return await self.submit(request, on_event)

    async def upscale(
        self, job_id: int, requester: Requester, on_event: EventSink | None = None
    ) -> JobOutcome:
        """An earlier result, enlarged (a result's Upscale button)."""
        return await self.submit(JobRequest(Kind.UPSCALE, requester, source_job_id=job_id), on_event)

    async def enhance_again(
        self, job_id: int, requester: Requester, on_event: EventSink | None = None
    ) -> JobOutcome:
        """The job's prompt as typed, enhanced, with its seed and size (a result's Enhance button)."""
        try:
            job = await asyncio.to_thread(find, self.jobs, job_id, requester)
        except Refusal as exc:
            return _refused(exc)
        params = job.params.but(prompt=job.original_prompt or job.prompt)
        return await self.submit(JobRequest(Kind.IMAGINE, requester, params, enhance=True), on_event)

    async def cancel(self, job_id: int) -> bool:
        """Cancel a queued or running job; True if it was in flight here."""
        task = self._tasks.get(job_id)
        if task is None or task.done():
            return False
        task.cancel()
        return True

    def queue_position(self, job_id: int) -> int | None:
        return self.admission.position(job_id)

    # ---- the one path -------------------------------------------------------------------------

    async def _run(self, request: JobRequest, asked: Normalised, on_event: EventSink | None) -> JobOutcome:
        watch = _Stopwatch()
        try:
            with watch("prepare"):
                plan = await self.planner.plan(request, asked)
            if asked.enhance and not self.enhancer.available:
                raise Refusal(ErrorCode.USAGE, NOT_SET_UP)
        except Refusal as exc:
            return _refused(exc)
        job = await asyncio.to_thread(self._create, request, plan)
        done: list[Enhancement] = []  # the enhancement, once made
        task = asyncio.current_task()
        if task is not None:
            self._tasks[job.id] = task
        try:
            ending = await self._steps(job, request, plan, watch, on_event, asked.enhance, done)
            outcome = await self.billing.finish(job, _enhanced(ending, done))
            self._finished(outcome)
            return outcome
        except asyncio.CancelledError:
            ending = Ending(JobStatus.CANCELLED, ErrorCode.CANCELLED, "cancelled", timings=watch.ms)
            self._finished(await asyncio.shield(self.billing.finish(job, ending)))
            raise
        finally:
            self._tasks.pop(job.id, None)

    async def _steps(
        self,
        job: JobRecord,
        request: JobRequest,
        plan: Plan,
        watch: _Stopwatch,
        on_event: EventSink | None,
        enhance: bool,
        done: list[Enhancement],
    ) -> Ending:
        nsfw = request.requester.nsfw_channel
        try:
            with watch("screen_prompt"):
                await self.screening.screen_request(request, plan.request)
            await self._keep_uploads(job, request, plan)  # only screened uploads are kept
            group = request.group or f"job:{job.id}"
            async with self.admission.request(job.user_id, group):
                with watch("reserve"):
                    allowance = self.enhancer.allowance_micros() if enhance else 0
                    await self.billing.reserve(
                        job, plan, self.billing.estimate_micros(plan) + allowance, group
                    )
                if enhance:
                    with watch("enhance"):
                        done.append(await self.enhancer.apply(plan))
                    plan = done[0].plan
                    with watch("screen_enhanced"):  # the enhancer cannot smuggle content past the screen
                        await self.screening.screen_request(request, plan.request)
                queued = time.perf_counter()
                # The slot limits calls to the generator, not the work on their results.
                async with self.admission.slot(plan.route.spec.provider, job.id, job.user_id, on_event):
                    watch.since("queue", queued)
                    with watch("generate"):
                        result = await self._generate(job, plan, on_event)
            with watch("validate"):
                checked = await self.screening.validate(result, plan.request)
            with watch("screen_image"):
                blocked = await self.screening.output_blocked(checked, nsfw)
            if blocked:  # never stored or shown
                return Ending(
                    JobStatus.BLOCKED,
                    ErrorCode.BLOCKED,
                    f"the result was blocked: {blocked}",
                    charge=self.policy.blocked_outputs_are_paid,
                    result=result,
                    timings=watch.ms,
                )
            with watch("store"):
                stored = await self._store(result, checked)
            return Ending(JobStatus.DONE, charge=True, result=result, stored=stored, timings=watch.ms)
        except BudgetRefusal as exc:
            return Ending(JobStatus.REFUSED, exc.code, str(exc), timings=watch.ms)
        except Refusal as exc:
            return Ending(exc.status, exc.code, str(exc), timings=watch.ms)
        except Exception as exc:  # a bug must refund too, and leave a trace
            log.exception("job %s failed unexpectedly", job.id)
            return Ending(
                JobStatus.FAILED,
                ErrorCode.FAILED,
                f"internal error ({exc.__class__.__name__})",
                timings=watch.ms,
            )

    async def _generate(self, job: JobRecord, plan: Plan, on_event: EventSink | None) -> GeneratedImage:
        await asyncio.to_thread(self.jobs.update, job.id, status=JobStatus.RUNNING, started_at=time.time())
        loop = asyncio.get_running_loop()
        if on_event is not None:
            on_event(JobEvent(job.id, EventState.RUNNING))

        def progress(fraction: float, preview: bytes | None = None) -> None:
            if on_event is not None:  # generators call this from their worker threads
                event = JobEvent(job.id, EventState.PROGRESS, fraction=fraction, preview=preview)
                loop.call_soon_threadsafe(on_event, event)

        name, timeout = plan.route.spec.name, self.policy.job_timeout_s
        try:
            deadline = loop.time() + timeout
            return await asyncio.wait_for(
                self.router.generate(plan.route, plan.request, progress, deadline=deadline),
                timeout=timeout,
            )
        except ContentPolicyError as exc:
            self.observer.blocked("provider", plan.route.spec.provider)
            raise Refusal(
                ErrorCode.BLOCKED,
                f"the provider refused this request on content grounds: {exc}",
                JobStatus.BLOCKED,
            ) from None
        except TimeoutError:
            raise Refusal(
                ErrorCode.FAILED, f"{name} took longer than {timeout:g}s", JobStatus.FAILED
            ) from None
        except GeneratorError as exc:
            raise Refusal(ErrorCode.FAILED, f"{name} failed: {exc}", JobStatus.FAILED) from None

    def _finished(self, outcome: JobOutcome) -> None:
        job = outcome.job
        if job is None:
            return
        self.observer.job_finished(job)
        log.info(
            "job %s %s",
            job.id,
            job.status,
            extra={
                "job_id": job.id,
                "user_id": job.user_id,
                "guild_id": job.guild_id,
                "kind": str(job.kind),
                "model": job.model,
                "provider": job.provider,
                "status": str(job.status),
                "cost_usd": job.cost_micros / 1e6,
                "duration_ms": round(((job.finished_at or job.created_at) - job.created_at) * 1000, 1),
            },
        )

    # ---- storage around the job ---------------------------------------------------------------

    def _create(self, request: JobRequest, plan: Plan) -> JobRecord:
        who = request.requester
        return self.jobs.create(
            kind=plan.request.kind,
            status=JobStatus.QUEUED,
            user_id=who.user_id,
            guild_id=who.guild_id,
            channel_id=who.channel_id,
            nsfw_channel=who.nsfw_channel,
            params=plan.request.params,
            provider=plan.route.spec.provider,
            source_job_id=plan.source.id if plan.source else None,
            owner=self.owner,
        )

    async def _keep_uploads(self, job: JobRecord, request: JobRequest, plan: Plan) -> None:
        """Store uploaded inputs next to the results, so that the job can be made again."""
        kept = {}
        if request.image is not None and plan.request.source_image is not None:
            kept["source_sha256"] = (await asyncio.to_thread(self.blobs.put, plan.request.source_image)).key
        if plan.request.mask_image is not None:
            kept["mask_sha256"] = (await asyncio.to_thread(self.blobs.put, plan.request.mask_image)).key
        if kept:
            await asyncio.to_thread(self.jobs.update, job.id, **kept)

    async def _store(self, result: GeneratedImage, checked: DecodedImage) -> StoredBlob:
        data = result.data if result.format == "png" else await asyncio.to_thread(self.codec.to_png, checked)
        return await asyncio.to_thread(self.blobs.put, data)

    def _reroll_request(self, job: JobRecord, requester: Requester) -> JobRequest:
        params = job.params.but(seed=None)
        source = self.blobs.get(job.source_sha256) if job.source_sha256 else None
        mask = self.blobs.get(job.mask_sha256) if job.mask_sha256 else None
        if job.kind == Kind.IMAGINE:
            return JobRequest(Kind.IMAGINE, requester, params)
        if job.kind == Kind.EDIT:
            return JobRequest(Kind.EDIT, requester, params.but(size=None), image=source, mask=mask)
        # A variation or upscale starts again from the same job or upload.
        return JobRequest(
            job.kind, requester, params.but(size=None), source_job_id=job.source_job_id, image=source
        )


def _enhanced(ending: Ending, done: list[Enhancement]) -> Ending:
    """The ending with what the enhancement changed: the prompt recorded, its cost, its note."""
    if not done:
        return ending
    e = done[0]
    return replace(
        ending,
        prompt=e.plan.request.prompt if e.original is not None else None,
        original_prompt=e.original,
        extra_micros=e.cost_micros,
        note=e.note,
    )


def _refused(exc: Refusal) -> JobOutcome:
    return JobOutcome(status=JobStatus.REFUSED, error=str(exc), error_code=exc.code)


class _Stopwatch:
    """Milliseconds per step, recorded on the job."""

    def __init__(self) -> None:
        self.ms: dict[str, float] = {}

    @contextmanager
    def __call__(self, step: str) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            self.since(step, t)

    def since(self, step: str, t: float) -> None:
        self.ms[step] = round((time.perf_counter() - t) * 1000, 3)
