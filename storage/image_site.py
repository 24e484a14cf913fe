"""The image server's listening site, with a fast path for its hottest request.

Nearly every request an image server gets is the same: `GET /images/<sha256>.<ext>` for a file
it served a moment ago, no range, no body. aiohttp's request machinery (parser, request and
response objects, router, middleware, a task per connection) costs more CPU than the kernel's
sendfile(2) of a 600 KB image, so this site answers exactly those requests itself, on the
connection's protocol, with the image app's own open, verified files (storage.server): one
fstat of the cached descriptor, the same headers aiohttp would send (corked, so they leave in one
segment with the body: a head in a packet of its own cost the client a wake-up per response, and
that alone held the server to about 0.7x nginx), and sendfile(2) straight from the protocol
callback.

Anything else is aiohttp's: at the first request on a connection that is not a plain GET or
HEAD of a cached, small image (a gallery page, a range, an image not yet open or verified, a
request with a body, HTTP/1.0, a malformed or unusual header, an upgrade), the connection is
handed to aiohttp's protocol for good, the bytes read so far with it. So every behaviour that
is not on the fast path (404s, verification, damaged files, ranges, slots for large files, the
gallery) is aiohttp's and storage.server's, unchanged; the fast path only repeats the answer
they would give when it is certain of it.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import socket
import time
from email.utils import formatdate
from typing import Any

from aiohttp import web
from aiohttp.http import SERVER_SOFTWARE
from aiohttp.log import access_logger

from .blobs import CONTENT_TYPES
from .server import _NO_SENDFILE, CACHE_CONTROL, IMAGE_APP, _ImageApp, _OpenFile, _sig, _unbuffered

log = logging.getLogger(__name__)

KEEPALIVE_TIMEOUT_S = 3630.0  # aiohttp's own default, so both paths close idle connections alike
_MAX_HEAD = 8190  # aiohttp's longest line: a longer head goes to aiohttp, which applies its limits
_MAX_FIELDS = 100  # more go to aiohttp, which takes at most 128
_MAX_PIPELINED = 64 * 1024  # read no further ahead of the responses than this
_CORKABLE = hasattr(socket, "TCP_CORK")  # Linux

# The only requests the fast path takes. Anything else (a query, %-escapes, HTTP/1.0) is aiohttp's.
_REQUEST_LINE = re.compile(rb"(GET|HEAD) /images/([0-9a-f]{64})\.([a-z]{3,4}) HTTP/1\.1")
# Header fields in their plainest form: a token, a colon, visible ASCII. Folded lines, control
# characters, bare CR or LF, or non-ASCII bytes go to aiohttp, which decides what they mean.
_FIELDS = re.compile(rb"(?:[!#$%&'*+.^_`|~0-9A-Za-z-]+:[\t\x20-\x7e]*\r\n)*")
_FIELD = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*([\t\x20-\x7e]*?)[ \t]*\r\n")
# Fields whose meaning the fast path leaves to aiohttp and storage.server.
_NOT_FAST = frozenset({b"content-length", b"transfer-encoding", b"range", b"if-range", b"if-match",
                       b"if-unmodified-since", b"expect", b"upgrade", b"http2-settings"})
_ETAGS = re.compile(rb'\*|(?:W/)?"[\x21\x23-\x7e]*"(?:[ \t]*,[ \t]*(?:W/)?"[\x21\x23-\x7e]*")*')
_ETAG = re.compile(rb'"([\x21\x23-\x7e]*)"')

_HEAD = (b"HTTP/1.1 %s\r\nContent-Type: %s\r\nCache-Control: " + CACHE_CONTROL.encode()
         + b"\r\nETag: \"%s\"\r\nAccept-Ranges: bytes\r\n%sDate: %s\r\nServer: "
         + SERVER_SOFTWARE.encode() + b"\r\n%s\r\n")
_TYPES = {ext.encode(): kind.encode() for ext, kind in CONTENT_TYPES.items()}


class _Date:
    """The Date header's value, formatted once a second."""

    def __init__(self) -> None:
        self._second, self._value = -1, b""

    def __call__(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second, self._value = now, formatdate(now, usegmt=True).encode()
        return self._value


class _Ask:
    """One request the fast path takes."""

    __slots__ = ("head", "key", "ext", "if_none_match", "close", "line", "referer", "agent")

    def __init__(self, head: bool, key: bytes, ext: bytes, line: bytes):
        self.head, self.key, self.ext, self.line = head, key, ext, line
        self.if_none_match: bytes | None = None
        self.close = False
        self.referer = self.agent = b"-"


def _parse(block: bytes) -> _Ask | None:
    """The request in `block` (its head, up to the blank line, exclusive), or None where it is
    not one for the fast path."""
    line_end = block.find(b"\r\n")
    line = block if line_end < 0 else block[:line_end]
    m = _REQUEST_LINE.fullmatch(line)
    if m is None:
        return None
    if m[3] not in _TYPES:
        return None
    ask = _Ask(m[1] == b"HEAD", m[2], m[3], line)
    if line_end < 0:
        return ask
    fields = block[line_end + 2:] + b"\r\n"
    if _FIELDS.fullmatch(fields) is None:
        return None
    found = _FIELD.findall(fields)
    if len(found) > _MAX_FIELDS:
        return None
    seen: set[bytes] = set()
    for raw_name, value in found:
        name = raw_name.lower()
        if name in _NOT_FAST and not (name == b"content-length" and value == b"0"):
            return None
        if name in seen and name in (b"if-none-match", b"connection", b"content-length"):
            return None  # repeated: leave combining them to aiohttp
        seen.add(name)
        if name == b"if-none-match":
            if _ETAGS.fullmatch(value) is None:
                return None
            ask.if_none_match = value
        elif name == b"connection":
            tokens = {t.strip().lower() for t in value.split(b",")}
            if b"upgrade" in tokens:
                return None
            ask.close = b"close" in tokens
        elif name == b"referer":
            ask.referer = value
        elif name == b"user-agent":
            ask.agent = value
    return ask


def _not_modified(ask: _Ask) -> bool:
    # If-None-Match compares weakly (RFC 9110 13.1.2): W/"key" matches too, as in storage.server.
    tags = ask.if_none_match
    return tags is not None and (tags == b"*" or ask.key in _ETAG.findall(tags))


class _Connection(asyncio.Protocol):
    """One client connection while it asks only for what the fast path answers."""

    def __init__(self, site: ImageSite):
        self._site = site
        self._images: _ImageApp = site.images
        self._transport: asyncio.Transport | None = None
        self._out = -1  # the socket's descriptor, for sendfile(2)
        self._sock: Any = None  # the transport's socket, for its options
        self._buf = b""
        self._busy = False  # a body is going out through the loop
        self._writable = True
        self._reading = True
        self._eof = False
        self._closing = False  # close once the response under way ends
        self._last = 0.0  # when the connection last finished a response (or opened)
        self._idle: asyncio.TimerHandle | None = None
        self._task: asyncio.Future[None] | None = None  # the body going out through the loop

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._sock = transport.get_extra_info("socket")
        self._out = self._sock.fileno()
        self._site.connections.add(self)
        self._last = asyncio.get_running_loop().time()
        self._watch_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self._site.connections.discard(self)
        if self._idle is not None:
            self._idle.cancel()
        self._transport = None

    def pause_writing(self) -> None:
        self._writable = False

    def resume_writing(self) -> None:
        self._writable = True
        self._serve()

    def data_received(self, data: bytes) -> None:
        self._buf = self._buf + data if self._buf else data
        self._serve()
        if self._transport is not None and len(self._buf) > _MAX_PIPELINED and self._reading:
            self._reading = False  # far enough ahead: read on once the responses catch up
            self._transport.pause_reading()

    def eof_received(self) -> bool | None:
        self._eof = True
        handler = self._serve()
        if handler is not None:
            return bool(handler.eof_received())
        return True if self._busy else None  # finish the response under way, then close

    def close(self) -> asyncio.Future[None] | None:
        """Close now when idle, else once the response under way has gone out: then the task
        sending it (shutting down)."""
        self._closing = True
        if self._busy:
            return self._task
        if self._transport is not None:
            self._transport.close()
        return None

    def _watch_idle(self) -> None:
        """Close the connection once it has been idle for the keep-alive timeout (one timer,
        moved on only when it fires: a response just records when it ended)."""
        loop = asyncio.get_running_loop()
        self._idle = loop.call_at(self._last + self._site.keepalive_timeout, self._check_idle)

    def _check_idle(self) -> None:
        if self._transport is None:
            return
        loop = asyncio.get_running_loop()
        if self._busy:
            self._last = loop.time()  # a body still going out is not idle
        if self._last + self._site.keepalive_timeout > loop.time():
            self._watch_idle()
        else:
            self._transport.close()

    def _serve(self) -> Any:
        """Answer each complete request in the buffer while the fast path can; the aiohttp
        protocol the connection was handed to, if it was."""
        transport = self._transport
        while transport is not None and not self._busy and self._writable and not self._closing:
            buf = self._buf
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > _MAX_HEAD or (self._eof and buf):
                    return self._hand_off()
                break
            ask = _parse(buf[:end]) if end <= _MAX_HEAD and self._images.sendfile_ok else None
            if ask is None:
                return self._hand_off()
            name = (ask.key.decode(), ask.ext.decode())
            entry = self._images.open_files.take(name)
            if entry is None or entry.sig.size >= self._images.small_file_bytes:
                if entry is not None:
                    self._images.open_files.give_back(entry)
                return self._hand_off()  # aiohttp opens and verifies it, or gives it a slot
            self._buf = buf[end + 4:]
            self._answer(transport, name, ask, entry)
            transport = self._transport
        if transport is not None and not self._reading and len(self._buf) <= _MAX_PIPELINED:
            self._reading = True
            transport.resume_reading()
        if self._eof and not self._busy and transport is not None:
            transport.close()
        return None

    def _hand_off(self) -> Any:
        """Give the connection, and what it sent so far, to aiohttp's protocol for good."""
        transport = self._transport
        assert transport is not None
        self._site.connections.discard(self)
        if self._idle is not None:
            self._idle.cancel()
        if not self._reading:
            transport.resume_reading()
        self._transport = None
        handler = self._site.aiohttp_protocol()
        transport.set_protocol(handler)
        handler.connection_made(transport)
        if self._buf:
            handler.data_received(self._buf)
        return handler

    def _answer(self, transport: asyncio.Transport, name: tuple[str, str], ask: _Ask,
                entry: _OpenFile) -> None:
        images = self._images
        images.stats.fast += 1
        not_modified = _not_modified(ask)
        size = entry.sig.size
        status, body = (b"304 Not Modified", 0) if not_modified else (b"200 OK", size)
        length = b"" if not_modified else b"Content-Length: %d\r\n" % size
        close = ask.close or self._eof
        head = _HEAD % (status, _TYPES[ask.ext], ask.key, length, self._site.date(),
                        b"Connection: close\r\n" if close else b"")
        corked = bool(body) and not ask.head and _CORKABLE
        if corked:
            self._cork(True)
        transport.write(head)
        if self._site.access_log:  # %b: the bytes of the response, its head included
            self._log(ask, status, len(head) + (0 if ask.head else body))
        if ask.head or not body:
            images.open_files.give_back(entry)
            self._done(close)
            return
        pos = self._send_now(transport, name, entry, size)
        if corked:
            self._cork(False)  # what is left of the first segments goes now
        if pos is None:
            images.open_files.give_back(entry)
            return
        if pos >= size:
            images.open_files.give_back(entry)
            self._done(close)
            return
        self._busy = True
        images.stats.fast_waited += 1
        self._task = asyncio.ensure_future(self._send_rest(transport, name, entry, pos, size, close))

    def _cork(self, on: bool) -> None:
        """TCP_CORK while a head and the start of its body go out, so the head leaves in one
        segment with the body (as nginx's tcp_nopush does), not as a small packet of its own that
        costs the client a wake-up."""
        if self._sock is not None:
            with contextlib.suppress(OSError):  # the connection is gone: the transport finds out
                self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, int(on))

    def _send_now(self, transport: asyncio.Transport, name: tuple[str, str], entry: _OpenFile,
                  size: int) -> int | None:
        """What the socket takes now of the file, by sendfile(2): how far it got; None where the
        response could not go on (and the connection is dropped)."""
        if transport.get_write_buffer_size():
            return 0  # the head is still queued: the loop sends the body after it
        pos = 0
        try:
            while pos < size:
                sent = os.sendfile(self._out, entry.fd, pos, size - pos)
                if sent == 0:  # the file ended early: it was cut short
                    self._changed(transport, name)
                    return None
                pos += sent
        except BlockingIOError:
            pass  # the client's buffers are full: the loop sends the rest as it drains
        except OSError as exc:
            if isinstance(exc, ConnectionError) or exc.errno not in _NO_SENDFILE:
                transport.abort()
                return None
            self._images.sendfile_ok = False  # from now on every request is aiohttp's
            transport.write(os.pread(entry.fd, size - pos, pos))  # a small file: this once
            return size
        return pos

    async def _send_rest(self, transport: asyncio.Transport, name: tuple[str, str],
                         entry: _OpenFile, pos: int, size: int, close: bool) -> None:
        """The rest of the body through the loop's sendfile, which waits while the client's
        buffers are full, under the stall timeout; then the next request."""
        images = self._images
        ok = False
        try:
            if _sig(os.fstat(entry.fd)) != entry.sig:  # checked before the piece that completes it
                self._changed(transport, name)
                return
            with _unbuffered(entry.fd) as f:
                async with asyncio.timeout(images.stall_timeout_s):
                    await asyncio.get_running_loop().sendfile(transport, f, pos, size - pos,
                                                              fallback=False)
            ok = True
        except asyncio.SendfileNotAvailableError:  # not this loop's transport after all
            transport.write(os.pread(entry.fd, size - pos, pos))  # a small file: this once
            ok = True
        except TimeoutError:
            log.info("dropped a client that took nothing for %gs: %s", images.stall_timeout_s,
                     transport.get_extra_info("peername"))
            transport.abort()
        except (ConnectionError, RuntimeError, OSError):  # the client went away
            transport.abort()
        finally:
            images.open_files.give_back(entry)
            self._busy = False
        if ok:
            self._done(close)
            self._serve()

    def _changed(self, transport: asyncio.Transport, name: tuple[str, str]) -> None:
        self._images.verifier.forget(*name)
        log.warning("stored image %s.%s changed while being served; response dropped", *name)
        transport.abort()

    def _done(self, close: bool) -> None:
        self._last = asyncio.get_running_loop().time()
        if (close or self._closing) and self._transport is not None:
            self._transport.close()
            self._closing = True

    def _log(self, ask: _Ask, status: bytes, body: int) -> None:
        """The line aiohttp's access logger writes, in its default format."""
        assert self._transport is not None
        peer = self._transport.get_extra_info("peername")
        when = time.strftime("[%d/%b/%Y:%H:%M:%S %z]")
        access_logger.info('%s %s "%s" %s %d "%s" "%s"', peer[0] if peer else "-", when,
                           ask.line.decode(), status[:3].decode(), body,
                           ask.referer.decode(), ask.agent.decode())


