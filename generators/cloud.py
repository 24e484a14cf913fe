"""What the cloud generators share: their key, base URL and timeouts, their price table with the
operator's overrides merged in, the subset of their models the operator enabled (both checked
when the generator is built, so a typo in the configuration fails at start-up, not on a user's
first request), the SDK client and an HTTP session for fetching outputs.
"""
from __future__ import annotations

import asyncio
import importlib.util
import json
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from bot.core.models import GeneratorError, ModelSpec, TransientGeneratorError, UnsupportedRequest

if TYPE_CHECKING:
    import aiohttp


def merge_prices(
    provider: str, defaults: Mapping[str, float], overrides: Mapping[str, float] | None
) -> dict[str, float]:
    """`defaults` updated with `overrides`; unknown keys and negative prices raise ValueError."""
    prices = dict(defaults)
    for key, value in (overrides or {}).items():
        if key not in defaults:
            raise ValueError(
                f"unknown {provider} price {key!r}; known prices: {', '.join(sorted(defaults))}"
            )
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not is_number or not math.isfinite(value) or value < 0:
            raise ValueError(f"{provider} price {key!r} must be a number of USD >= 0, not {value!r}")
        prices[key] = float(value)
    return prices


def select_models(
    provider: str, specs: tuple[ModelSpec, ...], enabled: list[str] | None
) -> tuple[ModelSpec, ...]:
    """The specs named (by name or alias) in `enabled`, all of them when it is None."""
    if enabled is None:
        return specs
    names = {n: spec for spec in specs for n in (spec.name, *spec.aliases)}
    unknown = [name for name in enabled if name not in names]
    if unknown:
        known = ", ".join(s.name for s in specs)
        raise ValueError(f"unknown {provider} model(s) {', '.join(unknown)}; known: {known}")
    chosen = {names[name].name for name in enabled}
    return tuple(spec for spec in specs if spec.name in chosen)


def find_model(specs: tuple[ModelSpec, ...], name: str) -> ModelSpec:
    """The spec called `name` (or with that alias), or UnsupportedRequest."""
    for spec in specs:
        if name == spec.name or name in spec.aliases:
            return spec
    raise UnsupportedRequest(
        f"model {name!r} is not served here; models available: {', '.join(s.name for s in specs)}"
    )


def is_json(data: bytes) -> bool:
    try:
        json.loads(data)
    except ValueError:  # JSONDecodeError, UnicodeDecodeError
        return False
    return True


def describe_answer(response: Any) -> str:
    """What an HTTP answer was, for a message: its content type and size, never its text (which
    may quote a key). `response`: anything with `headers` and `content` (httpx, the openai SDK)."""
    content_type = response.headers.get("content-type", "").split(";")[0].strip() or "no content type"
    return f"{content_type}, {len(response.content)} bytes"


class CloudGenerator:
    """The shared half of a cloud generator; subclasses set the class attributes, build their SDK
    client in `_sdk()` and implement estimate_cost and generate."""

    provider: str
    sdk_module: str  # the SDK's import name, for unavailable_reason
    key_name: str  # what the secret is called, for messages: "OpenAI API key"
    MODELS: tuple[ModelSpec, ...]
    DEFAULT_PRICES: Mapping[str, float]
    DEFAULT_TIMEOUT_S: float = 120.0

    def __init__(
        self,
        api_key: str,
        *,
        base_url: str | None = None,
        timeout_s: float | None = None,
        prices: dict[str, float] | None = None,
        enabled_models: list[str] | None = None,
        download_timeout_s: float = 30.0,
    ):
        self._api_key = api_key
        self._base_url = base_url  # None: the SDK's default, which honours its environment variable
        self._timeout_s = self.DEFAULT_TIMEOUT_S if timeout_s is None else timeout_s
        self._download_timeout_s = download_timeout_s
        self._prices = merge_prices(self.provider, self.DEFAULT_PRICES, prices)
        self._models = select_models(self.provider, self.MODELS, enabled_models)
        self._client: Any = None
        self._session: aiohttp.ClientSession | None = None

    def models(self) -> list[ModelSpec]:
        return list(self._models)

    def unavailable_reason(self) -> str | None:
        if importlib.util.find_spec(self.sdk_module) is None:
            return f"the {self.sdk_module} package is not installed: pip install 'easel[cloud]'"
        if not self._api_key:
            return f"no {self.key_name} is configured"
        return None

    def _http(self) -> aiohttp.ClientSession:
        """The session outputs are downloaded with (made on first use, on the running loop)."""
        if self._session is None:
            import aiohttp

            self._session = aiohttp.ClientSession()
        return self._session

    async def _close_client(self) -> None:
        await self._client.close()

    async def close(self) -> None:
        if self._client is not None:
            await self._close_client()
            self._client = None
        if self._session is not None:
            await self._session.close()
            self._session = None


class OpenAICompatible(CloudGenerator):
    """A generator speaking OpenAI's image API through the openai SDK (OpenAI itself, Together)."""

    sdk_module = "openai"
    service: str  # the provider's name in messages

    async def _images(self, call: str, **params: Any) -> Any:
        """`client.images.<call>(**params)`: its ImagesResponse, else a GeneratorError. The SDK's
        timeout is per read (a server trickling its answer a byte at a time never trips it), so
        the whole call gets `timeout_s` here; an answer that is not an images response (a proxy's
        HTML page) is reported as such."""
        from openai import OpenAIError
        from openai.types import ImagesResponse

        from generators.openai_images import translate_openai_error

        method = getattr(self._sdk().images.with_raw_response, call)
        try:
            async with asyncio.timeout(self._timeout_s):
                raw = await method(**params)
        except TimeoutError:
            raise TransientGeneratorError(
                f"{self.service} did not answer within {self._timeout_s:g} s"
            ) from None
        except OpenAIError as exc:
            raise translate_openai_error(
                exc, service=self.service, api_key=self._api_key, timeout_s=self._timeout_s
            ) from None
        try:
            response = raw.parse()
        except ValueError:  # a JSON content type, but no JSON (or not of the expected shape)
            response = None
        if isinstance(response, ImagesResponse):
            return response
        # Not retried: the image may have been made (and billed) all the same.
        what = "JSON that is not an images response" if is_json(raw.content) else (
            "something that is not JSON")
        raise GeneratorError(f"{self.service} answered with {what} ({describe_answer(raw)})")

    async def _first_image(self, response: Any, expected_size: tuple[int, int]):
        """The first image of an images response, from its base64 data or fetched from its URL
        at once (such URLs expire), checked and as PNG."""
        from generators.download import InvalidProviderImage, fetch_image, image_from_b64

        if not response.data:
            raise InvalidProviderImage(f"{self.service} answered without an image")
        item = response.data[0]
        if item.b64_json:
            return await image_from_b64(item.b64_json, expected_size=expected_size)
        if item.url:
            return await fetch_image(item.url, session=self._http(), timeout_s=self._download_timeout_s,
                                     expected_size=expected_size)
        raise InvalidProviderImage(f"{self.service} answered with neither image data nor an image URL")

    def _sdk(self):
        if self._client is None:
            from openai import AsyncOpenAI

            # Retries are the router's: it knows Retry-After, fallbacks and the circuit breaker.
            self._client = AsyncOpenAI(
                api_key=self._api_key, base_url=self._base_url, timeout=self._timeout_s, max_retries=0
            )
        return self._client
