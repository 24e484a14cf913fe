"""The job pipeline: one code path from a request to a stored, recorded, paid-for image.

request -> parse inline flags -> check the model can serve it -> screen the prompt -> reserve the
estimated cost -> queue -> generate -> validate the output -> screen the output -> re-host ->
record and settle. A failure at any step releases the reservation and records why. Every front
end (command line, Discord) calls `Pipeline.submit` and only formats what it returns.
"""
from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from generators.base import (
    ContentPolicyError,
    GeneratedImage,
    GenerationRequest,
    GeneratorError,
    ModelSpec,
    UnsupportedRequest,
)
from generators.images import ImageRejected, decode_image, encode_png
from storage.blobs import LocalBlobStore
from storage.db import Database
from storage.jobs import JobRecord, JobStore
from storage.ledger import (
    GuildCapReached,
    InsufficientFunds,
    Ledger,
    SpendCapReached,
    micros_to_usd,
    period_start,
    usd_to_micros,
)
from storage.preferences import Preferences

from .flags import MAX_SEED, FlagError, parse_flags, size_for_aspect
from .queue import FairQueue
from .router import Route, Router, UnknownModel

log = logging.getLogger(__name__)

# Error codes a front end maps to its own wording (the CLI also maps them to exit statuses).
USAGE, OVER_BUDGET, SPEND_CAP, BUSY, BLOCKED, FAILED, CANCELLED = (
    "usage", "over_budget", "spend_cap", "busy", "blocked", "failed", "cancelled"
)
# Generators whose cost is real money spent with someone else (the daily spend cap applies).
UNPAID_PROVIDERS = frozenset({"local"})


@dataclass(frozen=True)
class JobRequest:
    """What a front end asks for. `prompt` may carry inline flags."""

    kind: str
    user_id: str
    prompt: str = ""
    negative_prompt: str | None = None
    seed: int | None = None
    model: str | None = None
    size: tuple[int, int] | None = None
    aspect: tuple[int, int] | None = None
    steps: int | None = None
    guidance: float | None = None
    strength: float | None = None
    source_job_id: int | None = None
    image: bytes | None = None  # an uploaded image (edit, or variation of an upload)
    mask: bytes | None = None
    guild_id: str | None = None
    channel_id: str | None = None
    nsfw_channel: bool = False
    options: dict[str, str] = field(default_factory=dict)
    # Jobs of one request (the images of one /imagine count=4) share a group: together they
    # count as one against the per-user limit of jobs in flight.
    group: str | None = None


@dataclass(frozen=True)
class JobEvent:
    job_id: int
    state: str  # queued, running, progress
    position: int | None = None
    fraction: float | None = None
    preview: bytes | None = None


@dataclass
class JobOutcome:
    status: str  # done, failed, blocked, cancelled, refused
    job: JobRecord | None = None
    error: str | None = None
    error_code: str | None = None
    image_path: str | None = None
    balance_usd: float | None = None

    @property
    def ok(self) -> bool:
        return self.status == "done"

    def as_dict(self) -> dict[str, Any]:
        job = self.job
        return {
            "job_id": job.id if job else None,
            "status": self.status,
            "seed": job.seed if job else None,
            "model": job.model if job else None,
            "provider": job.provider if job else None,
            "width": job.width if job else None,
            "height": job.height if job else None,
            "cost_usd": micros_to_usd(job.cost_micros) if job else 0.0,
            "sha256": job.sha256 if job else None,
            "image_path": self.image_path,
            "image_url": job.image_url if job else None,
            "error": self.error,
            "error_code": self.error_code,
        }


class _Refusal(Exception):
    def __init__(self, code: str, message: str, status: str = "refused"):
        super().__init__(message)
        self.code = code
        self.status = status


EventSink = Callable[[JobEvent], None]


