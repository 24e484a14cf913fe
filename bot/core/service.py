"""The service every front end calls: it sequences the steps (normalise, plan, screen, admit,
reserve, generate, check, re-host, settle) and decides nothing itself. A bad request or a failed
job never raises: the outcome says what happened. Cancelling the calling task cancels the job,
which is refunded."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace

from .access import find
from .admission import Admission
from .billing import Billing, Ending
from .enhancing import NOT_SET_UP, Enhancement, Enhancer
from .generating import generate
from .models import (
    MAX_SEED,
    Blocked,
    BudgetRefusal,
    ErrorCode,
    EventSink,
    GeneratedImage,
    GenerationParams,
    JobOutcome,
    JobRecord,
    JobRequest,
    JobStatus,
    Kind,
    ModerationEvent,
    QueueEntry,
    Refusal,
    Requester,
    StoreFailed,
)
from .planning import Plan, Planner
from .policy import Policy
from .ports import (
    BlobStore,
    Clock,
    ImageCodec,
    JobStore,
    ModerationLog,
    NoObserver,
    Observer,
    Provenance,
)
from .prompting import Normalised, normalise
from .queueing import Queueing
from .records import Records
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
        moderation: ModerationLog | None = None,
        clock: Clock | None = None,
        review: BlobStore | None = None,
        provenance: Provenance | None = None,
    ):
        self.policy, self.planner, self.screening, self.billing = policy, planner, screening, billing
        self.admission, self.router, self.jobs, self.blobs = admission, router, jobs, blobs
        self.codec, self.owner = codec, owner
        self.observer: Observer = observer or NoObserver()
        self.records = Records(
            jobs, blobs, codec, owner, self.observer, policy, moderation, clock, review, provenance
        )
        self.enhancer = enhancer or Enhancer(
            None, on_failure="original", max_prompt_chars=policy.max_prompt_chars
        )
        self.queueing = Queueing(admission)  # what is in flight here, and cancelling it

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
        self,
        job_id: int,
        requester: Requester,
        on_event: EventSink | None = None,
        *,
        prompt: str | None = None,
    ) -> JobOutcome:
        """The job's request again with a new seed (and `prompt`, if given: a remix), charged to
        `requester`."""

        def make(job: JobRecord, who: Requester) -> JobRequest:
            request = self.records.reroll_request(job, who)
            return request if prompt is None else replace(request, params=request.params.but(prompt=prompt))

        return await self._again(job_id, requester, make, on_event)

    async def reroll_all(
        self, job_ids: list[int], requester: Requester, on_event: EventSink | None = None
    ) -> list[JobOutcome]:
        """Each job's request again with a new seed, as one request (a grid's reroll button)."""
        try:
            jobs = [await asyncio.to_thread(find, self.jobs, j, requester) for j in job_ids]
        except Refusal as exc:
            return [_refused(exc)]
        group = f"request:{uuid.uuid4().hex}"
        requests = [
            replace(await asyncio.to_thread(self.records.reroll_request, j, requester), group=group)
            for j in jobs
        ]
        return list(
            await asyncio.gather(
                *[self.submit(r, on_event if i == 0 else None) for i, r in enumerate(requests)]
            )
        )

    async def vary(
        self,
        job_id: int,
        requester: Requester,
        on_event: EventSink | None = None,
        *,
        strength: float | None = None,
        prompt: str | None = None,
    ) -> JobOutcome:
        """A variation of an earlier result, with its model (a result's Vary buttons), at
        `strength` (None: the default) and with `prompt` (None: the source's; a remix)."""
        params = GenerationParams(prompt=prompt or "", strength=strength)
        request = JobRequest(Kind.VARIATION, requester, params, source_job_id=job_id)
        return await self.submit(request, on_event)

    def queue(self) -> list[QueueEntry]:
        """The jobs running and waiting for a generator, for /queue."""
        return self.queueing.entries()

    async def upscale(
        self, job_id: int, requester: Requester, on_event: EventSink | None = None
    ) -> JobOutcome:
        """An earlier result, enlarged (a result's Upscale button)."""
        return await self.submit(JobRequest(Kind.UPSCALE, requester, source_job_id=job_id), on_event)

    async def outpaint(
        self, job_id: int | None, requester: Requester, direction: str, on_event: EventSink | None = None
    ) -> JobOutcome:
        """Zoom out (2x) or pan (left, right, up, down) an earlier result: its pixels kept exactly,
        the new area drawn by a model that can edit (None: the requester's last result)."""
        request = JobRequest(Kind.EDIT, requester, source_job_id=job_id, outpaint=direction)
        return await self.submit(request, on_event)

    async def enhance_again(
        self, job_id: int, requester: Requester, on_event: EventSink | None = None
    ) -> JobOutcome:
        """The job's prompt as typed, enhanced, with its seed and size (a result's Enhance button)."""
        return await self._again(job_id, requester, self.records.enhance_request, on_event)

    async def _again(
        self,
        job_id: int,
        requester: Requester,
        make: Callable[[JobRecord, Requester], JobRequest],
        on_event: EventSink | None,
    ) -> JobOutcome:
        try:
            job = await asyncio.to_thread(find, self.jobs, job_id, requester)
        except Refusal as exc:
            return _refused(exc)
        return await self.submit(await asyncio.to_thread(make, job, requester), on_event)

    async def cancel(self, job_id: int) -> bool:
        """Cancel a queued or running job; True if it was in flight here."""
        return self.queueing.cancel(job_id)

    async def cooldown_started(self, user_id: str) -> ModerationEvent | None:
        """The block that just put `user_id` into a cool-down, for a note to the admins."""
        return await asyncio.to_thread(self.records.cooldown_started, user_id)

    def in_flight(self) -> set[asyncio.Task[JobOutcome]]:
        """The tasks of the jobs running now."""
        return self.queueing.in_flight()

    def queue_position(self, job_id: int) -> int | None:
        return self.queueing.position(job_id)

    # ---- the one path -------------------------------------------------------------------------

    async def _run(self, request: JobRequest, asked: Normalised, on_event: EventSink | None) -> JobOutcome:
        watch = _Stopwatch()
        try:
            with watch("prepare"):
                await asyncio.to_thread(self.records.check_cooldown, request.requester)
                plan = await self.planner.plan(request, asked)
            if asked.enhance and not self.enhancer.available:
                raise Refusal(ErrorCode.USAGE, NOT_SET_UP)
        except Refusal as exc:
            return _refused(exc)
        job = await asyncio.to_thread(self.records.create, request, plan)
        done: list[Enhancement] = []  # the enhancement, once made
        task = asyncio.current_task()
        with self.queueing.running(job.id, task):
            try:
                ending = await self._steps(job, request, plan, watch, on_event, asked.enhance, done)
                outcome = await self.billing.finish(job, _enhanced(ending, done))
                await asyncio.to_thread(self.records.finished, outcome, ending.blocked, request)
                return outcome
            except asyncio.CancelledError:
                ending = Ending(JobStatus.CANCELLED, ErrorCode.CANCELLED, "cancelled", timings=watch.ms)
                outcome = await asyncio.shield(self.billing.finish(job, ending))
                self.records.finished(outcome, None, request)
                if not self.queueing.cancelled_here(job.id) or task is None:
                    raise
                task.uncancel()  # cancelled on its own (one image of several): the others go on
                return outcome

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
        """Screen, reserve, (enhance,) generate, check and store: how the job ended. A refusal, a
        failure or a bug ends it (refunded); a cancellation goes on up to `_run`."""
        try:
            with watch("screen_prompt"):
                await self.screening.screen_request(request, plan.request)
            await self.records.keep_uploads(job, request, plan)  # only screened uploads are kept
            plan, result = await _admitted(self, job, request, plan, watch, on_event, enhance, done)
            source = request.image if request.image is not None else plan.request.source_image
            nsfw = request.requester.nsfw_channel
            return await _check_and_store(self, result, plan, nsfw, watch, job, source)
        except Exception as exc:
            return _ending_of(exc, job, self.policy, watch)


async def _admitted(
    service: EaselService,
    job: JobRecord,
    request: JobRequest,
    plan: Plan,
    watch: _Stopwatch,
    on_event: EventSink | None,
    enhance: bool,
    done: list[Enhancement],
) -> tuple[Plan, GeneratedImage]:
    """Within the member's share of admission: reserve the cost, enhance the prompt if asked,
    then generate. The plan (as enhanced) and what the generator made."""
    group = request.group or f"job:{job.id}"
    async with service.admission.request(job.user_id, group):
        with watch("reserve"):
            allowance = service.enhancer.allowance_micros() if enhance else 0
            estimate = service.billing.estimate_micros(plan) + allowance
            await service.billing.reserve(job, plan, estimate, group, request.requester.roles)
        if enhance:
            plan = await _enhance(service.enhancer, service.screening, request, plan, watch, done)
        return plan, await _generated(service, job, plan, watch, on_event)


async def _generated(
    service: EaselService, job: JobRecord, plan: Plan, watch: _Stopwatch, on_event: EventSink | None
) -> GeneratedImage:
    """The generator's call in a slot of its provider's queue (the wait for it timed as "queue")."""
    queued = time.perf_counter()
    # The slot limits calls to the generator, not the work on their results.
    spec = plan.route.spec
    async with service.admission.slot(spec.provider, job.id, job.user_id, on_event, spec.name):
        watch.since("queue", queued)
        with watch("generate"):
            return await generate(
                service.router,
                service.jobs,
                service.observer,
                job,
                plan,
                service.policy.job_timeout_s,
                on_event,
            )


def _ending_of(exc: Exception, job: JobRecord, policy: Policy, watch: _Stopwatch) -> Ending:
    """How a job that raised `exc` ends: refused (a block among the refusals) or failed. Called
    while `exc` is being handled, so that a bug's traceback is logged."""
    if isinstance(exc, BudgetRefusal):
        text = exc.describe(policy.money)
        return Ending(JobStatus.REFUSED, exc.code, text, timings=watch.ms, retry_at=exc.resets_at)
    if isinstance(exc, Refusal):
        blocked = exc if isinstance(exc, Blocked) else None
        return Ending(exc.status, exc.code, str(exc), timings=watch.ms, blocked=blocked)
    if isinstance(exc, StoreFailed):  # the bucket or the folder would not take it
        log.error("job %s: the image could not be stored: %s", job.id, exc)
        return Ending(
            JobStatus.FAILED, ErrorCode.FAILED, f"the image could not be stored ({exc})", timings=watch.ms
        )
    log.exception("job %s failed unexpectedly", job.id)  # a bug must refund too, and leave a trace
    return Ending(
        JobStatus.FAILED,
        ErrorCode.FAILED,
        f"internal error ({exc.__class__.__name__})",
        timings=watch.ms,
    )


async def _check_and_store(
    service: EaselService,
    result: GeneratedImage,
    plan: Plan,
    nsfw: bool,
    watch: _Stopwatch,
    job: JobRecord,
    source: bytes | None,
) -> Ending:
    """Validate and screen the output; store it unless it is blocked (never stored or shown)."""
    records, screening = service.records, service.screening
    if plan.outpaint:
        with watch("composite"):
            result = await asyncio.to_thread(records.composite, result, plan)
    with watch("validate"):
        checked = await screening.validate(result, plan.request)
    with watch("screen_image"):
        blocked = await screening.output_blocked(checked, nsfw)
    if isinstance(blocked, Blocked):
        await records.keep_for_review(blocked, result)
        return Ending(
            JobStatus.BLOCKED,
            ErrorCode.BLOCKED,
            str(blocked),
            blocked=blocked,
            charge=service.policy.blocked_outputs_are_paid,
            result=result,
            timings=watch.ms,
        )
    with watch("store"):
        stored = await records.store(result, checked, job, source)
    return Ending(
        JobStatus.DONE,
        charge=True,
        result=result,
        stored=stored,
        timings=watch.ms,
        spoiler=blocked is True,
    )


async def _enhance(
    enhancer: Enhancer,
    screening: Screening,
    request: JobRequest,
    plan: Plan,
    watch: _Stopwatch,
    done: list[Enhancement],
) -> Plan:
    """The enhancement step: the prompt expanded, then screened again."""
    with watch("enhance"):
        done.append(await enhancer.apply(plan))
    with watch("screen_enhanced"):  # the enhancer cannot smuggle content past the screen
        await screening.screen_request(request, done[0].plan.request)
    return done[0].plan


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
