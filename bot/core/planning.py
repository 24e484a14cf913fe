"""Planning: everything that can be decided before money is reserved. Which models may serve,
the earlier job or upload the request starts from, the size, the seed, and one capability check
per candidate model; the cheapest healthy candidate wins."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import dataclass

from .access import find
from .flags import size_for_aspect
from .models import (
    CONTROL_OPTION,
    MAX_SEED,
    ErrorCode,
    GenerationParams,
    GenerationRequest,
    JobRecord,
    JobRequest,
    JobStatus,
    Kind,
    ModelSpec,
    Refusal,
    UnsupportedRequest,
    size_text,
)
from .negatives import negative_for
from .policy import Policy
from .ports import BlobStore, ImageCodec, JobStore, Preferences
from .prompting import Normalised, visible
from .routing import Route, Router, UnknownModel

# Fixed-size models: the nearest size must be within this share of the asked aspect ratio.
ASPECT_TOLERANCE = 0.15


OUTPAINTS = ("zoom", "left", "right", "up", "down")


@dataclass(frozen=True)
class Plan:
    route: Route
    request: GenerationRequest
    source: JobRecord | None  # the earlier job it starts from
    outpaint: str | None = None  # an outpainting: the source's pixels are put back after


@dataclass(frozen=True)
class _Inputs:
    source: JobRecord | None
    image: bytes | None  # PNG: the source job's image or the checked upload
    mask: bytes | None
    params: GenerationParams  # with the source's prompt where none was given


class Planner:
    def __init__(
        self,
        policy: Policy,
        router: Router,
        jobs: JobStore,
        blobs: BlobStore,
        codec: ImageCodec,
        preferences: Preferences,
        random_seed: Callable[[], int] = lambda: random.randint(0, MAX_SEED),
    ):
        self.policy, self.router, self.jobs, self.blobs = policy, router, jobs, blobs
        self.codec, self.preferences, self.random_seed = codec, preferences, random_seed

    async def plan(self, request: JobRequest, asked: Normalised) -> Plan:
        inputs = await self._inputs(request, asked.params)
        params = inputs.params
        strength = params.strength
        if request.kind == Kind.VARIATION and strength is None:
            strength = self.policy.default_strength
        if strength is not None and not 0.0 < strength <= 1.0:
            raise Refusal(ErrorCode.USAGE, "strength must be greater than 0 and at most 1")
        # Chosen once and recorded, so the image can be remade; models that cannot honour a
        # seed get none (and refuse one that was asked for).
        seed = params.seed if params.seed is not None else self.random_seed()
        # An imagine's uploaded image is what its ControlNet follows, not a source to redraw.
        control = request.kind == Kind.IMAGINE and CONTROL_OPTION in params.options
        options: list[tuple[Route, GenerationRequest]] = []
        refusal: Refusal | None = None
        for route in await asyncio.to_thread(self._candidates, params.model, request, inputs.source):
            spec = route.spec
            try:
                size = await self._size(request, spec, asked.aspect, inputs)
                honoured = seed if (params.seed is not None or spec.honours_seed) else None
                negative = (
                    params.negative_prompt
                    if request.kind == Kind.UPSCALE
                    else negative_for(
                        params.negative_prompt, spec, params.guidance, self.policy.negative_prompts
                    )
                )
                gen = GenerationRequest(
                    kind=request.kind,
                    params=params.but(
                        model=spec.name,
                        size=size,
                        seed=honoured,
                        strength=strength,
                        negative_prompt=negative,
                    ),
                    source_image=None if control else inputs.image,
                    mask_image=inputs.mask,
                    upscale_factor=self.policy.upscale_factor,
                    control_image=inputs.image if control else None,
                )
                spec.check(gen)
                options.append((route, gen))
            except UnsupportedRequest as exc:
                refusal = refusal or Refusal(ErrorCode.USAGE, str(exc))
            except Refusal as exc:
                refusal = refusal or exc
        if not options:
            assert refusal is not None
            raise refusal
        route, gen = self.router.cheapest(options)
        return Plan(route, gen, inputs.source, request.outpaint)

    # ---- inputs -----------------------------------------------------------------------------

    async def _inputs(self, request: JobRequest, params: GenerationParams) -> _Inputs:
        if request.outpaint is not None:
            return await self._outpaint_inputs(request, params)
        source: JobRecord | None = None
        image = mask = None
        if request.kind in (Kind.VARIATION, Kind.UPSCALE) and request.image is None:
            source = await asyncio.to_thread(self._source_job, request)
            assert source.sha256 is not None
            image = await asyncio.to_thread(self.blobs.get, source.sha256)
            params = params.but(
                prompt=params.prompt or source.prompt,
                negative_prompt=params.negative_prompt
                if params.negative_prompt is not None
                else source.negative_prompt,
            )
        if request.kind == Kind.IMAGINE and request.source_job_id is not None and request.image is None:
            # An earlier result as the image a ControlNet follows (access as for a variation).
            if CONTROL_OPTION not in params.options:
                raise Refusal(
                    ErrorCode.USAGE, "an earlier image for imagine is a control image: give control too"
                )
            source = await asyncio.to_thread(self._source_job, request)
            assert source.sha256 is not None
            image = await asyncio.to_thread(self.blobs.get, source.sha256)
        if request.image is not None:
            image = await self._checked_upload(request.image, "image")
        if request.mask is not None:
            if request.kind != Kind.EDIT:
                raise Refusal(ErrorCode.USAGE, "a mask only applies to edit")
            mask = await self._checked_upload(request.mask, "mask")
        if request.kind == Kind.EDIT and image is None:
            raise Refusal(ErrorCode.USAGE, "edit needs an image")
        if request.kind in (Kind.IMAGINE, Kind.EDIT) and not visible(params.prompt):
            raise Refusal(ErrorCode.USAGE, "the prompt is empty")
        if mask is not None and image is not None:
            m, i = await self._dimensions(mask), await self._dimensions(image)
            if m != i:
                raise Refusal(
                    ErrorCode.USAGE,
                    f"the mask is {m[0]}x{m[1]} but the image is {i[0]}x{i[1]}; they must match",
                )
        return _Inputs(source, image, mask, params)

    async def _outpaint_inputs(self, request: JobRequest, params: GenerationParams) -> _Inputs:
        """Zoom out or pan: an edit of the source image on a larger canvas, the new area masked."""
        if request.outpaint not in OUTPAINTS:
            raise Refusal(
                ErrorCode.USAGE, f"outpainting is one of {', '.join(OUTPAINTS)}, not {request.outpaint!r}"
            )
        if request.kind != Kind.EDIT or request.mask is not None:
            raise Refusal(ErrorCode.USAGE, "outpainting is an edit of an earlier image, without a mask")
        if request.image is not None:
            source, image = None, await self._checked_upload(request.image, "image")
        else:
            source = await asyncio.to_thread(self._source_job, request)
            assert source.sha256 is not None
            image = await asyncio.to_thread(self.blobs.get, source.sha256)
        canvas, mask = await asyncio.to_thread(self.codec.extend, image, request.outpaint)
        w, h = await self._dimensions(canvas)
        if w * h > self.policy.max_upload_pixels:
            raise Refusal(ErrorCode.USAGE, f"the outpainted image would be {w}x{h}, over easel's pixel limit")
        params = params.but(
            prompt=params.prompt or (source.prompt if source else ""),
            negative_prompt=params.negative_prompt
            if params.negative_prompt is not None
            else (source.negative_prompt if source else None),
        )
        if not visible(params.prompt):
            raise Refusal(ErrorCode.USAGE, "outpainting an upload needs a prompt")
        return _Inputs(source, canvas, mask, params)

    def _source_job(self, request: JobRequest) -> JobRecord:
        if request.source_job_id is not None:
            source = find(self.jobs, request.source_job_id, request.requester)
        else:
            latest = self.jobs.latest_done(request.user_id)
            if latest is None:
                raise Refusal(
                    ErrorCode.USAGE, f"{request.kind} needs an earlier image, and there is none yet"
                )
            source = latest
        if source.status != JobStatus.DONE or not source.sha256:
            raise Refusal(ErrorCode.USAGE, f"job {source.id} has no image ({source.status})")
        if not self.blobs.exists(source.sha256):
            raise Refusal(ErrorCode.USAGE, f"the image of job {source.id} is no longer stored")
        return source

    async def _checked_upload(self, data: bytes, what: str) -> bytes:
        limit = self.policy.max_upload_bytes
        if len(data) > limit:
            raise Refusal(
                ErrorCode.USAGE,
                f"the {what} is {size_text(len(data))}; the limit is {size_text(limit)}",
            )

        def check() -> bytes:
            decoded = self.codec.decode(data, max_pixels=self.policy.max_upload_pixels)
            return self.codec.to_png(decoded, "L" if what == "mask" else "RGB")

        try:
            return await asyncio.to_thread(check)
        except self.codec.rejected as exc:
            raise Refusal(ErrorCode.USAGE, f"the {what} was not accepted: {exc}") from None

    async def _dimensions(self, data: bytes) -> tuple[int, int]:
        decoded = await asyncio.to_thread(self.codec.decode, data)
        return decoded.width, decoded.height

    # ---- models and sizes -------------------------------------------------------------------

    def _candidates(self, model: str | None, request: JobRequest, source: JobRecord | None) -> list[Route]:
        """The models that may serve: those the name leads to; without a name, the first of the
        source's model, the guild's default and the server's default that can do the request,
        else any model that can."""
        if model is None:
            guild = request.requester.guild_id
            guild_default = self.preferences.guild(guild).default_model if guild else None
            preferred = [source.model if source else None, guild_default, self.policy.default_model]
            capable = [n for n in preferred if self._can(n, request.kind)]
            if capable:
                model = capable[0]
            else:
                routes = [
                    self.router.resolve(s.name) for s in self.router.models() if request.kind in s.kinds
                ]
                if routes:
                    return routes
                model = self.policy.default_model
        assert model is not None
        try:
            return self.router.routes_for(model)
        except UnknownModel as exc:
            raise Refusal(ErrorCode.USAGE, str(exc)) from None

    def _can(self, model: str | None, kind: Kind) -> bool:
        if not model:
            return False
        try:
            return kind in self.router.resolve(model).spec.kinds
        except UnknownModel:
            return False

    async def _size(
        self, request: JobRequest, spec: ModelSpec, aspect: tuple[int, int] | None, inputs: _Inputs
    ) -> tuple[int, int]:
        source, factor = inputs.source, self.policy.upscale_factor
        if request.kind == Kind.UPSCALE:
            if source is not None and source.width and source.height:
                w, h = source.width, source.height
            else:
                assert inputs.image is not None
                w, h = await self._dimensions(inputs.image)
            return w * factor, h * factor
        if request.params.size is not None:
            if aspect is not None:
                raise Refusal(ErrorCode.USAGE, "give a size or an aspect ratio, not both")
            return request.params.size
        if aspect is None and inputs.image is not None:
            if source is not None and request.kind == Kind.VARIATION and source.width and source.height:
                return source.width, source.height
            aspect = await self._dimensions(inputs.image)
        if aspect is None:
            return spec.default_size
        if spec.sizes is None:
            area = spec.default_size[0] * spec.default_size[1]
            return size_for_aspect(aspect, area, spec.size_step)
        # Fixed sizes: the one whose ratio is nearest, if it is near enough to honour the request.
        want = aspect[0] / aspect[1]
        best = min(spec.sizes, key=lambda s: abs(s[0] / s[1] - want))
        if abs(best[0] / best[1] - want) / want > ASPECT_TOLERANCE:
            sizes = ", ".join(f"{w}x{h}" for w, h in spec.sizes)
            raise Refusal(
                ErrorCode.USAGE,
                f"{spec.name} has no size near {aspect[0]}:{aspect[1]}; it makes {sizes}",
            )
        return best
