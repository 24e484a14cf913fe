"""Generators for pipeline tests and benchmarks: they implement the real Generator protocol and
return prepared bytes, so that everything around the generator call is what gets exercised."""
from __future__ import annotations

import asyncio
import io
from dataclasses import dataclass, field

from PIL import Image

from bot.core.models import (
    GeneratedImage,
    GenerationRequest,
    GeneratorError,
    ModelSpec,
    TransientGeneratorError,
)


def png_bytes(width: int, height: int, seed: int = 0) -> bytes:
    """A deterministic, non-blank PNG."""
    img = Image.new("RGB", (width, height))
    img.putdata([((x * 7 + seed) % 256, (y * 5) % 256, (x + y + seed) % 256)
                 for y in range(height) for x in range(width)])
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@dataclass
class PreparedGenerator:
    """Returns a prepared image of the requested size. `script` lists what the next calls do:
    an Exception to raise, bytes to return as the image, or a float of seconds to take."""

    provider: str = "fake"
    model: str = "fake-model"
    price_usd: float = 0.01
    billed_usd: float | None = None
    delay_s: float = 0.0
    honours_seed: bool = True
    kinds: tuple[str, ...] = ("imagine", "variation", "edit", "upscale")
    aliases: tuple[str, ...] | None = None  # default: (model + "-alias",)
    loras: tuple[str, ...] = ()  # LoRA and ControlNet names the model takes
    controlnets: tuple[str, ...] = ()
    script: list = field(default_factory=list)
    calls: list[GenerationRequest] = field(default_factory=list)
    _cache: dict = field(default_factory=dict)

    def models(self) -> list[ModelSpec]:
        aliases = self.aliases if self.aliases is not None else (f"{self.model}-alias",)
        return [ModelSpec(name=self.model, provider=self.provider, kinds=frozenset(self.kinds),
                          honours_seed=self.honours_seed, aliases=aliases, loras=self.loras,
                          controlnets=self.controlnets)]

    def unavailable_reason(self) -> str | None:
        return None

    def estimate_cost(self, request: GenerationRequest) -> float:
        return self.price_usd

    async def generate(self, request: GenerationRequest, progress=None) -> GeneratedImage:
        self.calls.append(request)
        step = self.script.pop(0) if self.script else None
        if isinstance(step, BaseException):
            raise step
        if isinstance(step, float):
            await asyncio.sleep(step)
        elif self.delay_s:
            await asyncio.sleep(self.delay_s)
        if progress is not None:
            progress(1.0, None)
        if isinstance(step, bytes):
            data = step
        else:
            key = (request.width, request.height, request.seed or 0)
            if key not in self._cache:
                self._cache[key] = png_bytes(request.width, request.height, request.seed or 0)
            data = self._cache[key]
        return GeneratedImage(data=data, width=request.width, height=request.height,
                              model=self.model, provider=self.provider,
                              seed=request.seed if self.honours_seed else None,
                              cost_usd=self.billed_usd if self.billed_usd is not None else self.price_usd)

    async def close(self) -> None:
        pass


__all__ = ["PreparedGenerator", "png_bytes", "GeneratorError", "TransientGeneratorError"]
