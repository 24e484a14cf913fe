"""Which generator serves a model, and calling it: retries for transient failures, a circuit
breaker per provider, and a configured fallback model while a provider is down."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from .models import (
    ContentPolicyError,
    GeneratedImage,
    GenerationRequest,
    GeneratorUnavailable,
    ModelSpec,
    ProgressCallback,
    TransientGeneratorError,
    UnsupportedRequest,
)
from .ports import Generator

log = logging.getLogger(__name__)


class UnknownModel(LookupError):
    pass


@dataclass(frozen=True)
class Route:
    generator: Generator
    spec: ModelSpec


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 3
    base_delay_s: float = 1.0
    max_delay_s: float = 30.0
    # A provider asking to wait longer than this (Retry-After) is given up on at once, rather than
    # waited for with the user's money held.
    max_retry_after_s: float = 60.0

    def delay(self, attempt: int, retry_after: float | None) -> float:
        """Exponential backoff with full jitter; a provider's Retry-After wins when longer."""
        backoff = random.uniform(0, min(self.max_delay_s, self.base_delay_s * 2**attempt))
        return max(backoff, retry_after or 0.0)


class CircuitBreaker:
    """Opens after `failures` failed jobs in a row; after `cooldown_s` lets one trial through
    (half-open): success closes it, failure opens it again."""

    def __init__(self, failures: int, cooldown_s: float, clock: Callable[[], float] = time.monotonic):
        self.failures, self.cooldown_s, self.clock = failures, cooldown_s, clock
        self._count = 0
        self._opened_at: float | None = None
        self._trial = False

    @property
    def state(self) -> str:
        if self._opened_at is None:
            return "closed"
        return "half-open" if self.clock() - self._opened_at >= self.cooldown_s else "open"

    def allow(self) -> bool:
        state = self.state
        if state == "closed":
            return True
        if state == "half-open" and not self._trial:
            self._trial = True
            return True
        return False

    def record_success(self) -> None:
        self._count, self._opened_at, self._trial = 0, None, False

    def record_failure(self) -> None:
        self._count += 1
        self._trial = False
        if self._opened_at is not None or self._count >= self.failures:
            self._opened_at = self.clock()


