"""The HTTP server that gives every stored image a stable public URL.

Images are never buffered whole: on a plain TCP transport the kernel sends the verified, open
file itself (sendfile(2): what the socket takes at once straight from the handler, the rest
through the loop as the client drains it, in pieces each under the stall timeout); otherwise
(TLS) each response reads its file in `chunk_bytes` pieces on a small thread pool and writes each
with back-pressure, so a slow client holds about one chunk of memory however large the image. At
most `max_streams` responses of files of `small_file_bytes` or more stream at once; the others
wait for a slot holding nothing (not even an open file).

The ETag is the content key (the sha256 of the bytes), so before a file is served under it the
first time, and again whenever its stat (device, inode, size, mtime, ctime, links) changes, it is
hashed (streamed, off the event loop); a file whose bytes no longer hash to its key is refused
with 500. Verified files stay open between requests (up to `open_files`), so serving one again
takes an fstat of its descriptor, not a path lookup on a thread.

Listening through storage.image_site.ImageSite (as `easel serve` and `easel run` do), the plain
GETs of small files already open here are answered before aiohttp sees them, from the same open,
verified files; everything else comes here.
"""
from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import logging
import os
import re
import socket
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
OPEN_FILES = 256  # verified files kept open between requests
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
    opened: int = 0  # files opened by path (a request the open-file cache could not answer)
    hashed: int = 0  # verifications run (a file's bytes hashed)
    damaged: int = 0  # verifications that found the bytes no longer match the key
    fast: int = 0  # requests answered on storage.image_site's fast path
    fast_waited: int = 0  # of those, responses whose body waited for the client to drain


IMAGE_STATS = web.AppKey("image_stats", ImageServerStats)


class _Sig(NamedTuple):
    """What must stay the same for a verified file to count as still verified."""

    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int
    nlink: int  # unlinked or replaced: fewer links, whatever the clock's granularity


def _sig(st: os.stat_result) -> _Sig:
    return _Sig(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_nlink)


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
    """A file object over `fd` (which stays open; wrapping it reads nothing) for loop.sendfile."""
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


class _OpenFile:
    """A verified file kept open for the next requests, with the stat it was verified in."""

    __slots__ = ("fd", "sig", "users", "evicted")

    def __init__(self, fd: int, sig: _Sig):
        self.fd, self.sig, self.users, self.evicted = fd, sig, 0, False


class _OpenFiles:
    """The files served lately, kept open (as nginx's open_file_cache does) so a request for one
    needs no path lookup and no thread hop: a cached file is still good while fstat of its open
    descriptor (an inode in memory: no disk read) gives the state it was verified in. Unlinking
    or replacing the file changes its link count and ctime, writing to it its size or mtime, so
    any of these sends the next request the slow way (open in a thread, verify). A file evicted
    while responses use it is closed when the last of them ends."""

    def __init__(self, capacity: int):
        self._capacity = capacity
        self._files: OrderedDict[tuple[str, str], _OpenFile] = OrderedDict()

    def take(self, name: tuple[str, str]) -> _OpenFile | None:
        """The cached file, still in its verified state, for one more user; else None."""
        entry = self._files.get(name)
        if entry is None:
            return None
        try:
            current = _sig(os.fstat(entry.fd))
        except OSError:
            current = None
        if current != entry.sig:
            self._evict(name)
            return None
        self._files.move_to_end(name)
        entry.users += 1
        return entry

    def keep(self, name: tuple[str, str], fd: int, sig: _Sig) -> _OpenFile:
        """Cache `fd` (now owned by the cache) as verified in `sig`, for one user."""
        self._evict(name)
        entry = self._files[name] = _OpenFile(fd, sig)
        entry.users = 1
        while len(self._files) > self._capacity:
            self._evict(next(iter(self._files)))
        return entry

    def give_back(self, entry: _OpenFile) -> None:
        entry.users -= 1
        if entry.evicted and entry.users == 0:
            os.close(entry.fd)

    def _evict(self, name: tuple[str, str]) -> None:
        entry = self._files.pop(name, None)
        if entry is not None:
            entry.evicted = True
            if entry.users == 0:
                os.close(entry.fd)

    def close(self) -> None:
        for name in list(self._files):
            self._evict(name)


_TCP = (socket.AF_INET, socket.AF_INET6)
_NO_SENDFILE = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP}  # the kernel cannot, for this pair


class _Changed(Exception):
    """The file changed while being served: the response is dropped."""


