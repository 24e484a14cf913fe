"""OpenAI's image models (DALL-E 3, GPT Image 1) through the official `openai` SDK.

The SDK is imported on first use, so importing this module is free and `easel check` works without
the `cloud` extra. The SDK's own retries are off (max_retries=0): the router retries, so errors are
translated into TransientGeneratorError / ContentPolicyError / GeneratorError here instead.
"""
from __future__ import annotations

import asyncio
import re
from typing import Any

from PIL import Image, ImageOps

from bot.core.models import (
    ContentPolicyError,
    GeneratedImage,
    GenerationRequest,
    GeneratorError,
    ModelSpec,
    ProgressCallback,
    TransientGeneratorError,
    UnsupportedRequest,
)
from generators.cloud import OpenAICompatible, describe_answer, find_model, is_json
from generators.download import parse_retry_after
from generators.images import ImageRejected, decode_image, encode_png

PROVIDER = "openai"

MODELS: tuple[ModelSpec, ...] = (
    ModelSpec(
        name="dall-e-3",
        provider=PROVIDER,
        kinds=frozenset({"imagine"}),
        honours_seed=False,
        negative_prompt=False,
        sizes=((1024, 1024), (1792, 1024), (1024, 1792)),
        max_side=1792,
        max_prompt_chars=4000,
        default_size=(1024, 1024),
        aliases=("dalle", "dalle3"),
        options={"quality": ("standard", "hd"), "style": ("vivid", "natural")},
        steps=None,
        guidance=None,
        description="OpenAI DALL-E 3: follows long prompts closely; rewrites the prompt it is given",
    ),
    ModelSpec(
        name="gpt-image-1",
        provider=PROVIDER,
        kinds=frozenset({"imagine", "edit"}),
        honours_seed=False,
        negative_prompt=False,
        sizes=((1024, 1024), (1536, 1024), (1024, 1536)),
        max_side=1536,
        max_prompt_chars=32000,
        default_size=(1024, 1024),
        aliases=("gpt-image",),
        options={"quality": ("medium", "low", "high")},
        steps=None,
        guidance=None,
        description="OpenAI GPT Image 1: strong at text in images and at editing a given image",
    ),
)


# USD. DALL-E 3 bills per image; GPT Image 1 bills tokens, and its per-image prices are the output
# tokens of one image (1056 tokens at 1024x1024 medium, ...) at the image-output rate.
DEFAULT_PRICES: dict[str, float] = {
    "dall-e-3/standard/1024x1024": 0.04,
    "dall-e-3/standard/1792x1024": 0.08,
    "dall-e-3/standard/1024x1792": 0.08,
    "dall-e-3/hd/1024x1024": 0.08,
    "dall-e-3/hd/1792x1024": 0.12,
    "dall-e-3/hd/1024x1792": 0.12,
    "gpt-image-1/low/1024x1024": 0.011,
    "gpt-image-1/medium/1024x1024": 0.042,
    "gpt-image-1/high/1024x1024": 0.167,
    "gpt-image-1/low/1536x1024": 0.016,
    "gpt-image-1/medium/1536x1024": 0.063,
    "gpt-image-1/high/1536x1024": 0.25,
    "gpt-image-1/low/1024x1536": 0.016,
    "gpt-image-1/medium/1024x1536": 0.063,
    "gpt-image-1/high/1024x1536": 0.25,
    "gpt-image-1/text-input-per-1m-tokens": 5.0,
    "gpt-image-1/image-input-per-1m-tokens": 10.0,
    "gpt-image-1/image-output-per-1m-tokens": 40.0,
}
# An allowance per input image (the source and the mask) of an edit, reserved before the call;
# the real count comes back in the response's `usage` and is what cost_usd reports.
EDIT_INPUT_IMAGE_TOKENS = 1500

# Refusals: OpenAI's error codes, and for OpenAI-compatible services (Together) their wording.
CONTENT_POLICY_CODES = frozenset({"content_policy_violation", "moderation_blocked"})
REFUSAL_WORDING = re.compile(r"nsfw|safety (system|checker|filter)|content polic|flagged", re.IGNORECASE)


def redact(text: str, secret: str) -> str:
    return text.replace(secret, "[redacted]") if secret else text


def translate_openai_error(
    exc: Exception, *, service: str, api_key: str, timeout_s: float
) -> GeneratorError:
    """The GeneratorError for an exception from the `openai` SDK, without the API key in it."""
    import openai

    if isinstance(exc, openai.APITimeoutError):
        return TransientGeneratorError(f"{service} did not answer within {timeout_s:g} s")
    if isinstance(exc, openai.APIConnectionError):
        return TransientGeneratorError(f"could not connect to {service}")
    if not isinstance(exc, openai.APIStatusError):
        return GeneratorError(f"{service} returned an unexpected answer ({type(exc).__name__})")
    status = exc.status_code
    body = exc.body if isinstance(exc.body, dict) else {}
    message = redact(str(body.get("message") or "no details given"), api_key)[:500]
    if not isinstance(exc.body, dict) and exc.response.content.strip() and not is_json(exc.response.content):
        message = f"an answer that is not JSON ({describe_answer(exc.response)})"  # a proxy's page
    code = str(body.get("code") or body.get("type") or "")
    if status == 401:
        # OpenAI's 401 message quotes part of the key, so it is not passed on.
        return GeneratorError(f"{service} rejected the API key (HTTP 401); check the configured key")
    if status == 429 and code != "insufficient_quota":
        return TransientGeneratorError(
            f"{service} is rate limiting requests (HTTP 429): {message}",
            retry_after=parse_retry_after(exc.response.headers),
        )
    if status >= 500 or status in (408, 409):
        return TransientGeneratorError(f"{service} failed with HTTP {status}: {message}")
    if status in (400, 422) and (code in CONTENT_POLICY_CODES or REFUSAL_WORDING.search(message)):
        return ContentPolicyError(f"{service} refused the request on content grounds: {message}")
    what = f"HTTP {status}, {code}" if code else f"HTTP {status}"
    return GeneratorError(f"{service} refused the request ({what}): {message}")