class ImageSite(web.TCPSite):
    """aiohttp's TCP site for an app made by storage.server.make_image_app (or one holding it),
    with the fast path above; for any other app, or a loop without selector transports, TLS or
    sendfile turned off, exactly aiohttp's site."""

    def __init__(self, runner: web.AppRunner, host: str | None = None, port: int | None = None,
                 *, access_log: bool = True, keepalive_timeout: float = KEEPALIVE_TIMEOUT_S,
                 **kwargs: Any):
        super().__init__(runner, host, port, **kwargs)
        self.access_log, self.keepalive_timeout = access_log, keepalive_timeout
        self.connections: set[_Connection] = set()
        self.date = _Date()
        self.images: _ImageApp = None  # type: ignore[assignment]  # set in start
        self.aiohttp_protocol: Any = None

    def _fast(self) -> bool:
        """Whether the fast path can stand in for aiohttp here: not where the app has middleware
        or response hooks, which every response must pass through."""
        app = getattr(self._runner, "app", None)
        images = app.get(IMAGE_APP) if app is not None else None
        loop = asyncio.get_running_loop()
        if (images is None or not images.sendfile_ok or self._ssl_context is not None
                or app.middlewares or app.on_response_prepare
                or not isinstance(loop, asyncio.selector_events.BaseSelectorEventLoop)):
            return False
        self.images = images
        return True

    async def start(self) -> None:
        if not self._fast():
            await super().start()
            return
        await web.BaseSite.start(self)  # registers the site with its runner
        self.aiohttp_protocol = self._runner.server
        assert self.aiohttp_protocol is not None
        self._server = await asyncio.get_running_loop().create_server(
            lambda: _Connection(self), self._host, self._port, backlog=self._backlog,
            reuse_address=self._reuse_address, reuse_port=self._reuse_port)
        sockets = self._server.sockets
        self._bound_port = sockets[0].getsockname()[1] if sockets else self._port

    async def stop(self) -> None:
        """No new connections; idle ones closed; responses under way finished (each within the
        stall timeout, as aiohttp lets its own finish). aiohttp's connections close as aiohttp
        closes them."""
        await super().stop()
        sending = [t for t in (conn.close() for conn in list(self.connections)) if t is not None]
        if sending:
            await asyncio.wait(sending, timeout=self.images.stall_timeout_s)
