"""The HTTP server that gives every stored image a stable public URL.

Images are never buffered whole: on a plain TCP transport the kernel sends the verified, open
file itself (sendfile(2), in pieces each under the stall timeout); otherwise (TLS) each response
reads its file in `chunk_bytes` pieces on a small thread pool and writes each with back-pressure,
so a slow client holds about one chunk of memory however large the image. At most `max_streams` responses of files of `small_file_bytes`
or more stream at once; the others wait for a slot holding nothing (not even an open file).

The ETag is the content key (the sha256 of the bytes), so before a file is served under it the
first time, and again whenever its stat (device, inode, size, mtime, ctime) changes, it is hashed
(streamed, off the event loop); a file whose bytes no longer hash to its key is refused with 500.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import stat
import sys
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.log import server_logger

from .blobs import CONTENT_TYPES, LocalBlobStore, is_key

log = logging.getLogger(__name__)

MAX_STREAMS = 64
CHUNK_BYTES = 256 * 1024
SENDFILE_PIECE = 1 << 20  # sendfile(2) per call: the stall timeout applies to each
SMALL_FILE_BYTES = 1 << 20
VERIFIED_CACHE_SIZE = 4096
STALL_TIMEOUT_S = 60.0
_HASH_CHUNK = 1 << 20
_IO_THREADS = 8
_HASH_THREADS = 2
# Content-addressed: the bytes behind a URL never change.
CACHE_CONTROL = "public, max-age=31536000, immutable"
DAMAGED = "the stored image is damaged"

_T = TypeVar("_T")


@dataclass
class ImageServerStats:
    """Live figures of one image app, at `app[IMAGE_STATS]` (for tests and benchmarks)."""

    max_streams: int
    streaming: int = 0  # responses holding a slot now
    waiting: int = 0  # responses waiting for a slot now
    peak_streaming: int = 0
    hashed: int = 0  # verifications run (a file's bytes hashed)
    damaged: int = 0  # verifications that found the bytes no longer match the key


IMAGE_STATS = web.AppKey("image_stats", ImageServerStats)


class _Sig(NamedTuple):
    """What must stay the same for a verified file to count as still verified."""

    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int


def _sig(st: os.stat_result) -> _Sig:
    return _Sig(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _open(path: Path) -> tuple[int, _Sig]:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise IsADirectoryError(str(path))
        return fd, _sig(st)
    except BaseException:
        os.close(fd)
        raise


def _read(fd: int, size: int, offset: int, check: bool) -> tuple[bytes, _Sig | None]:
    """`size` bytes at `offset`, and when `check`, the file's stat afterwards."""
    data = os.pread(fd, size, offset)
    return data, (_sig(os.fstat(fd)) if check else None)


def _unbuffered(fd: int) -> Any:
    """A file object over `fd` (which stays open) for loop.sendfile."""
    return open(fd, "rb", buffering=0, closefd=False)


def _hash_file(path: Path) -> tuple[_Sig | None, str]:
    """The file's sha256 and its stat, or None for the stat if it changed while being read."""
    with open(path, "rb", buffering=0) as f:
        before = _sig(os.fstat(f.fileno()))
        digest = hashlib.sha256()
        buf = bytearray(_HASH_CHUNK)
        view = memoryview(buf)
        while n := f.readinto(buf):
            digest.update(view[:n])
        after = _sig(os.fstat(f.fileno()))
    return (before if before == after else None), digest.hexdigest()


class _Unsteady(Exception):
    """The file kept changing while it was being verified."""


