"""Flux schnell and dev (FP8) on Fireworks AI, with aiohttp against Fireworks' documented
image-workflow endpoint:

    POST {base}/workflows/accounts/fireworks/models/<model>/text_to_image
    Authorization: Bearer <FIREWORKS_API_KEY>
    Accept: image/png
    {"prompt", "aspect_ratio", "num_inference_steps", "guidance_scale", "seed"}

answered with the PNG bytes themselves, and the headers `Finish-Reason` (SUCCESS, or
CONTENT_FILTERED for an image its safety checker blanked) and `Seed`. `Accept: image/png` rather
than `application/json` (which wraps the image in base64): a third less to transfer and no JSON
to pick apart; an answer of any other type (a JSON error, a proxy's HTML page) is reported as
such.

Why not the `fireworks-ai` SDK: its client (1.2, generated from Fireworks' OpenAPI description)
covers chat, completions, models and deployments but has no resource for image workflows, so it
would only be a second HTTP stack carrying a raw POST; and it pins dependencies (certifi,
httpx-aiohttp) that easel does not otherwise need. aiohttp is already a core dependency, and it is
what generators/download.py fetches with.
"""
from __future__ import annotations

import asyncio
import json
import re
import secrets
from typing import Any

from bot.core.models import (
    ContentPolicyError,
    GeneratedImage,
    GenerationRequest,
    GeneratorError,
    GeneratorUnavailable,
    ModelSpec,
    ProgressCallback,
    TransientGeneratorError,
)
from generators.cloud import CloudGenerator, describe_answer, find_model, is_json
from generators.download import (
    MAX_IMAGE_BYTES,
    check_ratio,
    checked_png,
    parse_retry_after,
)

PROVIDER = "fireworks"
DEFAULT_BASE_URL = "https://api.fireworks.ai/inference/v1"
BASE_URL_ENV = "FIREWORKS_BASE_URL"

# The aspect ratios Fireworks' Flux workflows take, and what they make (1 megapixel).
FLUX_SIZES: dict[str, tuple[int, int]] = {
    "1:1": (1024, 1024),
    "21:9": (1536, 640),
    "16:9": (1344, 768),
    "3:2": (1216, 832),
    "5:4": (1088, 896),
    "4:5": (896, 1088),
    "2:3": (832, 1216),
    "9:16": (768, 1344),
    "9:21": (640, 1536),
}
ASPECT_RATIO_OF = {size: ratio for ratio, size in FLUX_SIZES.items()}

MODELS: tuple[ModelSpec, ...] = (
    ModelSpec(
        name="fireworks/flux-schnell",
        provider=PROVIDER,
        kinds=frozenset({"imagine"}),
        negative_prompt=False,
        sizes=tuple(FLUX_SIZES.values()),
        max_side=1536,
        default_size=(1024, 1024),
        aliases=("flux",),
        steps=(1, 4),
        guidance=None,
        description="Flux schnell (FP8) on Fireworks AI: fast and cheapest",
    ),
    ModelSpec(
        name="fireworks/flux-dev",
        provider=PROVIDER,
        kinds=frozenset({"imagine"}),
        negative_prompt=False,
        sizes=tuple(FLUX_SIZES.values()),
        max_side=1536,
        default_size=(1024, 1024),
        aliases=("flux-dev",),
        steps=(1, 50),
        guidance=(0.0, 10.0),
        description="Flux dev (FP8) on Fireworks AI: higher quality than schnell; billed per step",
    ),
)
MODEL_IDS = {"fireworks/flux-schnell": "flux-1-schnell-fp8", "fireworks/flux-dev": "flux-1-dev-fp8"}
DEFAULT_STEPS = {"fireworks/flux-schnell": 4, "fireworks/flux-dev": 28}

# USD: schnell per image (its 4 steps, about $0.00035 a step); dev per inference step.
DEFAULT_PRICES: dict[str, float] = {
    "fireworks/flux-schnell/image": 0.0014,
    "fireworks/flux-dev/step": 0.0005,
}
REFUSAL_WORDING = re.compile(r"nsfw|safety|content (filter|polic)|moderat|flagged", re.IGNORECASE)


def _redact(text: str, secret: str) -> str:
    return text.replace(secret, "[redacted]") if secret else text


class _Answer:
    """What describe_answer reads: headers and content."""

    def __init__(self, headers: Any, content: bytes):
        self.headers, self.content = headers, content


