"""Black Forest Labs' Flux models on Replicate, through the official `replicate` SDK.

A prediction is created without `Prefer: wait` and then polled here, rather than with
`async_run`: that way its id is known from the start, so a prediction that outlives the deadline,
or whose job is cancelled, is cancelled on Replicate too instead of running on, billed, with nobody
waiting for it. The output URL is fetched as soon as the prediction succeeds (it expires).
"""
from __future__ import annotations

import asyncio
import io
import logging
import re
import secrets
from typing import TYPE_CHECKING, Any

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
from generators.cloud import CloudGenerator, describe_answer, find_model, is_json
from generators.download import InvalidProviderImage, check_ratio, fetch_image, parse_retry_after

if TYPE_CHECKING:
    import httpx
    import replicate
    from replicate.prediction import Prediction

log = logging.getLogger(__name__)

PROVIDER = "replicate"

# What Flux schnell/dev make at 1 megapixel for each aspect ratio they take (cog-flux's table).
FLUX_SIZES: dict[str, tuple[int, int]] = {
    "1:1": (1024, 1024),
    "16:9": (1344, 768),
    "9:16": (768, 1344),
    "3:2": (1216, 832),
    "2:3": (832, 1216),
    "4:5": (896, 1088),
    "5:4": (1088, 896),
    "3:4": (896, 1152),
    "4:3": (1152, 896),
    "21:9": (1536, 640),
    "9:21": (640, 1536),
}
ASPECT_RATIO_OF = {size: ratio for ratio, size in FLUX_SIZES.items()}

MODELS: tuple[ModelSpec, ...] = (
    ModelSpec(
        name="flux-schnell",
        provider=PROVIDER,
        kinds=frozenset({"imagine"}),
        negative_prompt=False,
        sizes=tuple(FLUX_SIZES.values()),
        max_side=1536,
        default_size=(1024, 1024),
        aliases=("flux",),
        steps=(1, 4),
        guidance=None,
        description="Flux schnell on Replicate: fast (1-4 steps) and cheap",
    ),
    ModelSpec(
        name="flux-dev",
        provider=PROVIDER,
        kinds=frozenset({"imagine", "variation"}),
        negative_prompt=False,
        sizes=tuple(FLUX_SIZES.values()),
        max_side=1536,
        default_size=(1024, 1024),
        steps=(1, 50),
        guidance=(0.0, 10.0),
        description="Flux dev on Replicate: higher quality than schnell; also varies a given image",
    ),
    ModelSpec(
        name="flux-1.1-pro",
        provider=PROVIDER,
        kinds=frozenset({"imagine"}),
        negative_prompt=False,
        max_side=1440,
        min_side=256,
        size_step=32,
        default_size=(1024, 1024),
        aliases=("flux-pro",),
        steps=None,
        guidance=None,
        description="Flux 1.1 pro on Replicate: Black Forest Labs' best; any size, multiples of 32",
    ),
)
MODEL_REFS = {
    "flux-schnell": "black-forest-labs/flux-schnell",
    "flux-dev": "black-forest-labs/flux-dev",
    "flux-1.1-pro": "black-forest-labs/flux-1.1-pro",
}

DEFAULT_PRICES: dict[str, float] = {"flux-schnell": 0.003, "flux-dev": 0.025, "flux-1.1-pro": 0.04}

TERMINAL = frozenset({"succeeded", "failed", "canceled"})
REFUSAL_WORDING = re.compile(r"nsfw|safety (system|checker|filter)|moderat|flagged", re.IGNORECASE)
CANCEL_TIMEOUT_S = 10.0


def _input(spec: ModelSpec, request: GenerationRequest, seed: int) -> dict[str, Any]:
    """The prediction's input; spec.check has already refused settings the model does not take."""

    model_input: dict[str, Any] = {"prompt": request.prompt, "seed": seed, "output_format": "png"}
    if spec.name == "flux-1.1-pro":
        model_input.update(aspect_ratio="custom", width=request.width, height=request.height)
        return model_input
    # go_fast would run an fp8-quantised model: same price, but seeds would not reproduce the
    # reference-precision image.
    model_input.update(
        aspect_ratio=ASPECT_RATIO_OF[(request.width, request.height)], num_outputs=1, go_fast=False
    )
    if request.steps is not None:
        model_input["num_inference_steps"] = request.steps
    if request.guidance is not None:
        model_input["guidance"] = request.guidance
    if request.kind == "variation":
        if request.source_image is None:
            raise UnsupportedRequest("a variation needs the image to vary")
        source = io.BytesIO(request.source_image)
        source.name = "source.png"  # the SDK uploads it to /v1/files, typed by this name
        model_input["image"] = source
        if request.strength is not None:
            model_input["prompt_strength"] = request.strength
    return model_input


def _redact(text: str, secret: str) -> str:
    return text.replace(secret, "[redacted]") if secret else text


async def _raise_on_rate_limit(response: httpx.Response) -> None:
    """An httpx response hook: the SDK's ReplicateError drops the headers, Retry-After with them."""
    if response.status_code == 429:
        retry_after = parse_retry_after(response.headers)
        raise TransientGeneratorError(
            "Replicate is rate limiting requests (HTTP 429)", retry_after=retry_after
        )


async def _raise_on_non_json(response: httpx.Response) -> None:
    """An httpx response hook: an answer that is not JSON (a proxy's HTML error page) is reported
    as such, rather than as the JSONDecodeError the SDK would raise for it."""
    if response.status_code == 204:
        return
    await response.aread()
    if is_json(response.content):
        return
    what = f"something that is not JSON ({describe_answer(response)})"
    status = response.status_code
    if status >= 500 or status == 408:
        raise TransientGeneratorError(f"Replicate failed with HTTP {status} and answered with {what}")
    if status >= 400:
        raise GeneratorError(f"Replicate refused the request (HTTP {status}) and answered with {what}")
    # Not retried: a garbled answer to a create may still have started (and billed) a prediction.
    raise GeneratorError(f"Replicate answered with {what}")