class Router:
    def __init__(
        self,
        generators: list[Generator],
        *,
        retry: RetryPolicy = RetryPolicy(),
        fallbacks: dict[str, str] | None = None,
        breaker_failures: int = 3,
        breaker_cooldown_s: float = 60.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
        on_failure: Callable[[str, str], None] | None = None,
    ):
        self.generators = generators
        self._on_failure = on_failure or (lambda provider, kind: None)
        self.retry = retry
        self._sleep = sleep
        # A model's name leads to that model; an alias ("flux") may lead to several models of
        # different providers, and the job goes to the cheapest healthy one.
        self._routes: dict[str, list[Route]] = {}
        self._unavailable: dict[str, str] = {}  # provider -> why
        for gen in generators:
            reason = gen.unavailable_reason()
            if reason:
                self._unavailable[gen.provider] = reason
                continue
            for spec in gen.models():  # the first generator to offer a name keeps it
                self._routes.setdefault(spec.name.lower(), [Route(gen, spec)])
        for gen in generators:
            if gen.provider in self._unavailable:
                continue
            for spec in gen.models():
                for alias in spec.aliases:
                    routes = self._routes.setdefault(alias.lower(), [])
                    if routes and routes[0].spec.name.lower() == alias.lower():
                        continue  # a model's own name wins over another's alias
                    routes.append(Route(gen, spec))
        self.breakers = {
            g.provider: CircuitBreaker(breaker_failures, breaker_cooldown_s, clock) for g in generators
        }
        self.fallbacks: dict[str, str] = {}
        for model, fallback in (fallbacks or {}).items():
            if model.lower() in self._routes and fallback.lower() in self._routes:
                self.fallbacks[self.resolve(model).spec.name] = self.resolve(fallback).spec.name

    def unavailable(self) -> dict[str, str]:
        return dict(self._unavailable)

    def models(self) -> list[ModelSpec]:
        seen: dict[str, ModelSpec] = {}
        for routes in self._routes.values():
            for route in routes:
                seen.setdefault(route.spec.name, route.spec)
        return list(seen.values())

    def healthy(self, route: Route) -> bool:
        return self.breakers[route.generator.provider].state != "open"

    def healthy_models(self) -> list[ModelSpec]:
        return [s for s in self.models() if self.healthy(self.resolve(s.name))]

    def routes_for(self, name: str) -> list[Route]:
        """Every model a name or alias leads to."""
        routes = self._routes.get(name.lower())
        if not routes:
            known = ", ".join(sorted(s.name for s in self.models())) or "none"
            why = "".join(f"; {p} is unavailable: {r}" for p, r in self._unavailable.items())
            raise UnknownModel(f"unknown model {name!r}; available: {known}{why}")
        return list(routes)

    def resolve(self, name: str) -> Route:
        return self.routes_for(name)[0]

    def cheapest(self, options: list[tuple[Route, GenerationRequest]]) -> tuple[Route, GenerationRequest]:
        """Of the models that could serve a request, a healthy one with the lowest estimate."""

        def key(option: tuple[Route, GenerationRequest]) -> tuple[bool, float]:
            route, request = option
            return (not self.healthy(route), route.generator.estimate_cost(request))

        return min(options, key=key)

    def candidates(self, route: Route, request: GenerationRequest) -> list[tuple[Route, GenerationRequest]]:
        """The route, then its fallback chain, each with the request as that model takes it.
        A fallback that cannot serve the request as asked (size, seed, kind) is left out."""
        out = [(route, request)]
        seen = {route.spec.name}
        name = self.fallbacks.get(route.spec.name)
        while name is not None and name not in seen:
            seen.add(name)
            fallback = self.resolve(name)
            moved = request.for_model(fallback.spec.name)
            try:
                fallback.spec.check(moved)
                out.append((fallback, moved))
            except UnsupportedRequest:
                pass
            name = self.fallbacks.get(name)
        return out

    async def generate(
        self,
        route: Route,
        request: GenerationRequest,
        progress: ProgressCallback | None = None,
        *,
        deadline: float | None = None,
    ) -> GeneratedImage:
        """Generate with the route's model, or a fallback while its provider fails. The result
        names the model that really made the image. `deadline` (a `loop.time()` value) is when
        the job's time runs out: no wait between attempts goes past it."""
        last: Exception | None = None
        for candidate, req in self.candidates(route, request):
            breaker = self.breakers[candidate.generator.provider]
            if not breaker.allow():
                last = last or TransientGeneratorError(
                    f"{candidate.generator.provider} is out of rotation after repeated failures"
                )
                continue
            try:
                result = await self._with_retries(candidate, req, progress, deadline)
            except (TransientGeneratorError, GeneratorUnavailable) as exc:
                breaker.record_failure()
                log.warning("%s failed: %s", candidate.spec.name, exc)
                last = exc
                continue
            # Other errors (a bad request, a content-policy refusal) are about this request, not
            # the provider's health, and another model would refuse it too: they propagate.
            breaker.record_success()
            return result
        assert last is not None
        raise last

    async def _with_retries(
        self,
        route: Route,
        request: GenerationRequest,
        progress: ProgressCallback | None,
        deadline: float | None,
    ) -> GeneratedImage:
        attempt = 0
        while True:
            try:
                return await self._attempt(route, request, progress)
            except TransientGeneratorError as exc:
                attempt += 1
                if attempt >= self.retry.attempts:
                    raise
                delay = self._wait_before_retry(route, exc, attempt, deadline)
                log.warning("%s failed (%s); retry %d in %.1fs", route.spec.name, exc, attempt, delay)
                await self._sleep(delay)

    async def _attempt(
        self, route: Route, request: GenerationRequest, progress: ProgressCallback | None
    ) -> GeneratedImage:
        """One call of the generator; a failure is reported by kind (for metrics)."""
        try:
            return await route.generator.generate(request, progress)
        except Exception as exc:
            self._on_failure(route.generator.provider, failure_kind(exc))
            raise

    def _wait_before_retry(
        self, route: Route, exc: TransientGeneratorError, attempt: int, deadline: float | None
    ) -> float:
        """How long to wait before the next attempt; raises (giving up on the route, so that a
        fallback serves or the job fails and is refunded) when that wait is not worth making:
        the provider asks for more than `max_retry_after_s`, or for more than the job has left."""
        provider = route.generator.provider
        left = None if deadline is None else deadline - asyncio.get_running_loop().time()
        wait = exc.retry_after
        if wait is not None and wait > self.retry.max_retry_after_s:
            raise TransientGeneratorError(
                f"{provider} asked to wait {_seconds(wait)} s; "
                f"easel gives up after {_seconds(self.retry.max_retry_after_s)} s"
            ) from exc
        if wait is not None and left is not None and wait > left:
            raise TransientGeneratorError(
                f"{provider} asked to wait {_seconds(wait)} s; the job has {_seconds(max(left, 0.0))} s left"
            ) from exc
        delay = self.retry.delay(attempt, wait)
        if left is not None and delay >= left:
            raise exc  # the backoff would outlast the job: no time for another attempt
        return delay

    async def close(self) -> None:
        for gen in self.generators:
            await gen.close()


def _seconds(value: float) -> str:
    """Seconds for a message: 86400, 59.7, 1.5."""
    return f"{value:.0f}" if value >= 100 else f"{round(value, 1):g}"


def failure_kind(exc: BaseException) -> str:
    """A generator failure as a small set of kinds (a metrics label)."""
    if isinstance(exc, ContentPolicyError):
        return "content_policy"
    if isinstance(exc, TransientGeneratorError):
        return "rate_limited" if exc.retry_after is not None or "429" in str(exc) else "transient"
    if isinstance(exc, GeneratorUnavailable):
        return "unavailable"
    return "error"