class FireworksFlux(CloudGenerator):
    """Generator for Flux schnell and dev on Fireworks AI."""

    provider = PROVIDER
    sdk_module = "aiohttp"
    key_name = "Fireworks API key"
    MODELS = MODELS
    DEFAULT_PRICES = DEFAULT_PRICES
    DEFAULT_TIMEOUT_S = 60.0

    def __init__(self, api_key: str, *, base_url: str | None = None, **kwargs: Any):
        super().__init__(api_key, base_url=base_url, **kwargs)
        import os

        self._base_url = (base_url or os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL).rstrip("/")

    def unavailable_reason(self) -> str | None:
        if not self._api_key:
            return "no Fireworks API key is configured: set FIREWORKS_API_KEY"
        return super().unavailable_reason()

    def _cost(self, spec: ModelSpec, steps: int) -> float:
        if spec.name == "fireworks/flux-schnell":
            return self._prices["fireworks/flux-schnell/image"]
        return self._prices["fireworks/flux-dev/step"] * steps

    def estimate_cost(self, request: GenerationRequest) -> float:
        spec = find_model(self._models, request.model)
        spec.check(request)
        return self._cost(spec, request.steps or DEFAULT_STEPS[spec.name])

    async def generate(
        self, request: GenerationRequest, progress: ProgressCallback | None = None
    ) -> GeneratedImage:
        spec = find_model(self._models, request.model)
        spec.check(request)
        steps = request.steps or DEFAULT_STEPS[spec.name]
        seed = request.seed if request.seed is not None else secrets.randbelow(2**31)
        body: dict[str, Any] = {
            "prompt": request.prompt,
            "aspect_ratio": ASPECT_RATIO_OF[(request.width, request.height)],
            "num_inference_steps": steps,
            "seed": seed,
        }
        if spec.guidance is not None:
            body["guidance_scale"] = request.guidance if request.guidance is not None else 3.5
        url = f"{self._base_url}/workflows/accounts/fireworks/models/{MODEL_IDS[spec.name]}/text_to_image"
        status, headers, data = await self._post(url, body)
        answer = _Answer(headers, data)
        content_type = headers.get("content-type", "").split(";")[0].strip().lower()
        if status != 200:
            raise self._error(spec, status, headers, data)
        if not content_type.startswith("image/"):
            what = "JSON, not an image" if is_json(data) else "something that is not an image"
            # Not retried: the image may have been made (and billed) all the same.
            raise GeneratorError(f"Fireworks answered with {what} ({describe_answer(answer)})")
        finish = headers.get("finish-reason", "SUCCESS").upper()
        if finish == "CONTENT_FILTERED":
            raise ContentPolicyError(f"{spec.name}: Fireworks' safety checker filtered the image")
        if finish not in ("SUCCESS", ""):
            raise GeneratorError(f"{spec.name} failed on Fireworks (finish reason {finish[:40]})")
        try:
            made_seed = int(headers.get("seed", seed))
        except ValueError:
            made_seed = seed
        image = await checked_png(data)
        check_ratio(spec.name, request, image.width, image.height)
        return GeneratedImage(
            data=image.png,
            width=image.width,
            height=image.height,
            model=spec.name,
            provider=PROVIDER,
            seed=made_seed,
            cost_usd=self._cost(spec, steps),
        )

    async def _post(self, url: str, body: dict[str, Any]) -> tuple[int, Any, bytes]:
        """POST the request; (status, headers, body), the whole exchange within timeout_s and the
        body capped at MAX_IMAGE_BYTES."""
        import aiohttp

        headers = {"Authorization": f"Bearer {self._api_key}", "Accept": "image/png"}
        try:
            async with asyncio.timeout(self._timeout_s):
                async with self._http().post(url, json=body, headers=headers) as resp:
                    if resp.content_length is not None and resp.content_length > MAX_IMAGE_BYTES:
                        raise GeneratorError(f"Fireworks' answer is {resp.content_length} bytes, over the limit")
                    data = bytearray()
                    async for chunk in resp.content.iter_chunked(64 * 1024):
                        data += chunk
                        if len(data) > MAX_IMAGE_BYTES:
                            raise GeneratorError("Fireworks' answer is over the size limit")
                    return resp.status, resp.headers, bytes(data)
        except TimeoutError:
            raise TransientGeneratorError(f"Fireworks did not answer within {self._timeout_s:g} s") from None
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError):
            raise TransientGeneratorError("could not connect to Fireworks") from None

    def _error(self, spec: ModelSpec, status: int, headers: Any, data: bytes) -> GeneratorError:
        message = "no details given"
        if data.strip() and not is_json(data):
            message = f"an answer that is not JSON ({describe_answer(_Answer(headers, data))})"
        elif data.strip():
            parsed = json.loads(data)
            error = parsed.get("error", parsed) if isinstance(parsed, dict) else parsed
            if isinstance(error, dict):
                message = str(error.get("message") or error.get("detail") or message)
            elif isinstance(error, str):
                message = error
        message = _redact(message, self._api_key)[:500]
        if status in (401, 403):
            # Fireworks' own message may quote the key: not passed on. Unavailable: a fallback serves.
            return GeneratorUnavailable(f"Fireworks rejected the API key (HTTP {status}); check FIREWORKS_API_KEY")
        if status == 429:
            return TransientGeneratorError(
                f"Fireworks is rate limiting requests (HTTP 429): {message}",
                retry_after=parse_retry_after(headers),
            )
        if status >= 500 or status == 408:
            return TransientGeneratorError(f"Fireworks failed with HTTP {status}: {message}")
        if status in (400, 422) and REFUSAL_WORDING.search(message):
            return ContentPolicyError(f"{spec.name} refused the request on content grounds: {message}")
        return GeneratorError(f"Fireworks refused the request (HTTP {status}): {message}")