class _ImageApp:
    """The request handling of one image app (see make_image_app)."""

    def __init__(self, store: LocalBlobStore, *, max_streams: int, chunk_bytes: int,
                 small_file_bytes: int, verified_cache_size: int, open_files: int,
                 stall_timeout_s: float, sendfile: bool):
        self.store, self.chunk_bytes, self.small_file_bytes = store, chunk_bytes, small_file_bytes
        self.stall_timeout_s, self.sendfile_ok = stall_timeout_s, sendfile
        self.stats = ImageServerStats(max_streams=max_streams)
        self._slots = asyncio.Semaphore(max_streams)
        self._io_pool = ThreadPoolExecutor(_IO_THREADS, thread_name_prefix="easel-images-io")
        self._hash_pool = ThreadPoolExecutor(_HASH_THREADS, thread_name_prefix="easel-images-hash")
        self.verifier = _Verifier(self._hash_pool, verified_cache_size, self.stats)
        self.open_files = _OpenFiles(open_files)

    async def _io(self, fn: Callable[..., _T], *args: Any) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._io_pool, fn, *args)

    @contextlib.asynccontextmanager
    async def _slot(self, bounded: bool) -> AsyncIterator[None]:
        if not bounded:
            yield
            return
        stats = self.stats
        stats.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            stats.waiting -= 1
        stats.streaming += 1
        stats.peak_streaming = max(stats.peak_streaming, stats.streaming)
        try:
            yield
        finally:
            stats.streaming -= 1
            self._slots.release()

    async def image(self, request: web.Request) -> web.StreamResponse:
        key, ext = request.match_info["key"], request.match_info["ext"]
        if not is_key(key) or ext not in CONTENT_TYPES:
            raise web.HTTPNotFound(text="no such image")
        # Not FileResponse: it would replace the content-key ETag with one made from file stats.
        headers = {
            "Content-Type": CONTENT_TYPES[ext],
            "Cache-Control": CACHE_CONTROL,
            "ETag": f'"{key}"',
            "Accept-Ranges": "bytes",
        }
        name = (key, ext)
        cached = self.open_files.take(name)
        if cached is not None and _matches(request.if_none_match, key):
            self.open_files.give_back(cached)
            return web.Response(status=304, headers=headers)
        head = request.method == "HEAD"
        if cached is not None and (head or cached.sig.size < self.small_file_bytes):
            return await self._respond_and_give_back(request, name, cached, headers, head)
        path = self.store.path_for(key, ext)
        if cached is None:
            fd, sig = await self._opened(path)  # one hop: opened, and its stat
            if _matches(request.if_none_match, key):
                os.close(fd)  # a regular local file: close does not wait on the disk
                return web.Response(status=304, headers=headers)
            if head or sig.size < self.small_file_bytes:
                entry = await self._verified(name, path, fd, sig)
                return await self._respond_and_give_back(request, name, entry, headers, head)
            os.close(fd)
        else:
            self.open_files.give_back(cached)
        # A large file: waiting for a slot holds nothing, not even a use of the cached file.
        async with self._slot(True):
            entry = self.open_files.take(name)
            if entry is None:
                fd, sig = await self._opened(path)
                entry = await self._verified(name, path, fd, sig)
            return await self._respond_and_give_back(request, name, entry, headers, head)

    async def _respond_and_give_back(self, request: web.Request, name: tuple[str, str],
                                     entry: _OpenFile, headers: dict[str, str],
                                     head: bool) -> web.StreamResponse:
        try:
            return await self._respond(request, name, entry, headers, head)
        finally:
            self.open_files.give_back(entry)

    async def _opened(self, path: Path) -> tuple[int, _Sig]:
        self.stats.opened += 1
        try:
            return await self._io(_open, path)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise web.HTTPNotFound(text="no such image") from None

    async def _verified(self, name: tuple[str, str], path: Path, fd: int, sig: _Sig) -> _OpenFile:
        """The open file `fd`, once its bytes are known to hash to its key, kept open for the next
        requests; or the error that answers the request (and `fd` closed)."""
        try:
            intact = await self.verifier.is_intact(*name, path, sig)
        except FileNotFoundError:
            os.close(fd)
            raise web.HTTPNotFound(text="no such image") from None
        except _Unsteady:
            os.close(fd)
            raise web.HTTPServiceUnavailable(text="the stored image is changing; try again",
                                             headers={"Retry-After": "1"}) from None
        except BaseException:
            os.close(fd)
            raise
        if not intact:
            os.close(fd)
            raise web.HTTPInternalServerError(text=DAMAGED, headers={"Cache-Control": "no-store"})
        return self.open_files.keep(name, fd, sig)

    async def _respond(self, request: web.Request, name: tuple[str, str], entry: _OpenFile,
                       headers: dict[str, str], head: bool) -> web.StreamResponse:
        size = entry.sig.size
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
        transport = request.transport
        sock = transport.get_extra_info("socket") if transport is not None and not head else None
        direct = (self.sendfile_ok and sock is not None and sock.family in _TCP
                  and transport.get_extra_info("sslcontext") is None)
        try:
            await resp.prepare(request)
            if head:
                return resp
            if direct:
                await self._send_file(request, resp, sock, entry, start, stop)
            else:
                await self._stream(resp, entry, start, stop)
        except _Changed:
            self.verifier.forget(*name)
            log.warning("stored image %s.%s changed while being served; response dropped", *name)
            if request.transport is not None:
                request.transport.abort()
        except TimeoutError:
            log.info("dropped a client that took nothing for %gs: %s", self.stall_timeout_s,
                     request.remote)
            if request.transport is not None:
                request.transport.abort()
        except (ConnectionError, RuntimeError):  # the client went away; its transport is closing
            if request.transport is not None:
                request.transport.abort()
        return resp

    async def _send_file(self, request: web.Request, resp: web.StreamResponse, sock: Any,
                         entry: _OpenFile, start: int, stop: int) -> None:
        """The body by sendfile(2) from the verified, open file, no copy through Python: what the
        socket takes now straight away, in this call; the rest through the loop as the client
        drains it, each piece under the stall timeout. The file's stat is checked before the piece
        that completes the response."""
        fd, pos, out, transport = entry.fd, start, sock.fileno(), request.transport
        writer = request.writer  # counts the bytes sent, for the access log's %b
        while pos < stop:
            n = min(SENDFILE_PIECE, stop - pos)
            if pos + n >= stop and _sig(os.fstat(fd)) != entry.sig:
                raise _Changed
            if transport is None or transport.is_closing():
                raise ConnectionError("the client went away")
            if not transport.get_write_buffer_size():  # nothing queued ahead of the file
                try:
                    sent = os.sendfile(out, fd, pos, n)
                except BlockingIOError:
                    sent = -1  # the client's buffers are full: wait below
                except OSError as exc:
                    if isinstance(exc, ConnectionError) or exc.errno not in _NO_SENDFILE:
                        raise
                    await self._stream(resp, entry, pos, stop)
                    return
                if sent == 0:  # the file ended early: it was cut short
                    raise _Changed
                if sent > 0:
                    pos += sent
                    writer.output_size += sent
                    continue
            if not await self._send_when_writable(transport, fd, pos, n):
                await self._stream(resp, entry, pos, stop)  # this loop cannot (uvloop)
                return
            pos += n
            writer.output_size += n

    async def _send_when_writable(self, transport: asyncio.Transport, fd: int, pos: int,
                                  n: int) -> bool:
        """`n` bytes at `pos` by the loop's sendfile, which waits while the client's buffers are
        full; False where the loop has no sendfile."""
        with _unbuffered(fd) as f:
            try:
                async with asyncio.timeout(self.stall_timeout_s):
                    await asyncio.get_running_loop().sendfile(transport, f, pos, n, fallback=False)
            except (asyncio.SendfileNotAvailableError, NotImplementedError):
                return False
        return True

    async def _stream(self, resp: web.StreamResponse, entry: _OpenFile, start: int,
                      stop: int) -> None:
        """The body read in `chunk_bytes` pieces on the thread pool, each written with
        back-pressure (TLS, or sendfile turned off)."""
        pos = start
        while pos < stop:
            n = min(self.chunk_bytes, stop - pos)
            data, now = await self._io(_read, entry.fd, n, pos, pos + n >= stop)
            if len(data) != n or (now is not None and now != entry.sig):
                raise _Changed  # better a short, broken response than wrong bytes
            async with asyncio.timeout(self.stall_timeout_s):
                await resp.write(data)  # waits while the client's buffers are full
            del data
            pos += n

    async def shut(self, app: web.Application) -> None:
        self._io_pool.shutdown(wait=False, cancel_futures=True)
        self._hash_pool.shutdown(wait=False, cancel_futures=True)
        self.open_files.close()