class _Verifier:
    """Which (key, ext) files were hashed, in which state, and what came out: a bounded LRU of
    good states and one of damaged states (so a damaged file is not re-hashed per request), and
    at most one hash in flight per file."""

    def __init__(self, pool: ThreadPoolExecutor, capacity: int, stats: ImageServerStats):
        self._pool = pool
        self._capacity = capacity
        self._stats = stats
        self._good: OrderedDict[tuple[str, str], _Sig] = OrderedDict()
        self._bad: OrderedDict[tuple[str, str], _Sig] = OrderedDict()
        self._inflight: dict[tuple[str, str], asyncio.Future[None]] = {}

    async def is_intact(self, key: str, ext: str, path: Path, sig: _Sig) -> bool:
        name = (key, ext)
        for _ in range(3):
            if self._good.get(name) == sig:
                self._good.move_to_end(name)
                return True
            if self._bad.get(name) == sig:
                return False
            task = self._inflight.get(name)
            if task is None:
                task = asyncio.ensure_future(self._verify(key, ext, path))
                self._inflight[name] = task
                task.add_done_callback(lambda t, name=name: self._done(name, t))
            # Shielded: a request that goes away does not cancel a hash others wait on.
            await asyncio.shield(task)
        raise _Unsteady(f"{key}.{ext}")

    def _done(self, name: tuple[str, str], task: asyncio.Future[None]) -> None:
        self._inflight.pop(name, None)
        if not task.cancelled():
            task.exception()  # retrieved here too, in case every waiter has gone

    def forget(self, key: str, ext: str) -> None:
        self._good.pop((key, ext), None)

    async def _verify(self, key: str, ext: str, path: Path) -> None:
        loop = asyncio.get_running_loop()
        sig, digest = await loop.run_in_executor(self._pool, _hash_file, path)
        self._stats.hashed += 1
        if sig is None:
            return  # changed while being hashed: the caller looks again
        name = (key, ext)
        intact = digest == key
        self._remember(self._good if intact else self._bad, name, sig)
        (self._bad if intact else self._good).pop(name, None)
        if not intact:
            self._stats.damaged += 1
            log.warning("stored image %s.%s is damaged: its bytes hash to %s, not to its key",
                        key, ext, digest)

    def _remember(self, cache: OrderedDict[tuple[str, str], _Sig], name: tuple[str, str],
                  sig: _Sig) -> None:
        cache[name] = sig
        cache.move_to_end(name)
        while len(cache) > self._capacity:
            cache.popitem(last=False)


class _Unsatisfiable(Exception):
    pass


_RANGE = re.compile(r"bytes\s*=\s*(\d*)\s*-\s*(\d*)", re.IGNORECASE)