class ReplicateFlux(CloudGenerator):
    """Generator for Flux schnell, dev and 1.1 pro on Replicate."""

    provider = PROVIDER
    sdk_module = "replicate"
    key_name = "Replicate API token"
    MODELS = MODELS
    DEFAULT_PRICES = DEFAULT_PRICES
    DEFAULT_TIMEOUT_S = 120.0

    def estimate_cost(self, request: GenerationRequest) -> float:
        spec = find_model(self._models, request.model)
        spec.check(request)
        return self._prices[spec.name]

    def _sdk(self) -> replicate.Client:
        if self._client is None:
            import replicate

            # The client reads REPLICATE_POLL_INTERVAL here; it sets the polling pace below.
            self._client = replicate.Client(
                api_token=self._api_key,
                base_url=self._base_url,
                event_hooks={"response": [_raise_on_rate_limit, _raise_on_non_json]},
            )
        return self._client

    async def _cancel(self, client: replicate.Client, prediction_id: str) -> None:
        try:
            await asyncio.wait_for(client.predictions.async_cancel(prediction_id), CANCEL_TIMEOUT_S)
        except Exception as exc:  # the original failure matters more than this one
            log.warning("could not cancel Replicate prediction %s (%s)", prediction_id, type(exc).__name__)

    async def _predict(
        self,
        client: replicate.Client,
        ref: str,
        model_input: dict[str, Any],
        progress: ProgressCallback | None,
    ) -> Prediction:
        deadline = asyncio.get_running_loop().time() + self._timeout_s
        try:
            async with asyncio.timeout_at(deadline):
                prediction = await client.models.predictions.async_create(model=ref, input=model_input)
        except TimeoutError:
            raise TransientGeneratorError(
                f"Replicate did not answer within {self._timeout_s:g} s (creating the {ref} prediction)"
            ) from None
        try:
            async with asyncio.timeout_at(deadline):
                while prediction.status not in TERMINAL:
                    if progress is not None and prediction.progress is not None:
                        progress(prediction.progress.percentage, None)
                    await asyncio.sleep(client.poll_interval)
                    await prediction.async_reload()
        except BaseException as exc:
            # Whatever ends the wait (deadline, the job cancelled, a lost connection), the
            # prediction must not run on. Shielded: a cancelled task still sends the cancel.
            await asyncio.shield(self._cancel(client, prediction.id))
            if isinstance(exc, TimeoutError):
                raise TransientGeneratorError(
                    f"{ref} did not finish within {self._timeout_s:g} s; the prediction was cancelled"
                ) from None
            raise
        return prediction

    def _translate(self, exc: Exception) -> GeneratorError:
        import httpx
        from replicate.exceptions import ReplicateError

        if isinstance(exc, httpx.TimeoutException):
            return TransientGeneratorError("Replicate did not answer in time")
        if isinstance(exc, httpx.TransportError):
            return TransientGeneratorError("could not connect to Replicate")
        if not isinstance(exc, ReplicateError) or exc.status is None:
            return GeneratorError(f"Replicate returned an unexpected answer ({type(exc).__name__})")
        if exc.status == 401:
            return GeneratorError("Replicate rejected the API token (HTTP 401); check the token")
        detail = _redact(exc.detail or exc.title or "no details given", self._api_key)
        if exc.status >= 500 or exc.status == 429:
            return TransientGeneratorError(f"Replicate failed with HTTP {exc.status}: {detail}")
        return GeneratorError(f"Replicate refused the request (HTTP {exc.status}): {detail}")

    async def generate(
        self, request: GenerationRequest, progress: ProgressCallback | None = None
    ) -> GeneratedImage:
        spec = find_model(self._models, request.model)
        spec.check(request)
        seed = request.seed if request.seed is not None else secrets.randbelow(2**31)
        model_input = _input(spec, request, seed)
        client = self._sdk()
        import httpx
        from replicate.exceptions import ReplicateException

        try:
            prediction = await self._predict(client, MODEL_REFS[spec.name], model_input, progress)
        except (ReplicateException, httpx.HTTPError, ValueError) as exc:  # ValueError: a garbled body
            raise self._translate(exc) from None

        if prediction.status != "succeeded":
            error = _redact(prediction.error or "no reason given", self._api_key)
            if prediction.status == "canceled":
                raise GeneratorError(f"the {spec.name} prediction was cancelled on Replicate")
            if REFUSAL_WORDING.search(error):
                raise ContentPolicyError(f"{spec.name} refused the request on content grounds: {error}")
            if "please retry" in error.lower():  # Replicate's wording for an interrupted run
                raise TransientGeneratorError(f"{spec.name} failed on Replicate: {error}")
            raise GeneratorError(f"{spec.name} failed on Replicate: {error}")

        output = prediction.output
        url = output[0] if isinstance(output, list) and output else output
        if not isinstance(url, str):
            raise InvalidProviderImage(f"{spec.name} succeeded on Replicate without an output image")
        image = await fetch_image(url, session=self._http(), timeout_s=self._download_timeout_s)
        if request.kind == "imagine":
            check_ratio(spec.name, request, image.width, image.height)
        return GeneratedImage(
            data=image.png,
            width=image.width,
            height=image.height,
            model=spec.name,
            provider=PROVIDER,
            seed=seed,
            cost_usd=self._prices[spec.name],
        )

    async def _close_client(self) -> None:
        # The SDK has no close(); its lazily built httpx client is closed directly.
        await self._client._async_client.aclose()