def _alpha_mask(source_png: bytes, mask_png: bytes) -> bytes:
    """Our masks are white where the image is to be repainted (as for the local generator);
    OpenAI's are transparent there, and must match the image's size. Returns OpenAI's form."""
    try:
        source = decode_image(source_png)
        mask = decode_image(mask_png).image.convert("L")
    except ImageRejected as exc:
        raise UnsupportedRequest(f"the image or its mask is not usable: {exc}") from None
    size = (source.width, source.height)
    # Bilinear, as the local generator resizes masks: Lanczos would ring into the kept area.
    alpha = ImageOps.invert(mask if mask.size == size else mask.resize(size, Image.BILINEAR))
    out = Image.new("RGBA", size, (0, 0, 0, 255))
    out.putalpha(alpha)
    return encode_png(out)


class OpenAIImages(OpenAICompatible):
    """Generator for OpenAI's image API (`POST /v1/images/generations`, `/v1/images/edits`)."""

    provider = PROVIDER
    key_name = "OpenAI API key"
    service = "OpenAI"
    MODELS = MODELS
    DEFAULT_PRICES = DEFAULT_PRICES
    DEFAULT_TIMEOUT_S = 180.0

    def _options(self, spec: ModelSpec, request: GenerationRequest) -> dict[str, str]:
        """Every option of the model: the request's (checked by spec.check), else the default."""
        return {key: request.options.get(key, values[0]) for key, values in spec.options.items()}

    def _image_price(self, spec: ModelSpec, request: GenerationRequest, quality: str) -> float:
        return self._prices[f"{spec.name}/{quality}/{request.width}x{request.height}"]

    def estimate_cost(self, request: GenerationRequest) -> float:
        spec = find_model(self._models, request.model)
        spec.check(request)
        price = self._image_price(spec, request, self._options(spec, request)["quality"])
        if spec.name == "gpt-image-1":
            # A byte-level tokenizer never makes more tokens than the prompt has UTF-8 bytes.
            text_rate = self._prices["gpt-image-1/text-input-per-1m-tokens"]
            price += len(request.prompt.encode()) * text_rate / 1e6
            if request.kind == "edit":
                images = 1 + (request.mask_image is not None)
                rate = self._prices["gpt-image-1/image-input-per-1m-tokens"]
                price += images * EDIT_INPUT_IMAGE_TOKENS * rate / 1e6
        return price

    def _billed_cost(
        self, spec: ModelSpec, request: GenerationRequest, quality: str, usage: Any
    ) -> float:
        if spec.name != "gpt-image-1" or usage is None:
            return self._image_price(spec, request, quality)
        try:
            details = usage.input_tokens_details
            text_in, image_in, image_out = details.text_tokens, details.image_tokens, usage.output_tokens
        except AttributeError:  # an incomplete usage block: bill by the table
            return self._image_price(spec, request, quality)
        return (
            text_in * self._prices["gpt-image-1/text-input-per-1m-tokens"]
            + image_in * self._prices["gpt-image-1/image-input-per-1m-tokens"]
            + image_out * self._prices["gpt-image-1/image-output-per-1m-tokens"]
        ) / 1e6

    async def generate(
        self, request: GenerationRequest, progress: ProgressCallback | None = None
    ) -> GeneratedImage:
        spec = find_model(self._models, request.model)
        spec.check(request)
        options = self._options(spec, request)
        size = f"{request.width}x{request.height}"
        common = dict(model=spec.name, prompt=request.prompt, size=size, n=1, quality=options["quality"])
        if request.kind == "edit":
            if request.source_image is None:
                raise UnsupportedRequest("an edit needs the image to edit")
            files: dict[str, Any] = {"image": ("image.png", request.source_image, "image/png")}
            if request.mask_image is not None:
                mask = await asyncio.to_thread(_alpha_mask, request.source_image, request.mask_image)
                files["mask"] = ("mask.png", mask, "image/png")
            response = await self._images("edit", **common, output_format="png", **files)
        elif spec.name == "dall-e-3":
            # b64_json spares a second fetch from a URL that expires.
            response = await self._images(
                "generate", **common, style=options["style"], response_format="b64_json")
        else:  # GPT Image models always answer with b64_json and reject `response_format`.
            response = await self._images("generate", **common, output_format="png")

        image = await self._first_image(response, (request.width, request.height))
        item = response.data[0]
        return GeneratedImage(
            data=image.png,
            width=image.width,
            height=image.height,
            model=spec.name,
            provider=PROVIDER,
            seed=None,
            cost_usd=self._billed_cost(spec, request, options["quality"], response.usage),
            revised_prompt=item.revised_prompt,
        )
