"""Flux schnell on Together AI, through the `openai` SDK pointed at Together's OpenAI-compatible API.

The `together` SDK's dependency pins clash with ours, and Together's `POST /v1/images/generations`
speaks OpenAI's wire format; its own fields (width, height, steps, seed) travel in `extra_body`.
"""
from __future__ import annotations

import os
import secrets

from bot.core.models import (
    GeneratedImage,
    GenerationRequest,
    ModelSpec,
    ProgressCallback,
)
from generators.cloud import OpenAICompatible, find_model

PROVIDER = "together"
DEFAULT_BASE_URL = "https://api.together.xyz/v1"
BASE_URL_ENV = "TOGETHER_BASE_URL"  # as the `together` SDK reads it

MODELS: tuple[ModelSpec, ...] = (
    ModelSpec(
        name="together/flux-schnell",
        provider=PROVIDER,
        kinds=frozenset({"imagine"}),
        negative_prompt=False,
        min_side=256,
        max_side=1440,
        size_step=16,
        default_size=(1024, 1024),
        aliases=("flux",),
        steps=(1, 4),
        guidance=None,
        description="Flux schnell on Together AI: fast and cheap; any size, multiples of 16",
    ),
)
MODEL_IDS = {"together/flux-schnell": "black-forest-labs/FLUX.1-schnell"}
DEFAULT_STEPS = 4  # sent explicitly: Together's per-megapixel price is for its default step count

# USD per megapixel, a megapixel counted as 1,000,000 pixels (which errs high for 1024x1024).
DEFAULT_PRICES: dict[str, float] = {"together/flux-schnell/megapixel": 0.0027}


class TogetherFlux(OpenAICompatible):
    """Generator for Flux schnell on Together AI."""

    provider = PROVIDER
    key_name = "Together API key"
    service = "Together"
    MODELS = MODELS
    DEFAULT_PRICES = DEFAULT_PRICES
    DEFAULT_TIMEOUT_S = 60.0

    def __init__(self, api_key: str, *, base_url: str | None = None, **kwargs):
        super().__init__(api_key, base_url=base_url, **kwargs)
        # Never OPENAI_BASE_URL: that one points at OpenAI (or its gateway), not at Together.
        self._base_url = base_url or os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL

    def _cost(self, spec: ModelSpec, width: int, height: int) -> float:
        return self._prices[f"{spec.name}/megapixel"] * width * height / 1e6

    def estimate_cost(self, request: GenerationRequest) -> float:
        spec = find_model(self._models, request.model)
        spec.check(request)
        return self._cost(spec, request.width, request.height)

    async def generate(
        self, request: GenerationRequest, progress: ProgressCallback | None = None
    ) -> GeneratedImage:
        spec = find_model(self._models, request.model)
        spec.check(request)
        steps = request.steps if request.steps is not None else DEFAULT_STEPS
        seed = request.seed if request.seed is not None else secrets.randbelow(2**31)
        response = await self._images(
            "generate",
            model=MODEL_IDS[spec.name],
            prompt=request.prompt,
            n=1,
            response_format="b64_json",
            extra_body={
                "width": request.width,
                "height": request.height,
                "steps": steps,
                "seed": seed,
                "output_format": "png",
            },
        )

        image = await self._first_image(response, (request.width, request.height))
        return GeneratedImage(
            data=image.png,
            width=image.width,
            height=image.height,
            model=spec.name,
            provider=PROVIDER,
            seed=seed,
            cost_usd=self._cost(spec, image.width, image.height),
        )
