"""Google's image models through Google's own SDK, `google-genai`: Imagen 4 (standard, fast and
ultra) with `generate_images`, and Gemini 2.5 Flash Image with `generate_content`.

Two modes, as the SDK has them. On the Gemini API (an API key from AI Studio) only Gemini image is
served: the SDK's `generate_images` works on Vertex AI alone. On Vertex AI every model is served,
either in express mode (an API key, no project) or with a project and location (Application
Default Credentials). What the SDK sends, as read from its source (google-genai 3.6):

  Vertex express:  POST {base}/v1beta1/publishers/google/models/imagen-4.0-generate-001:predict
                   POST {base}/v1beta1/publishers/google/models/gemini-2.5-flash-image:generateContent
  Vertex project:  POST {base}/v1beta1/projects/P/locations/L/publishers/google/models/...
  Gemini API:      POST {base}/v1/models/gemini-2.5-flash-image:generateContent

with the key in `x-goog-api-key` (ADC: `Authorization: Bearer`). Imagen's body is
`{"instances": [{"prompt"}], "parameters": {"sampleCount", "aspectRatio", "seed",
"addWatermark", "includeRaiReason", "outputOptions": {"mimeType"}}}`, answered
`{"predictions": [{"bytesBase64Encoded", "mimeType"} | {"raiFilteredReason"}]}`.

Configuration follows the SDK's environment variables (GOOGLE_API_KEY, else GEMINI_API_KEY;
GOOGLE_GENAI_USE_VERTEXAI; GOOGLE_CLOUD_PROJECT; GOOGLE_CLOUD_LOCATION; GOOGLE_VERTEX_BASE_URL and
GOOGLE_GEMINI_BASE_URL, which this module reads itself so that older SDKs honour them too), with
overrides from `[generators.google]`.

Imagen takes a seed only with its SynthID watermark off, so a seeded image (the default: every
image is remade from its recorded seed) is sent with `addWatermark: false`; the option
`watermark=on` keeps the watermark and sends no seed. The SDK's retries are off (the router
retries) and the whole call has `timeout_s` (asyncio.timeout). The SDK is imported on first use.
"""
from __future__ import annotations

import asyncio
import contextvars
import importlib.util
import json
import os
import re
import warnings
from types import SimpleNamespace
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
from generators.download import check_ratio, checked_png, parse_retry_after

PROVIDER = "google"
VERTEX_BASE_URL_ENV = "GOOGLE_VERTEX_BASE_URL"
GEMINI_BASE_URL_ENV = "GOOGLE_GEMINI_BASE_URL"
KEY_ENVS = ("GOOGLE_API_KEY", "GEMINI_API_KEY")  # the SDK's order: GOOGLE_API_KEY wins

# Imagen 4 at 1K, per aspect ratio it takes.
IMAGEN_SIZES: dict[str, tuple[int, int]] = {
    "1:1": (1024, 1024),
    "3:4": (896, 1280),
    "4:3": (1280, 896),
    "9:16": (768, 1408),
    "16:9": (1408, 768),
}
# Gemini 2.5 Flash Image, per aspect ratio it takes.
GEMINI_SIZES: dict[str, tuple[int, int]] = {
    "1:1": (1024, 1024),
    "2:3": (832, 1248),
    "3:2": (1248, 832),
    "3:4": (864, 1184),
    "4:3": (1184, 864),
    "4:5": (896, 1152),
    "5:4": (1152, 896),
    "9:16": (768, 1344),
    "16:9": (1344, 768),
    "21:9": (1536, 672),
}

_IMAGEN_NOTE = (
    "; seeded images are made without the SynthID watermark (Imagen takes a seed only then); "
    "watermark=on keeps it and takes no seed"
)


def _imagen(name: str, model_id: str, what: str, aliases: tuple[str, ...] = ()) -> ModelSpec:
    return ModelSpec(
        name=name,
        provider=PROVIDER,
        kinds=frozenset({"imagine"}),
        # Imagen 3.0-generate-002 and later ignore negativePrompt: refused rather than dropped.
        negative_prompt=False,
        sizes=tuple(IMAGEN_SIZES.values()),
        max_side=1408,
        max_prompt_chars=4000,  # Imagen takes 480 tokens; about this many characters of English
        default_size=(1024, 1024),
        aliases=aliases,
        options={"watermark": ("off", "on")},
        steps=None,
        guidance=None,
        description=f"Google {what} on Vertex AI" + _IMAGEN_NOTE,
    )


