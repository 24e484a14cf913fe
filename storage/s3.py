"""A content-addressed blob store in an S3-compatible bucket (AWS S3, Cloudflare R2, MinIO,
Backblaze B2), through aioboto3: each image at `<prefix>/<ab>/<sha256>.<ext>`.

Its face is synchronous, like the local store's, because the core calls blob stores in worker
threads. The store owns one background thread running an asyncio loop with one aioboto3 client;
each call submits a coroutine to that loop and waits for it. Credentials come from the environment
as boto3 reads them (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, a role...) and are
never part of a message.
"""
from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import hashlib
import random
import threading
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Any, TypeVar
from urllib.parse import urlsplit

from bot.core.models import StoredBlob

from .blobs import CONTENT_TYPES, BlobInfo, is_key, parse_name
from .errors import StorageError

_T = TypeVar("_T")
PROBE_NAME = ".easel-probe"  # what check_writable writes (one small object, overwritten each time)
# Worth another try: the service is busy or briefly down. Anything else fails at once.
_TRANSIENT_CODES = frozenset({
    "InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "Throttling",
    "ThrottlingException", "RequestLimitExceeded", "TooManyRequests",
})
_HINTS = {
    "AccessDenied": "access denied (check the credentials in the environment and the bucket's policy)",
    "InvalidAccessKeyId": "the access key in the environment was refused",
    "SignatureDoesNotMatch": "the secret key in the environment was refused",
    "NoSuchBucket": "the bucket does not exist",
    "AllAccessDisabled": "access to the bucket is disabled",
}
_NOT_FOUND = frozenset({"404", "NoSuchKey", "NotFound"})


