"""Turning what a cloud provider returns (an image URL, a data: URL, base64) into checked PNG bytes.

Provider URLs expire (OpenAI's and Replicate's within an hour), so a generator fetches its
output as soon as the provider reports it. Everything is size-capped while streaming and decoded
off the event loop, and every output is stored as PNG: PNG bytes are kept as sent, any other format
(WebP, JPEG) is re-encoded.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import email.utils
import math
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from bot.core.models import GeneratorError, TransientGeneratorError
from generators.images import ImageRejected, decode_image, encode_png

if TYPE_CHECKING:
    import aiohttp

MAX_IMAGE_BYTES = 50 * 1024 * 1024
RETRY_BACKOFF_S = 0.25  # doubled after each failed attempt
TRANSIENT_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})


class InvalidProviderImage(GeneratorError):
    """The provider's output is not a usable image (HTML page, truncated, bomb, wrong size)."""


# Providers choose the exact size for an aspect ratio themselves: outputs are checked loosely.
RATIO_TOLERANCE = 0.02


def check_ratio(model: str, request, width: int, height: int) -> None:
    """Raise InvalidProviderImage when an output's aspect ratio is not the one asked for."""
    asked, got = request.width / request.height, width / height
    if abs(got / asked - 1) > RATIO_TOLERANCE:
        raise InvalidProviderImage(
            f"{model} made a {width}x{height} image for a {request.width}x{request.height} request"
        )


class ImageDownloadFailed(GeneratorError):
    """The output could not be fetched and retrying will not help (expired URL, too big)."""


@dataclass(frozen=True)
class FetchedImage:
    png: bytes
    width: int
    height: int
    source_format: str  # as sent by the provider: PNG, WEBP, JPEG...


def parse_retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds to wait from `retry-after-ms` or `Retry-After` (seconds or an HTTP date)."""
    lowered = {k.lower(): v for k, v in headers.items()}
    for name, divisor in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = lowered.get(name)
        if value is None:
            continue
        try:
            seconds = float(value) / divisor
        except ValueError:
            if name == "retry-after-ms":
                continue
            try:
                when = email.utils.parsedate_to_datetime(value)
            except (TypeError, ValueError):
                return None
            seconds = when.timestamp() - time.time()
        return max(0.0, seconds) if math.isfinite(seconds) else None
    return None


def _limit(max_bytes: int) -> str:
    return f"{max_bytes / 2**20:g} MiB" if max_bytes >= 2**20 else f"{max_bytes}-byte"


def _png_from_bytes(data: bytes, expected_size: tuple[int, int] | None) -> FetchedImage:
    try:
        checked = decode_image(data, expected_size=expected_size)
    except ImageRejected as exc:
        raise InvalidProviderImage(f"the provider's output is not a usable image: {exc}") from None
    png = data if checked.format == "PNG" else encode_png(checked.image)
    return FetchedImage(png, width=checked.width, height=checked.height, source_format=checked.format)


async def checked_png(data: bytes, *, expected_size: tuple[int, int] | None = None) -> FetchedImage:
    """Decode and check `data` in a worker thread; PNG bytes for it, or InvalidProviderImage."""
    return await asyncio.to_thread(_png_from_bytes, data, expected_size)


def _decode_b64(payload: str, max_bytes: int) -> bytes:
    if len(payload) * 3 // 4 > max_bytes:
        raise ImageDownloadFailed(f"the provider's image is over the {_limit(max_bytes)} limit")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidProviderImage("the provider's output is not valid base64") from None


async def image_from_b64(
    payload: str, *, max_bytes: int = MAX_IMAGE_BYTES, expected_size: tuple[int, int] | None = None
) -> FetchedImage:
    """A base64 image payload (OpenAI's `b64_json`), checked and as PNG."""
    data = await asyncio.to_thread(_decode_b64, payload.strip(), max_bytes)
    return await checked_png(data, expected_size=expected_size)


def _data_url_bytes(url: str, max_bytes: int) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep:
        raise InvalidProviderImage("the provider's data: URL has no payload")
    if header.endswith(";base64"):
        return _decode_b64(payload, max_bytes)
    data = urllib.parse.unquote_to_bytes(payload)
    if len(data) > max_bytes:
        raise ImageDownloadFailed(f"the provider's image is over the {_limit(max_bytes)} limit")
    return data


async def _download(
    session: aiohttp.ClientSession, url: str, *, max_bytes: int, timeout_s: float, attempts: int
) -> bytes:
    import aiohttp

    attempt = 0
    while True:
        attempt += 1
        retry_after = None
        try:
            async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
                if resp.status == 200:
                    if resp.content_length is not None and resp.content_length > max_bytes:
                        raise ImageDownloadFailed(
                            f"the provider's image is {resp.content_length} bytes, over the "
                            f"{_limit(max_bytes)} limit"
                        )
                    body = bytearray()
                    async for chunk in resp.content.iter_chunked(64 * 1024):
                        body += chunk
                        if len(body) > max_bytes:
                            raise ImageDownloadFailed(
                                f"the provider's image is over the {_limit(max_bytes)} limit"
                            )
                    return bytes(body)
                if resp.status not in TRANSIENT_STATUSES:
                    # 403/404/410 are what an expired signed URL returns: fetching again will not help.
                    raise ImageDownloadFailed(
                        f"fetching the provider's image failed with HTTP {resp.status}"
                        + (" (the URL has expired or is gone)" if resp.status in (403, 404, 410) else "")
                    )
                retry_after = parse_retry_after(resp.headers)
                problem = f"HTTP {resp.status}"
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
            problem = type(exc).__name__
        except TimeoutError:
            problem = f"no complete answer within {timeout_s:g} s"
        if attempt == attempts:
            raise TransientGeneratorError(
                f"fetching the provider's image failed {attempts} times (last: {problem})",
                retry_after=retry_after,
            )
        await asyncio.sleep(RETRY_BACKOFF_S * 2 ** (attempt - 1))


async def fetch_image(
    url: str,
    *,
    session: aiohttp.ClientSession | None = None,
    max_bytes: int = MAX_IMAGE_BYTES,
    timeout_s: float = 30.0,
    expected_size: tuple[int, int] | None = None,
    attempts: int = 3,
) -> FetchedImage:
    """Fetch a provider's output (http(s): or data: URL), check it and return it as PNG.

    Connection errors, timeouts, 408/429/5xx are retried `attempts` times in all, then raised as
    TransientGeneratorError; other HTTP errors raise ImageDownloadFailed at once; bytes that are
    not an acceptable image raise InvalidProviderImage.
    """
    if attempts < 1:
        raise ValueError(f"attempts must be at least 1, not {attempts}")
    scheme = url.split(":", 1)[0].lower()
    if scheme == "data":
        data = await asyncio.to_thread(_data_url_bytes, url, max_bytes)
    elif scheme in ("http", "https"):
        own_session = None
        if session is None:
            import aiohttp

            session = own_session = aiohttp.ClientSession()
        try:
            data = await _download(session, url, max_bytes=max_bytes, timeout_s=timeout_s, attempts=attempts)
        finally:
            if own_session is not None:
                await own_session.close()
    else:
        raise ImageDownloadFailed(f"the provider's output URL has an unsupported scheme {scheme!r}")
    return await checked_png(data, expected_size=expected_size)