MODELS: tuple[ModelSpec, ...] = (
    _imagen("imagen-4", "imagen-4.0-generate-001", "Imagen 4", aliases=("imagen",)),
    _imagen("imagen-4-fast", "imagen-4.0-fast-generate-001", "Imagen 4 Fast: quicker and cheaper"),
    _imagen("imagen-4-ultra", "imagen-4.0-ultra-generate-001", "Imagen 4 Ultra: its best"),
    ModelSpec(
        name="gemini-image",
        provider=PROVIDER,
        kinds=frozenset({"imagine"}),
        honours_seed=False,
        negative_prompt=False,
        sizes=tuple(GEMINI_SIZES.values()),
        max_side=1536,
        max_prompt_chars=32000,
        default_size=(1024, 1024),
        aliases=("nano-banana",),
        steps=None,
        guidance=None,
        description="Google Gemini 2.5 Flash Image (Gemini API or Vertex AI); no seed",
    ),
)
MODEL_IDS = {
    "imagen-4": "imagen-4.0-generate-001",
    "imagen-4-fast": "imagen-4.0-fast-generate-001",
    "imagen-4-ultra": "imagen-4.0-ultra-generate-001",
    "gemini-image": "gemini-2.5-flash-image",
}
VERTEX_ONLY = frozenset({"imagen-4", "imagen-4-fast", "imagen-4-ultra"})
_RATIO_OF = {
    name: {size: ratio for ratio, size in (GEMINI_SIZES if name == "gemini-image" else IMAGEN_SIZES).items()}
    for name in MODEL_IDS
}

# USD per image. Gemini image bills 1290 output tokens an image at $30 / 1M.
DEFAULT_PRICES: dict[str, float] = {
    "imagen-4": 0.04,
    "imagen-4-fast": 0.02,
    "imagen-4-ultra": 0.06,
    "gemini-image": 0.039,
}

# Gemini's reasons for stopping or blocking that are about the content.
BLOCK_REASONS = frozenset({
    "SAFETY", "OTHER", "BLOCKLIST", "PROHIBITED_CONTENT", "IMAGE_SAFETY", "MODEL_ARMOR", "JAILBREAK",
    "SPII", "RECITATION", "IMAGE_PROHIBITED_CONTENT", "IMAGE_RECITATION", "IMAGE_OTHER", "NO_IMAGE",
})
# Imagen's 400 for a prompt its filters refuse.
REFUSAL_WORDING = re.compile(
    r"responsible ai|sensitive words|safety (filter|setting|polic)|prohibited|violat|blocked", re.IGNORECASE
)
_LAST_RESPONSE: contextvars.ContextVar[Any] = contextvars.ContextVar("easel_google_response", default=None)


def _redact(text: str, secret: str) -> str:
    return text.replace(secret, "[redacted]") if secret else text


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("true", "1")


def _enum_name(value: Any) -> str:
    return str(getattr(value, "value", value) or "")


async def _body(response: Any) -> bytes:
    """The bytes of an aiohttp answer the SDK has already read (cached), or b"" """
    try:
        return bytes(await response.read()) if hasattr(response, "read") else b""
    except Exception:  # a body cut off: nothing to show
        return b""


async def _remember_response(session: Any, ctx: Any, params: Any) -> None:
    """An aiohttp trace hook: the last answer this task got, for describing one that is not JSON
    (the SDK drops it when its JSON does not parse)."""
    _LAST_RESPONSE.set(params.response)