class S3BlobStore:
    """Objects in `bucket`; URLs from `public_base_url` (a CDN in front of the bucket) or, without
    one, presigned GETs valid for `presign_ttl_s`, made afresh on each `url_for`."""

    def __init__(
        self,
        bucket: str,
        *,
        prefix: str = "",
        region: str = "",
        endpoint_url: str = "",
        public_base_url: str = "",
        presign_ttl_s: int = 3600,
        attempts: int = 4,
        base_delay_s: float = 0.25,
        timeout_s: float = 60.0,
    ):
        if not bucket:
            raise ValueError("S3BlobStore needs a bucket")
        try:
            import aioboto3  # noqa: F401  (heavy: only when the s3 backend is used)
        except ImportError:
            raise StorageError("the s3 storage backend needs aioboto3: pip install 'easel[s3]'") from None
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.public_base_url = public_base_url.rstrip("/")
        self.presign_ttl_s, self.attempts, self.base_delay_s = presign_ttl_s, max(1, attempts), base_delay_s
        self.timeout_s = timeout_s
        self.where = f"S3 bucket {bucket!r}" + (f" at {_host(endpoint_url)}" if endpoint_url else "")
        # A bound on one whole call, retries and back-off included: a hung call cannot hang a job.
        self._deadline = self.attempts * (timeout_s + base_delay_s * 2**self.attempts) + 10
        self._closed = False
        self._exit = contextlib.AsyncExitStack()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="easel-s3", daemon=True)
        self._thread.start()
        try:
            self._client = self._submit(self._open(region, endpoint_url))
        except Exception as exc:
            self.close()
            raise StorageError(f"{self.where}: cannot make an S3 client ({type(exc).__name__})") from None

    async def _open(self, region: str, endpoint_url: str) -> Any:
        import aioboto3
        from botocore.config import Config

        config = Config(
            retries={"total_max_attempts": 1},  # retried here, with back-off, in bounded time
            connect_timeout=min(10.0, self.timeout_s),
            read_timeout=self.timeout_s,
            signature_version="s3v4",
            max_pool_connections=16,
            # Path-style addressing is what MinIO, R2 and B2 endpoints all accept.
            s3={"addressing_style": "path"} if endpoint_url else None,
        )
        client = aioboto3.Session().client(
            "s3", region_name=region or None, endpoint_url=endpoint_url or None, config=config
        )
        return await self._exit.enter_async_context(client)

    # --- the port ------------------------------------------------------------------------------

    def object_name(self, key: str, ext: str = "png") -> str:
        """The object's name in the bucket: `<prefix>/<ab>/<sha256>.<ext>`."""
        if not is_key(key):
            raise ValueError(f"not a blob key: {key!r}")
        if ext not in CONTENT_TYPES:
            raise ValueError(f"not an image extension: {ext!r}")
        return f"{self.prefix}/{key[:2]}/{key}.{ext}" if self.prefix else f"{key[:2]}/{key}.{ext}"

    def location(self, key: str, ext: str = "png") -> str:
        """What a job's row records as its image's place: the public URL where there is one, else
        `s3://bucket/name` (a presigned URL expires, so none is ever stored)."""
        name = self.object_name(key, ext)
        return f"{self.public_base_url}/{name}" if self.public_base_url else f"s3://{self.bucket}/{name}"

    def url_for(self, key: str, ext: str = "png") -> str:
        """A URL to show: the public one, or a fresh presigned GET (blocking: call in a thread)."""
        name = self.object_name(key, ext)
        if self.public_base_url:
            return f"{self.public_base_url}/{name}"
        params = {"Bucket": self.bucket, "Key": name}
        return self._submit(self._call(f"sign a URL for {name}", lambda: self._client.generate_presigned_url(
            "get_object", Params=params, ExpiresIn=self.presign_ttl_s)))

    def put(self, data: bytes, ext: str = "png") -> StoredBlob:
        """Store `data` under its sha256, with that checksum for the server to check; skipped when
        the object is there already. Raises StorageError once the retries are spent."""
        digest = hashlib.sha256(data)
        key, checksum = digest.hexdigest(), base64.b64encode(digest.digest()).decode()
        name = self.object_name(key, ext)
        self._submit(self._put(name, data, ext, checksum))
        return StoredBlob(key=key, url=self.location(key, ext), size=len(data))

    async def _put(self, name: str, data: bytes, ext: str, checksum: str) -> None:
        if await self._head(name) is not None:
            return  # content-addressed: these bytes are stored already
        await self._call(f"store {name}", lambda: self._client.put_object(
            Bucket=self.bucket, Key=name, Body=data, ContentType=CONTENT_TYPES[ext],
            ChecksumAlgorithm="SHA256", ChecksumSHA256=checksum,
            CacheControl="public, max-age=31536000, immutable",
        ))

    def get(self, key: str, ext: str = "png") -> bytes:
        """The object's bytes; FileNotFoundError when it is not in the bucket."""
        name = self.object_name(key, ext)

        async def read() -> bytes:
            try:
                response = await self._client.get_object(Bucket=self.bucket, Key=name)
            except Exception as exc:
                if _code(exc) in _NOT_FOUND:
                    raise FileNotFoundError(f"{self.where}: no object {name}") from None
                raise
            async with response["Body"] as body:
                return await body.read()

        return self._submit(self._call(f"read {name}", read))

    def exists(self, key: str, ext: str = "png") -> bool:
        return self._submit(self._head(self.object_name(key, ext))) is not None

    def delete(self, key: str, ext: str = "png") -> bool:
        """Remove an object; False when it was not there."""
        name = self.object_name(key, ext)

        async def remove() -> bool:
            if await self._head(name) is None:
                return False
            await self._call(f"delete {name}", lambda: self._client.delete_object(Bucket=self.bucket, Key=name))
            return True

        return self._submit(remove())

    def keys(self) -> Iterator[BlobInfo]:
        """Every stored object under the prefix, a page (up to 1000) at a time."""
        token: str | None = None
        while True:
            page = self._submit(self._list(token))
            for item in page.get("Contents", ()):
                parsed = self._parse(item["Key"])
                if parsed is not None:
                    yield BlobInfo(parsed[0], parsed[1], item["Size"], item["LastModified"].timestamp())
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return

    def check_writable(self) -> None:
        """Write a small probe object: at start-up, not after the first image took seconds."""
        name = f"{self.prefix}/{PROBE_NAME}" if self.prefix else PROBE_NAME
        self._submit(self._call("write to the bucket", lambda: self._client.put_object(
            Bucket=self.bucket, Key=name, Body=b"easel", ContentType="text/plain")))

    def close(self) -> None:
        """Close the client and stop the loop's thread; the store cannot be used after."""
        if self._closed:
            return
        self._closed = True
        try:
            asyncio.run_coroutine_threadsafe(self._exit.aclose(), self._loop).result(10)
        except Exception:  # closing what failed to open, or a stuck connection: stop anyway
            pass
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()

    # --- the loop ------------------------------------------------------------------------------

    def _submit(self, coro: Coroutine[Any, Any, _T]) -> _T:
        """Run `coro` on the store's loop and wait for it (from any thread but the loop's)."""
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("S3BlobStore was called on its own loop; call it from a worker thread")
        if self._closed:
            coro.close()
            raise StorageError(f"{self.where}: the store is closed")
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(self._deadline)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise StorageError(f"{self.where}: no answer within {self._deadline:.0f} s") from None

    async def _call(self, what: str, call: Callable[[], Awaitable[_T]]) -> _T:
        """`call()`, retried with back-off and jitter on transient errors; then a StorageError."""
        for attempt in range(1, self.attempts + 1):
            try:
                return await asyncio.wait_for(call(), self.timeout_s)
            except (FileNotFoundError, asyncio.CancelledError):
                raise
            except Exception as exc:
                why = _transient(exc)
                if why is None:
                    raise StorageError(f"{self.where}: cannot {what}: {_reason(exc)}") from None
                if attempt == self.attempts:
                    raise StorageError(f"{self.where}: cannot {what} after {attempt} attempts ({why})") from None
                await asyncio.sleep(self.base_delay_s * 2 ** (attempt - 1) * random.uniform(0.5, 1.0))
        raise AssertionError("unreachable")

    async def _head(self, name: str) -> dict[str, Any] | None:
        async def head() -> dict[str, Any] | None:
            try:
                return await self._client.head_object(Bucket=self.bucket, Key=name, ChecksumMode="ENABLED")
            except Exception as exc:
                if _code(exc) in _NOT_FOUND:
                    return None
                raise

        return await self._call(f"look up {name}", head)

    async def _list(self, token: str | None) -> dict[str, Any]:
        args: dict[str, Any] = {"Bucket": self.bucket, "Prefix": f"{self.prefix}/" if self.prefix else ""}
        if token:
            args["ContinuationToken"] = token
        return await self._call("list the bucket", lambda: self._client.list_objects_v2(**args))

    def _parse(self, name: str) -> tuple[str, str] | None:
        """(key, ext) of an object name laid out as object_name() makes them; None otherwise."""
        rest = name[len(self.prefix) + 1:] if self.prefix else name
        folder, slash, file = rest.partition("/")
        parsed = parse_name(file) if slash else None
        return parsed if parsed is not None and parsed[0][:2] == folder else None


def _code(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    return str(response.get("Error", {}).get("Code", "")) if isinstance(response, dict) else ""


def _transient(exc: BaseException) -> str | None:
    """Why another try may work (busy, unreachable, timed out), or None."""
    from botocore.exceptions import ClientError, HTTPClientError
    from botocore.exceptions import ConnectionError as BotoConnectionError

    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, (BotoConnectionError, HTTPClientError, ConnectionError)):
        return f"cannot connect: {type(exc).__name__}"
    if isinstance(exc, ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        code = _code(exc)
        if status >= 500 or status == 429 or code in _TRANSIENT_CODES:
            return f"{code}, HTTP {status}" if code and not code.isdigit() else f"HTTP {status}"
    return None


def _reason(exc: BaseException) -> str:
    """A failure in words: the service's error code, never its full text or a credential."""
    from botocore.exceptions import NoCredentialsError, PartialCredentialsError

    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return "no usable credentials in the environment (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)"
    code = _code(exc)
    return _HINTS.get(code, code) if code else type(exc).__name__


def _host(url: str) -> str:
    """scheme://host[:port] of an endpoint, without any user:password in it."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}" + (f":{parts.port}" if parts.port else "")