def _byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The [start, stop) asked for by a Range header, None for the whole file (no Range, a
    malformed one, or several ranges, which we answer whole), or _Unsatisfiable."""
    if header is None or "," in header:
        return None
    m = _RANGE.fullmatch(header.strip())
    if m is None or m.group(1) == m.group(2) == "":
        return None
    first, last = m.groups()
    if first == "":  # bytes=-n: the last n bytes
        n = int(last)
        if n == 0 or size == 0:
            raise _Unsatisfiable
        return max(0, size - n), size
    start = int(first)
    if start >= size or (last != "" and int(last) < start):
        raise _Unsatisfiable
    return start, (size if last == "" else min(int(last) + 1, size))


class _ServerLog(logging.LoggerAdapter):
    """aiohttp's server logger, except that a request aiohttp could not parse (the client's
    fault, and routine noise on a public port) or a client gone mid-response is one INFO line,
    not an ERROR with a traceback."""

    def log(self, level: int, msg: object, *args: Any, exc_info: Any = None, **kwargs: Any) -> None:
        exc = exc_info[1] if isinstance(exc_info, tuple) else exc_info
        if exc is True:
            exc = sys.exc_info()[1]
        if isinstance(exc, (HttpProcessingError, ConnectionError)):
            what = " ".join(f"{type(exc).__name__}: {exc}".split())  # one line, however it reads
            super().log(min(level, logging.INFO), f"{msg}: %s", *args, what[:300], **kwargs)
        else:
            super().log(level, msg, *args, exc_info=exc_info, **kwargs)


def _matches(tags: Any, key: str) -> bool:
    # If-None-Match compares weakly (RFC 9110 13.1.2): W/"key" matches too.
    return any(tag.value in (key, "*") for tag in tags or ())


def make_image_app(store: LocalBlobStore, *, max_streams: int = MAX_STREAMS,
                   chunk_bytes: int = CHUNK_BYTES, small_file_bytes: int = SMALL_FILE_BYTES,
                   verified_cache_size: int = VERIFIED_CACHE_SIZE,
                   stall_timeout_s: float = STALL_TIMEOUT_S, sendfile: bool = True) -> web.Application:
    """The image app: `/images/{key}.{ext}` and `/healthz`. Responses for files of
    `small_file_bytes` or more take one of `max_streams` slots while they stream; a client that
    takes no chunk for `stall_timeout_s` is dropped, so stalled readers cannot hold the slots."""
    if max_streams < 1 or chunk_bytes < 1 or stall_timeout_s <= 0:
        raise ValueError("max_streams, chunk_bytes and stall_timeout_s must be positive")
    sendfile_ok = sendfile
    stats = ImageServerStats(max_streams=max_streams)
    slots = asyncio.Semaphore(max_streams)
    io_pool = ThreadPoolExecutor(_IO_THREADS, thread_name_prefix="easel-images-io")
    hash_pool = ThreadPoolExecutor(_HASH_THREADS, thread_name_prefix="easel-images-hash")
    verifier = _Verifier(hash_pool, verified_cache_size, stats)

    async def io(fn: Callable[..., _T], *args: Any) -> _T:
        return await asyncio.get_running_loop().run_in_executor(io_pool, fn, *args)

    @contextlib.asynccontextmanager
    async def slot(bounded: bool) -> AsyncIterator[None]:
        if not bounded:
            yield
            return
        stats.waiting += 1
        try:
            await slots.acquire()
        finally:
            stats.waiting -= 1
        stats.streaming += 1
        stats.peak_streaming = max(stats.peak_streaming, stats.streaming)
        try:
            yield
        finally:
            stats.streaming -= 1
            slots.release()

    async def image(request: web.Request) -> web.StreamResponse:
        key, ext = request.match_info["key"], request.match_info["ext"]
        if not is_key(key) or ext not in CONTENT_TYPES:
            raise web.HTTPNotFound(text="no such image")
        path = store.path_for(key, ext)
        # Not FileResponse: it would replace the content-key ETag with one made from file stats.
        etag = f'"{key}"'
        headers = {
            "Content-Type": CONTENT_TYPES[ext],
            "Cache-Control": CACHE_CONTROL,
            "ETag": etag,
            "Accept-Ranges": "bytes",
        }
        head = request.method == "HEAD"
        try:
            fd, sig = await io(_open, path)  # one hop: opened, and its stat
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise web.HTTPNotFound(text="no such image") from None
        if _matches(request.if_none_match, key):
            os.close(fd)  # a regular local file: close does not wait on the disk
            return web.Response(status=304, headers=headers)
        if not head and sig.size >= small_file_bytes:
            os.close(fd)
            async with slot(True):  # waiting for a slot holds nothing, not even an open file
                try:
                    fd, sig = await io(_open, path)
                except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                    raise web.HTTPNotFound(text="no such image") from None
                try:
                    return await respond(request, key, ext, path, fd, sig, headers, head)
                finally:
                    os.close(fd)
        try:
            return await respond(request, key, ext, path, fd, sig, headers, head)
        finally:
            os.close(fd)

    async def send_file(request: web.Request, key: str, ext: str, fd: int, sig: _Sig, start: int,
                        stop: int) -> bool:
        """The body by sendfile(2) from the verified, open file: no copy through Python, in pieces
        of `SENDFILE_PIECE` each under the stall timeout, the file's stat checked before the last
        piece. False where the transport cannot (TLS): the caller streams it instead."""
        transport, loop = request.transport, asyncio.get_running_loop()
        if transport is None or not sendfile_ok:
            return False
        with _unbuffered(fd) as f:
            pos = start
            while pos < stop:
                n = min(SENDFILE_PIECE, stop - pos)
                # fstat of an open local file reads no disk: no thread hop for it.
                if pos + n >= stop and _sig(os.fstat(fd)) != sig:
                    verifier.forget(key, ext)
                    log.warning("stored image %s.%s changed while being served; response dropped", key, ext)
                    transport.abort()
                    return True
                try:
                    async with asyncio.timeout(stall_timeout_s):
                        await loop.sendfile(transport, f, pos, n, fallback=False)
                except asyncio.SendfileNotAvailableError:
                    if pos == start:
                        return False
                    transport.abort()  # it failed part way: the client went away
                    return True
                except (RuntimeError, ConnectionError):  # the transport is closing: the client left
                    transport.abort()
                    return True
                except TimeoutError:
                    log.info("dropped a client that took nothing for %gs: %s", stall_timeout_s, request.remote)
                    transport.abort()
                    return True
                pos += n
        return True

    async def respond(request: web.Request, key: str, ext: str, path: Path, fd: int, sig: _Sig,
                      headers: dict[str, str], head: bool) -> web.StreamResponse:
        try:
            intact = await verifier.is_intact(key, ext, path, sig)
        except FileNotFoundError:
            raise web.HTTPNotFound(text="no such image") from None
        except _Unsteady:
            raise web.HTTPServiceUnavailable(text="the stored image is changing; try again",
                                             headers={"Retry-After": "1"}) from None
        if not intact:
            raise web.HTTPInternalServerError(text=DAMAGED, headers={"Cache-Control": "no-store"})
        size = sig.size
        if_range = request.headers.get("If-Range")
        asked = request.headers.get("Range")
        if if_range is not None and if_range.strip() != headers["ETag"]:
            asked = None  # If-Range compares strongly; a date or another tag: send it whole
        try:
            span = _byte_range(asked, size)
        except _Unsatisfiable:
            raise web.HTTPRequestRangeNotSatisfiable(
                headers={"Accept-Ranges": "bytes", "Content-Range": f"bytes */{size}"}) from None
        start, stop = span or (0, size)
        resp = web.StreamResponse(status=206 if span else 200, headers=headers)
        if span:
            resp.headers["Content-Range"] = f"bytes {start}-{stop - 1}/{size}"
        resp.content_length = stop - start
        try:
            await resp.prepare(request)
            if head:
                return resp
            if await send_file(request, key, ext, fd, sig, start, stop):
                return resp
            pos = start
            while pos < stop:
                n = min(chunk_bytes, stop - pos)
                last = pos + n >= stop
                data, now = await io(_read, fd, n, pos, last)
                if len(data) != n or (now is not None and now != sig):
                    # Changed under us: better a short, broken response than wrong bytes.
                    verifier.forget(key, ext)
                    log.warning("stored image %s.%s changed while being served; response dropped",
                                key, ext)
                    if request.transport is not None:
                        request.transport.abort()
                    return resp
                try:
                    async with asyncio.timeout(stall_timeout_s):
                        await resp.write(data)  # waits while the client's buffers are full
                except TimeoutError:
                    log.info("dropped a client that took nothing for %gs: %s", stall_timeout_s,
                             request.remote)
                    if request.transport is not None:
                        request.transport.abort()
                    return resp
                del data
                pos += n
        except ConnectionError:
            pass  # the client went away
        return resp

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def shut_pools(app: web.Application) -> None:
        io_pool.shutdown(wait=False, cancel_futures=True)
        hash_pool.shutdown(wait=False, cancel_futures=True)

    app = web.Application(handler_args={"logger": _ServerLog(server_logger, {})})
    app[IMAGE_STATS] = stats
    app.on_cleanup.append(shut_pools)
    app.router.add_get(r"/images/{key}.{ext}", image)
    app.router.add_get("/healthz", health)
    return app