IMAGE_APP = web.AppKey("image_app", _ImageApp)  # for storage.image_site's fast path


async def _health(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


def make_image_app(store: LocalBlobStore, *, max_streams: int = MAX_STREAMS,
                   chunk_bytes: int = CHUNK_BYTES, small_file_bytes: int = SMALL_FILE_BYTES,
                   verified_cache_size: int = VERIFIED_CACHE_SIZE, open_files: int = OPEN_FILES,
                   stall_timeout_s: float = STALL_TIMEOUT_S, sendfile: bool = True) -> web.Application:
    """The image app: `/images/{key}.{ext}` and `/healthz`. Responses for files of
    `small_file_bytes` or more take one of `max_streams` slots while they stream; a client that
    takes no chunk for `stall_timeout_s` is dropped, so stalled readers cannot hold the slots.
    Up to `open_files` verified files stay open between requests."""
    if max_streams < 1 or chunk_bytes < 1 or stall_timeout_s <= 0 or open_files < 1:
        raise ValueError("max_streams, chunk_bytes, open_files and stall_timeout_s must be positive")
    images = _ImageApp(store, max_streams=max_streams, chunk_bytes=chunk_bytes,
                       small_file_bytes=small_file_bytes, verified_cache_size=verified_cache_size,
                       open_files=open_files, stall_timeout_s=stall_timeout_s, sendfile=sendfile)
    app = web.Application(handler_args={"logger": _ServerLog(server_logger, {})})
    app[IMAGE_STATS] = images.stats
    app[IMAGE_APP] = images
    app.on_cleanup.append(images.shut)
    app.router.add_get(r"/images/{key}.{ext}", images.image)
    app.router.add_get("/healthz", _health)
    return app