class GoogleImagen(CloudGenerator):
    """Generator for Imagen 4 (Vertex AI) and Gemini 2.5 Flash Image, through `google-genai`."""

    provider = PROVIDER
    sdk_module = "google.genai"
    key_name = "Google API key"
    service = "Google"
    MODELS = MODELS
    DEFAULT_PRICES = DEFAULT_PRICES
    DEFAULT_TIMEOUT_S = 120.0

    def __init__(
        self,
        api_key: str | None = None,
        *,
        base_url: str | None = None,
        vertex: bool | None = None,
        project: str | None = None,
        location: str | None = None,
        enabled_models: list[str] | None = None,
        **kwargs: Any,
    ):
        api_key = api_key or next((os.environ[n] for n in KEY_ENVS if os.environ.get(n)), "")
        super().__init__(api_key, base_url=base_url, **kwargs)
        self._vertex = _env_true("GOOGLE_GENAI_USE_VERTEXAI") if vertex is None else vertex
        # As the SDK does: a project given here wins over the key; one from the environment
        # only serves when there is no key (then with Application Default Credentials).
        env_project = os.environ.get("GOOGLE_CLOUD_PROJECT") if not api_key else None
        self._project = (project or env_project or None) if self._vertex else None
        self._location = (location or os.environ.get("GOOGLE_CLOUD_LOCATION") or "global") if self._project else None
        env_base = os.environ.get(VERTEX_BASE_URL_ENV if self._vertex else GEMINI_BASE_URL_ENV)
        self._base_url = base_url or env_base or None
        offered = self.MODELS if self._vertex else tuple(s for s in self.MODELS if s.name not in VERTEX_ONLY)
        if enabled_models is not None and not self._vertex:
            vertex_only = [n for n in enabled_models
                           if any(n in (s.name, *s.aliases) for s in self.MODELS if s.name in VERTEX_ONLY)]
            if vertex_only:
                raise ValueError(
                    f"{', '.join(vertex_only)} need Vertex AI (vertex = true, or "
                    "GOOGLE_GENAI_USE_VERTEXAI=true); the Gemini API serves only gemini-image"
                )
        from generators.cloud import select_models

        self._models = select_models(self.provider, offered, enabled_models)

    def unavailable_reason(self) -> str | None:
        if importlib.util.find_spec("google") is None or importlib.util.find_spec(self.sdk_module) is None:
            return "the google-genai package is not installed: pip install 'easel[cloud]'"
        if not self._api_key and not self._project:
            if self._vertex:
                return ("no Google credentials are configured: set GOOGLE_API_KEY (Vertex AI express "
                        "mode), or GOOGLE_CLOUD_PROJECT for Application Default Credentials")
            return ("no Google API key is configured: set GOOGLE_API_KEY or GEMINI_API_KEY (and "
                    "GOOGLE_GENAI_USE_VERTEXAI=true for Imagen on Vertex AI)")
        return None

    def estimate_cost(self, request: GenerationRequest) -> float:
        spec = find_model(self._models, request.model)
        spec.check(request)
        return self._prices[spec.name]

    # -- the SDK --

    def _sdk(self) -> Any:
        if self._client is None:
            if self.unavailable_reason() is not None:
                raise GeneratorUnavailable(self.unavailable_reason() or "")
            import aiohttp
            from google import genai
            from google.genai import types

            # The SDK marks generate_images deprecated in favour of generate_content; it is still
            # Imagen's only way in.
            warnings.filterwarnings("ignore", message="The generate_images method is deprecated")
            trace = aiohttp.TraceConfig()
            trace.on_request_end.append(_remember_response)
            self._session = aiohttp.ClientSession(trace_configs=[trace])
            options = types.HttpOptions(
                base_url=self._base_url,
                timeout=int(self._timeout_s * 1000),
                # One attempt, and none of the SDK's own reconnect-and-retry: the router retries.
                retry_options=types.HttpRetryOptions(attempts=1),
                aiohttp_client=self._session,
            )
            if self._project:
                self._client = genai.Client(vertexai=True, project=self._project,
                                            location=self._location, http_options=options)
            else:
                self._client = genai.Client(vertexai=self._vertex, api_key=self._api_key, http_options=options)
        return self._client

    async def _close_client(self) -> None:
        await self._client.aio.aclose()

    async def _call(self, spec: ModelSpec, method: str, **params: Any) -> Any:
        """`client.aio.models.<method>(**params)`, with the whole call bounded by timeout_s and the
        SDK's errors translated."""
        import aiohttp
        from google.genai import errors

        client = self._sdk()
        _LAST_RESPONSE.set(None)
        try:
            async with asyncio.timeout(self._timeout_s):
                return await getattr(client.aio.models, method)(**params)
        except TimeoutError:
            raise TransientGeneratorError(f"Google did not answer within {self._timeout_s:g} s") from None
        except errors.APIError as exc:
            raise await self._translate(spec, exc) from None
        except (aiohttp.ClientConnectionError, OSError):
            raise TransientGeneratorError("could not connect to Google") from None
        except ValueError:  # a body that is not JSON (a proxy's page), or not of the expected shape
            raise await self._not_json(_LAST_RESPONSE.get()) from None

    async def _not_json(self, response: Any) -> GeneratorError:
        what = await self._describe(response)
        status = getattr(response, "status", 200)
        if status >= 500 or status == 408:
            return TransientGeneratorError(f"Google failed with HTTP {status} and answered with {what}")
        if status >= 400:
            return GeneratorError(f"Google refused the request (HTTP {status}) and answered with {what}")
        # Not retried: the image may have been made (and billed) all the same.
        return GeneratorError(f"Google answered with {what}")

    async def _describe(self, response: Any) -> str:
        if response is None:
            return "something that is not JSON"
        body = await _body(response)
        answer = SimpleNamespace(headers=response.headers, content=body)
        kind = "JSON that is not the expected answer" if is_json(body) else "something that is not JSON"
        return f"{kind} ({describe_answer(answer)})"

    async def _translate(self, spec: ModelSpec, exc: Any) -> GeneratorError:
        status = int(exc.code or 0)
        response = exc.response
        headers = getattr(response, "headers", None) or {}
        details = exc.details if isinstance(exc.details, dict) else {}
        error = details.get("error") if isinstance(details.get("error"), dict) else details
        message = str(error.get("message") or "no details given")
        body = await _body(response)
        if body.strip() and not is_json(body):
            # The SDK wraps a body that is not JSON as {"message": <its text>}: not passed on.
            answer = SimpleNamespace(headers=headers, content=body)
            message = f"an answer that is not JSON ({describe_answer(answer)})"
        message = _redact(message, self._api_key)[:500]
        code = str(error.get("status") or "")
        if status in (401, 403) or (status == 400 and "API_KEY_INVALID" in json.dumps(error, default=str)):
            # A rejected key, or credentials without access to the model.
            what = "API key" if self._api_key else "credentials"
            return GeneratorUnavailable(f"Google rejected the {what} (HTTP {status}); check the configured {what}")
        if status == 429:
            return TransientGeneratorError(
                f"Google is rate limiting requests (HTTP 429): {message}",
                retry_after=parse_retry_after(headers),
            )
        if status >= 500 or status == 408:
            return TransientGeneratorError(f"Google failed with HTTP {status}: {message}")
        if status == 400 and REFUSAL_WORDING.search(message):
            return ContentPolicyError(f"{spec.name} refused the request on content grounds: {message}")
        what = f"HTTP {status}, {code}" if code else f"HTTP {status}"
        return GeneratorError(f"Google refused the request ({what}): {message}")

    # -- generation --

    async def generate(
        self, request: GenerationRequest, progress: ProgressCallback | None = None
    ) -> GeneratedImage:
        spec = find_model(self._models, request.model)
        spec.check(request)
        ratio = _RATIO_OF[spec.name][(request.width, request.height)]
        if spec.name == "gemini-image":
            data, seed = await self._gemini(spec, request, ratio), None
        else:
            data, seed = await self._imagen(spec, request, ratio)
        image = await checked_png(data)
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

    async def _imagen(self, spec: ModelSpec, request: GenerationRequest, ratio: str) -> tuple[bytes, int | None]:
        from google.genai import types

        watermark = request.options.get("watermark", "off") == "on"
        seed = None if watermark else request.seed
        config = types.GenerateImagesConfig(
            number_of_images=1,
            aspect_ratio=ratio,
            seed=seed,
            add_watermark=watermark,
            include_rai_reason=True,
            output_mime_type="image/png",
        )
        response = await self._call(spec, "generate_images", model=MODEL_IDS[spec.name],
                                    prompt=request.prompt, config=config)
        images = list(response.generated_images or []) if response is not None else []
        for generated in images:
            if generated.image is not None and generated.image.image_bytes:
                return generated.image.image_bytes, seed
        reasons = [g.rai_filtered_reason for g in images if g.rai_filtered_reason]
        why = f": {_redact(reasons[0], self._api_key)[:300]}" if reasons else " (no image came back)"
        raise ContentPolicyError(f"{spec.name} refused the request on content grounds{why}")

    async def _gemini(self, spec: ModelSpec, request: GenerationRequest, ratio: str) -> bytes:
        from google.genai import types

        config = types.GenerateContentConfig(
            response_modalities=["IMAGE"],
            image_config=types.ImageConfig(aspect_ratio=ratio),
        )
        response = await self._call(spec, "generate_content", model=MODEL_IDS[spec.name],
                                    contents=request.prompt, config=config)
        feedback = getattr(response, "prompt_feedback", None)
        blocked = _enum_name(getattr(feedback, "block_reason", None))
        if blocked:
            raise ContentPolicyError(f"{spec.name} refused the prompt on content grounds ({blocked})")
        candidates = list(getattr(response, "candidates", None) or [])
        finish = ""
        for candidate in candidates:
            finish = finish or _enum_name(candidate.finish_reason)
            parts = candidate.content.parts if candidate.content and candidate.content.parts else []
            for part in parts:
                inline = part.inline_data
                if inline is not None and inline.data and (inline.mime_type or "").startswith("image/"):
                    return inline.data
        if finish and finish not in BLOCK_REASONS and finish != "STOP":
            raise GeneratorError(f"{spec.name} stopped without an image (finish reason {finish})")
        # No image: the model declined, whether it says why (SAFETY...) or only answers in text.
        why = f" (finish reason {finish})" if finish else " (no image came back)"
        raise ContentPolicyError(f"{spec.name} made no image: refused on content grounds{why}")

