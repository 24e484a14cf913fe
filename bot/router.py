"""Which generator serves a model, and calling it with retries on transient failures."""
from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass
from typing import Awaitable, Callable

from generators.base import (
    GeneratedImage,
    GenerationRequest,
    Generator,
    ModelSpec,
    ProgressCallback,
    TransientGeneratorError,
)

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

    def delay(self, attempt: int, retry_after: float | None) -> float:
        """Exponential backoff with full jitter; a provider's Retry-After wins when longer."""
        backoff = random.uniform(0, min(self.max_delay_s, self.base_delay_s * 2**attempt))
        return max(backoff, retry_after or 0.0)


class Router:
    def __init__(
        self,
        generators: list[Generator],
        *,
        retry: RetryPolicy = RetryPolicy(),
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ):
        self.generators = generators
        self.retry = retry
        self._sleep = sleep
        self._routes: dict[str, Route] = {}
        self._unavailable: dict[str, str] = {}  # provider -> why
        for gen in generators:
            reason = gen.unavailable_reason()
            if reason:
                self._unavailable[gen.provider] = reason
                continue
            for spec in gen.models():
                for name in (spec.name, *spec.aliases):
                    self._routes.setdefault(name.lower(), Route(gen, spec))

    def unavailable(self) -> dict[str, str]:
        return dict(self._unavailable)

    def models(self) -> list[ModelSpec]:
        seen: dict[str, ModelSpec] = {}
        for route in self._routes.values():
            seen.setdefault(route.spec.name, route.spec)
        return list(seen.values())

    def resolve(self, name: str) -> Route:
        route = self._routes.get(name.lower())
        if route is None:
            known = ", ".join(sorted(s.name for s in self.models())) or "none"
            why = "".join(f"; {p} is unavailable: {r}" for p, r in self._unavailable.items())
            raise UnknownModel(f"unknown model {name!r}; available: {known}{why}")
        return route

    async def generate(
        self, route: Route, request: GenerationRequest, progress: ProgressCallback | None = None
    ) -> GeneratedImage:
        attempt = 0
        while True:
            try:
                return await route.generator.generate(request, progress)
            except TransientGeneratorError as exc:
                attempt += 1
                if attempt >= self.retry.attempts:
                    raise
                delay = self.retry.delay(attempt, exc.retry_after)
                log.warning("%s failed (%s); retry %d in %.1fs", route.spec.name, exc, attempt, delay)
                await self._sleep(delay)

    async def close(self) -> None:
        for gen in self.generators:
            await gen.close()