class Pipeline:
    def __init__(
        self,
        *,
        db: Database,
        ledger: Ledger,
        jobs: JobStore,
        blobs: LocalBlobStore,
        router: Router,
        prompt_screen: Any,
        image_screen: Any,
        default_model: str,
        queue_limits: dict[str, int],
        max_jobs_per_user: int = 2,
        max_prompt_chars: int = 2000,
        default_strength: float = 0.6,
        upscale_factor: int = 2,
        job_timeout_s: float = 600.0,
        max_upload_bytes: int = 20 * 1024 * 1024,
        max_upload_pixels: int = 40_000_000,
        blocked_outputs_are_paid: bool = False,
        daily_spend_cap_usd: float = 0.0,
        budget_period: str = "month",
    ):
        self.db, self.ledger, self.jobs, self.blobs, self.router = db, ledger, jobs, blobs, router
        self.prompt_screen, self.image_screen = prompt_screen, image_screen
        self.default_model = default_model
        self.queue_limits = queue_limits
        self.max_jobs_per_user = max_jobs_per_user
        self.max_prompt_chars = max_prompt_chars
        self.default_strength = default_strength
        self.upscale_factor = upscale_factor
        self.job_timeout_s = job_timeout_s
        self.max_upload_bytes = max_upload_bytes
        self.max_upload_pixels = max_upload_pixels
        self.blocked_outputs_are_paid = blocked_outputs_are_paid
        self.daily_cap_micros = usd_to_micros(daily_spend_cap_usd)
        self.budget_period = budget_period
        self.preferences = Preferences(db)
        self.owner = f"{socket.gethostname()}:{os.getpid()}"
        self._queues: dict[str, FairQueue] = {}
        self._in_flight: dict[str, dict[str, int]] = {}  # user -> request group -> jobs
        self._tasks: dict[int, asyncio.Task] = {}
        self._waiting_sinks: dict[int, tuple[str, EventSink]] = {}

    # ---- start-up -------------------------------------------------------------------------

    def recover(self) -> list[int]:
        """Fail and refund the jobs a dead easel process left queued or running.

        Jobs owned by a live process (another `easel` on this host) are left alone."""
        recovered = []
        for job in self.jobs.unfinished():
            if job.owner and _owner_alive(job.owner) and job.owner != self.owner:
                continue
            with self.db.transaction():
                self.ledger.release(job.id)
                self.jobs.update(
                    job.id, status="failed", error_code="interrupted", finished_at=time.time(),
                    error="interrupted: easel stopped before the job finished; nothing was charged",
                )
            recovered.append(job.id)
        # A reservation whose job already ended can only be a leftover from a crash: give it back.
        for job_id in self.ledger.held_job_ids():
            job = self.jobs.get(job_id)
            if job is None or job.status not in ("queued", "running"):
                self.ledger.release(job_id)
        return recovered

    # ---- the one path ---------------------------------------------------------------------

    async def submit(self, request: JobRequest, on_event: EventSink | None = None) -> JobOutcome:
        """Run one request to its end. Never raises for a bad request or a failed job: the
        outcome says what happened. Cancelling the calling task cancels the job (refunded)."""
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        try:
            route, gen_request, source_job_id = await self._prepare(request)
        except _Refusal as exc:
            return JobOutcome(status="refused", error=str(exc), error_code=exc.code)
        timings["prepare"] = _ms(t0)
        spec = route.spec
        # Database work runs in a thread too: a burst of requests must not stall the loop.
        job = await asyncio.to_thread(
            self.jobs.create, kind=gen_request.kind, status="queued", user_id=request.user_id,
            guild_id=request.guild_id, channel_id=request.channel_id,
            nsfw_channel=request.nsfw_channel, prompt=gen_request.prompt,
            negative_prompt=gen_request.negative_prompt, seed=gen_request.seed, model=spec.name,
            provider=spec.provider, width=gen_request.width, height=gen_request.height,
            steps=gen_request.steps, guidance=gen_request.guidance,
            strength=gen_request.strength, source_job_id=source_job_id,
            options=gen_request.options, owner=self.owner,
        )
        task = asyncio.current_task()
        if task is not None:
            self._tasks[job.id] = task
        try:
            return await self._run(job, route, gen_request, request, timings, on_event)
        finally:
            self._tasks.pop(job.id, None)

    async def _keep_uploads(self, request: JobRequest, gen: GenerationRequest) -> dict[str, str]:
        """Store uploaded inputs next to the results, so that the job can be made again."""
        kept = {}
        if request.image is not None and gen.source_image is not None:
            kept["source_sha256"] = (await asyncio.to_thread(self.blobs.put, gen.source_image)).key
        if gen.mask_image is not None:
            kept["mask_sha256"] = (await asyncio.to_thread(self.blobs.put, gen.mask_image)).key
        return kept

    async def cancel(self, job_id: int) -> bool:
        """Cancel a queued or running job; True if it was in flight here."""
        task = self._tasks.get(job_id)
        if task is None or task.done():
            return False
        task.cancel()
        return True

    def queue_position(self, job_id: int) -> int | None:
        for queue in self._queues.values():
            pos = queue.position(job_id)
            if pos is not None:
                return pos
        return None

    # ---- steps ----------------------------------------------------------------------------

    async def _prepare(self, request: JobRequest) -> tuple[Route, GenerationRequest, int | None]:
        """Parse and check everything that can be checked before money is reserved. Returns the
        model to use, what to ask of it, and the earlier job it starts from (if any)."""
        if request.kind not in ("imagine", "variation", "edit", "upscale"):
            raise _Refusal(USAGE, f"unknown request kind {request.kind!r}")
        if len(request.prompt) > self.max_prompt_chars:
            raise _Refusal(
                USAGE, f"the prompt is {len(request.prompt)} characters; the limit is "
                f"{self.max_prompt_chars}"
            )
        try:
            parsed = parse_flags(request.prompt)
        except FlagError as exc:
            raise _Refusal(USAGE, str(exc)) from None

        def pick(flag_value, arg_value, name):
            if flag_value is not None and arg_value is not None and flag_value != arg_value:
                raise _Refusal(USAGE, f"{name} is given twice, with different values")
            return flag_value if flag_value is not None else arg_value

        prompt = parsed.prompt
        negative = pick(parsed.negative_prompt, request.negative_prompt or None, "the negative prompt")
        seed = pick(parsed.seed, request.seed, "the seed")
        model_name = pick(parsed.model, request.model, "the model")
        aspect = pick(parsed.aspect, request.aspect, "the aspect ratio")
        steps = pick(parsed.steps, request.steps, "steps")
        guidance = pick(parsed.guidance, request.guidance, "guidance")
        if seed is not None and not 0 <= seed <= MAX_SEED:
            raise _Refusal(USAGE, f"the seed must be a whole number from 0 to {MAX_SEED}")

        source: JobRecord | None = None
        source_image = mask_image = None
        if request.kind in ("variation", "upscale") and request.image is None:
            source = self._source_job(request)
            source_image = await asyncio.to_thread(self.blobs.get, source.sha256)
            prompt = prompt or source.prompt
            negative = negative if negative is not None else source.negative_prompt
        if request.image is not None:
            source_image = await self._checked_upload(request.image, "image")
        if request.mask is not None:
            if request.kind != "edit":
                raise _Refusal(USAGE, "a mask only applies to edit")
            mask_image = await self._checked_upload(request.mask, "mask")
        if request.kind == "edit" and source_image is None:
            raise _Refusal(USAGE, "edit needs an image")
        if request.kind in ("imagine", "edit") and not prompt:
            raise _Refusal(USAGE, "the prompt is empty")

        if mask_image is not None:
            mask = await asyncio.to_thread(decode_image, mask_image)
            image = await asyncio.to_thread(decode_image, source_image)
            if (mask.width, mask.height) != (image.width, image.height):
                raise _Refusal(
                    USAGE, f"the mask is {mask.width}x{mask.height} but the image is "
                    f"{image.width}x{image.height}; they must match"
                )
        strength = request.strength
        if request.kind == "variation" and strength is None:
            strength = self.default_strength
        if strength is not None and not 0.0 < strength <= 1.0:
            raise _Refusal(USAGE, "strength must be greater than 0 and at most 1")
        # Chosen once and recorded, so the image can be remade; models that cannot honour a
        # seed get none (and refuse one that was asked for).
        chosen_seed = seed if seed is not None else random.randint(0, MAX_SEED)

        options: list[tuple[Route, GenerationRequest]] = []
        refusal: _Refusal | None = None
        for route in self._candidate_routes(model_name, request, source):
            spec = route.spec
            try:
                width, height = await self._size(request, spec, aspect, source_image, source)
                gen_request = GenerationRequest(
                    kind=request.kind, model=spec.name, prompt=prompt, width=width, height=height,
                    negative_prompt=negative or None,
                    seed=chosen_seed if (seed is not None or spec.honours_seed) else None,
                    steps=steps, guidance=guidance, source_image=source_image,
                    mask_image=mask_image, strength=strength,
                    upscale_factor=self.upscale_factor, options=dict(request.options),
                )
                spec.check(gen_request)
                options.append((route, gen_request))
            except UnsupportedRequest as exc:
                refusal = refusal or _Refusal(USAGE, str(exc))
            except _Refusal as exc:
                refusal = refusal or exc
        if not options:
            raise refusal
        route, gen_request = self.router.cheapest(options)
        return route, gen_request, source.id if source is not None else None

    def _candidate_routes(self, model_name: str | None, request: JobRequest,
                          source: JobRecord | None) -> list[Route]:
        """The models that may serve: those the name leads to; without a name, the first of the
        source's model, the guild's default and the server's default that can do the request,
        else any model that can."""
        if model_name is None:
            guild_default = self.preferences.guild(request.guild_id).default_model if request.guild_id else None
            preferred = [source.model if source else None, guild_default, self.default_model]
            capable = [n for n in preferred if self._can(n, request.kind)]
            if capable:
                model_name = capable[0]
            else:
                routes = [self.router.resolve(s.name) for s in self.router.models() if request.kind in s.kinds]
                model_name = self.default_model
                if routes:
                    return routes
        try:
            return self.router.routes_for(model_name)
        except UnknownModel as exc:
            raise _Refusal(USAGE, str(exc)) from None

    def _can(self, model: str | None, kind: str) -> bool:
        if not model:
            return False
        try:
            return kind in self.router.resolve(model).spec.kinds
        except UnknownModel:
            return False

    def _source_job(self, request: JobRequest) -> JobRecord:
        if request.source_job_id is not None:
            source = self.jobs.get(request.source_job_id)
            if source is None:
                raise _Refusal(USAGE, f"there is no job {request.source_job_id}")
        else:
            source = self.jobs.latest_done(request.user_id)
            if source is None:
                raise _Refusal(USAGE, f"{request.kind} needs an earlier image, and there is none yet")
        if source.status != "done" or not source.sha256:
            raise _Refusal(USAGE, f"job {source.id} has no image ({source.status})")
        if not self.blobs.exists(source.sha256):
            raise _Refusal(USAGE, f"the image of job {source.id} is no longer stored")
        return source

    async def _checked_upload(self, data: bytes, what: str) -> bytes:
        if len(data) > self.max_upload_bytes:
            raise _Refusal(
                USAGE, f"the {what} is {len(data) / 1e6:.1f} MB; the limit is "
                f"{self.max_upload_bytes / 1e6:.0f} MB"
            )
        try:
            checked = await asyncio.to_thread(
                decode_image, data, max_pixels=self.max_upload_pixels
            )
        except ImageRejected as exc:
            raise _Refusal(USAGE, f"the {what} was not accepted: {exc}") from None
        if what == "mask":
            return await asyncio.to_thread(encode_png, checked.image.convert("L"))
        return await asyncio.to_thread(encode_png, checked.image.convert("RGB"))

    async def _size(self, request, spec: ModelSpec, aspect, source_image, source) -> tuple[int, int]:
        if request.kind == "upscale":
            w, h = (source.width, source.height) if source else await _image_size(source_image)
            return w * self.upscale_factor, h * self.upscale_factor
        if request.size is not None:
            if aspect is not None:
                raise _Refusal(USAGE, "give a size or an aspect ratio, not both")
            return request.size
        if aspect is None and source_image is not None:
            if source is not None and request.kind == "variation":
                return source.width, source.height
            aspect = await _image_size(source_image)
        area = spec.default_size[0] * spec.default_size[1]
        if aspect is None:
            return spec.default_size
        if spec.sizes is None:
            return size_for_aspect(aspect, area, spec.size_step)
        # Fixed sizes: the one whose ratio is nearest, if it is near enough to honour the request.
        want = aspect[0] / aspect[1]
        best = min(spec.sizes, key=lambda s: abs(s[0] / s[1] - want))
        if abs(best[0] / best[1] - want) / want > 0.15:
            options = ", ".join(f"{w}x{h}" for w, h in spec.sizes)
            raise _Refusal(USAGE, f"{spec.name} has no size near {aspect[0]}:{aspect[1]}; it makes {options}")
        return best

    async def _run(
        self, job: JobRecord, route: Route, gen: GenerationRequest, request: JobRequest,
        timings: dict[str, float], on_event: EventSink | None,
    ) -> JobOutcome:
        user = request.user_id
        t = time.perf_counter()
        verdict = self.prompt_screen.screen_prompt(
            " ".join(filter(None, [gen.prompt, gen.negative_prompt])), nsfw_channel=request.nsfw_channel
        )
        timings["screen_prompt"] = _ms(t)
        if not verdict.allowed:
            return await self._finish(job, "blocked", BLOCKED, verdict.reason, timings)
        if gen.kind in ("edit", "variation") and request.image is not None:
            img = await asyncio.to_thread(decode_image, gen.source_image)
            verdict = await asyncio.to_thread(
                self.image_screen.screen_image, img.image, nsfw_channel=request.nsfw_channel
            )
            if not verdict.allowed:
                return await self._finish(job, "blocked", BLOCKED, f"the uploaded image: {verdict.reason}", timings)
        kept = await self._keep_uploads(request, gen)  # only screened uploads are kept
        if kept:
            await asyncio.to_thread(self.jobs.update, job.id, **kept)

        groups = self._in_flight.setdefault(user, {})
        key = request.group or f"job:{job.id}"
        if key not in groups and len(groups) >= self.max_jobs_per_user:
            return await self._finish(
                job, "refused", BUSY, f"you already have {_count(len(groups), 'request')} in "
                f"flight (the limit is {self.max_jobs_per_user}); wait for one to finish", timings,
            )
        groups[key] = groups.get(key, 0) + 1
        try:
            return await self._reserve_and_run(job, route, gen, request, timings, on_event)
        finally:
            groups[key] -= 1
            if not groups[key]:
                del groups[key]
            if not groups:
                del self._in_flight[user]

    async def _reserve_and_run(self, job: JobRecord, route: Route, gen: GenerationRequest,
                               request: JobRequest, timings: dict[str, float],
                               on_event: EventSink | None) -> JobOutcome:
        user = request.user_id
        t = time.perf_counter()
        # Enough for whichever model ends up serving: the route or one of its fallbacks.
        estimate = max(usd_to_micros(r.generator.estimate_cost(g))
                       for r, g in self.router.candidates(route, gen))
        guild_cap = self.preferences.guild(request.guild_id).spend_cap_micros if request.guild_id else None

        def reserve() -> None:
            with self.db.transaction():
                self.ledger.reserve(
                    user, job.id, estimate, provider=route.spec.provider,
                    paid=route.spec.provider not in UNPAID_PROVIDERS,
                    daily_cap_micros=self.daily_cap_micros, day_start=period_start("day"),
                    guild_id=request.guild_id, guild_cap_micros=guild_cap,
                    period_start=period_start(self.budget_period),
                )
                self.jobs.update(job.id, estimate_micros=estimate)

        try:
            reserving = asyncio.ensure_future(asyncio.to_thread(reserve))
            try:
                await asyncio.shield(reserving)
            except asyncio.CancelledError:
                # Let the reservation land before refunding it below, or the refund could miss it.
                await asyncio.gather(reserving, return_exceptions=True)
                raise
            timings["reserve"] = _ms(t)
            queue = self._queue_for(route)
            t = time.perf_counter()
            await self._wait_turn(queue, job, user, on_event)
            timings["queue"] = _ms(t)
            try:  # the slot limits calls to the generator, not the work on its result
                result = await self._generate(job, route, gen, timings, on_event)
            finally:
                queue.release()
                self._announce_positions(queue)
            return await self._check_and_store(job, gen, request, result, timings)
        except InsufficientFunds as exc:
            return await self._finish(job, "refused", OVER_BUDGET, str(exc), timings)
        except (SpendCapReached, GuildCapReached) as exc:
            return await self._finish(job, "refused", SPEND_CAP, str(exc), timings)
        except asyncio.CancelledError:
            await asyncio.shield(self._finish(job, "cancelled", CANCELLED, "cancelled", timings))
            raise
        except _Refusal as exc:
            return await self._finish(job, exc.status, exc.code, str(exc), timings)
        except Exception as exc:  # a bug must refund too, and leave a trace
            log.exception("job %s failed unexpectedly", job.id)
            return await self._finish(job, "failed", FAILED, f"internal error ({exc.__class__.__name__})", timings)

    def _queue_for(self, route: Route) -> FairQueue:
        provider = route.spec.provider
        if provider not in self._queues:
            self._queues[provider] = FairQueue(self.queue_limits.get(provider, 4))
        return self._queues[provider]

    async def _wait_turn(self, queue: FairQueue, job: JobRecord, user: str, on_event) -> None:
        acquire = asyncio.ensure_future(queue.acquire(job.id, user))
        await asyncio.sleep(0)  # let it enqueue (or take a free slot) before we report
        if not acquire.done() and on_event is not None:
            self._waiting_sinks[job.id] = (user, on_event)
            on_event(JobEvent(job.id, "queued", position=queue.position(job.id)))
        try:
            await acquire
        except asyncio.CancelledError:
            acquire.cancel()
            raise
        finally:
            self._waiting_sinks.pop(job.id, None)
            self._announce_positions(queue)

    def _announce_positions(self, queue: FairQueue) -> None:
        for position, job_id in enumerate(queue.order(), start=1):
            sink = self._waiting_sinks.get(job_id)
            if sink is not None:
                sink[1](JobEvent(job_id, "queued", position=position))

    async def _generate(self, job, route: Route, gen: GenerationRequest, timings, on_event) -> GeneratedImage:
        loop = asyncio.get_running_loop()
        await asyncio.to_thread(self.jobs.update, job.id, status="running", started_at=time.time())
        if on_event is not None:
            on_event(JobEvent(job.id, "running"))

        def progress(fraction: float, preview: bytes | None = None) -> None:
            # Generators call this from their worker threads.
            if on_event is not None:
                loop.call_soon_threadsafe(on_event, JobEvent(job.id, "progress", fraction=fraction, preview=preview))

        t = time.perf_counter()
        try:
            result = await asyncio.wait_for(
                self.router.generate(route, gen, progress), timeout=self.job_timeout_s
            )
        except ContentPolicyError as exc:
            raise _Refusal(BLOCKED, f"the provider refused this request on content grounds: {exc}", "blocked")
        except asyncio.TimeoutError:
            raise _Refusal(FAILED, f"{route.spec.name} took longer than {self.job_timeout_s:g}s", "failed")
        except GeneratorError as exc:
            raise _Refusal(FAILED, f"{route.spec.name} failed: {exc}", "failed")
        timings["generate"] = _ms(t)
        return result

    async def _check_and_store(self, job, gen: GenerationRequest, request: JobRequest,
                               result: GeneratedImage, timings) -> JobOutcome:
        t = time.perf_counter()
        try:
            checked = await asyncio.to_thread(self._validate_output, result, gen)
        except ImageRejected as exc:
            raise _Refusal(FAILED, f"{result.model} returned an unusable image: {exc}", "failed")
        timings["validate"] = _ms(t)

        t = time.perf_counter()
        verdict = await asyncio.to_thread(
            self.image_screen.screen_image, checked.image, nsfw_channel=request.nsfw_channel
        )
        timings["screen_image"] = _ms(t)
        if not verdict.allowed:
            # The image is not kept: a blocked output is never stored or shown.
            return await self._finish(job, "blocked", BLOCKED, f"the result was blocked: {verdict.reason}",
                                timings, charge=self.blocked_outputs_are_paid, result=result)

        t = time.perf_counter()
        data = result.data if result.format == "png" else await asyncio.to_thread(encode_png, checked.image)
        stored = await asyncio.to_thread(self.blobs.put, data)
        timings["store"] = _ms(t)
        return await self._finish(job, "done", None, None, timings, charge=True, result=result, stored=stored)

    @staticmethod
    def _validate_output(result: GeneratedImage, gen: GenerationRequest):
        checked = decode_image(result.data, reject_blank=True)
        if (checked.width, checked.height) != (result.width, result.height):
            raise ImageRejected(
                f"it is {checked.width}x{checked.height}, not the {result.width}x{result.height} reported"
            )
        want, got = gen.width / gen.height, checked.width / checked.height
        if abs(got - want) / want > 0.03:
            raise ImageRejected(f"it is {checked.width}x{checked.height}, not {gen.width}x{gen.height}")
        return checked

    async def _finish(self, job: JobRecord, status: str, code: str | None, error: str | None,
                      timings: dict[str, float], **kwargs) -> JobOutcome:
        return await asyncio.to_thread(self._finish_now, job, status, code, error, timings, **kwargs)

    def _finish_now(self, job: JobRecord, status: str, code: str | None, error: str | None,
                    timings: dict[str, float], *, charge: bool = False,
                    result: GeneratedImage | None = None, stored=None) -> JobOutcome:
        """Record the end of a job and settle (`charge`) or release its money, in one transaction.

        The charge is what the generator says it will be billed, else the estimate; never more
        than was reserved."""
        values: dict[str, Any] = dict(status=status, error=error, error_code=code,
                                      timings=timings, finished_at=time.time())
        if result is not None:
            values.update(model=result.model, provider=result.provider, seed=result.seed,
                          width=result.width, height=result.height,
                          revised_prompt=result.revised_prompt, note=result.note)
        if stored is not None:
            values.update(sha256=stored.key, image_url=stored.url)
        t = time.perf_counter()
        with self.db.transaction():
            if charge:
                billed = result.cost_usd if result is not None else None
                actual = self.jobs.get(job.id).estimate_micros if billed is None else usd_to_micros(billed)
                values["cost_micros"] = self.ledger.settle(
                    job.id, actual, provider=result.provider if result is not None else None)
            else:
                self.ledger.release(job.id)
            timings["record"] = _ms(t)
            self.jobs.update(job.id, **values)
        return JobOutcome(
            status=status, job=self.jobs.get(job.id), error=error, error_code=code,
            image_path=str(stored.path) if stored is not None else None,
            balance_usd=micros_to_usd(self.ledger.balance(job.user_id).available_micros),
        )


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000, 3)


async def _image_size(data: bytes) -> tuple[int, int]:
    checked = await asyncio.to_thread(decode_image, data)
    return checked.width, checked.height


def _owner_alive(owner: str) -> bool:
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
