"""The image site's fast path (storage.image_site) against real sockets: it answers exactly what
aiohttp would answer for the requests it takes, byte for byte but for the Date; it hands every
other connection to aiohttp with what was read so far; and it keeps the server's guarantees
(intact bytes, no stale file, a stalled client dropped, files closed, idle connections and
shutdown closed)."""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import pytest
from aiohttp import web

from storage.blobs import LocalBlobStore
from storage.image_site import ImageSite, _parse
from storage.server import DAMAGED, IMAGE_STATS, ImageServerStats, make_image_app
from tests.test_image_server import MIB, until, url, write_big_blob, write_blob


@dataclass
class Served:
    port: int
    stats: ImageServerStats
    site: ImageSite
    runner: web.AppRunner


async def _page(request: web.Request) -> web.Response:
    return web.Response(text="a page")


@contextlib.asynccontextmanager
async def listening(app: web.Application, *, access_log: bool = False, cleanup: bool = True,
                    keepalive_timeout: float | None = None) -> AsyncIterator[tuple[ImageSite, web.AppRunner]]:
    """`app` listening through ImageSite on a free port, as bot.http.start_http has it."""
    runner = web.AppRunner(app, **({} if access_log else {"access_log": None}))
    await runner.setup()
    extra = {} if keepalive_timeout is None else {"keepalive_timeout": keepalive_timeout}
    s = ImageSite(runner, "127.0.0.1", 0, access_log=access_log, **extra)
    await s.start()
    try:
        yield s, runner
    finally:
        if cleanup:
            await runner.cleanup()


@contextlib.asynccontextmanager
async def site(store: LocalBlobStore, *, access_log: bool = False, cleanup: bool = True,
               keepalive_timeout: float | None = None, **app_kwargs) -> AsyncIterator[Served]:
    """make_image_app (plus /page, standing in for the gallery) listening through ImageSite."""
    app = make_image_app(store, **app_kwargs)
    app.router.add_get("/page", _page)
    async with listening(app, access_log=access_log, cleanup=cleanup,
                         keepalive_timeout=keepalive_timeout) as (s, runner):
        yield Served(s.port, app[IMAGE_STATS], s, runner)


def request(path: str, *fields: str, method: str = "GET", version: str = "1.1") -> bytes:
    return "\r\n".join([f"{method} {path} HTTP/{version}", "Host: 127.0.0.1", *fields, "", ""]).encode()


class Conn:
    """One raw keep-alive connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer

    async def send(self, raw: bytes) -> None:
        self.writer.write(raw)
        await self.writer.drain()

    async def response(self, head: bool = False) -> tuple[int, list[tuple[str, str]], bytes]:
        block = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 10)
        while block.startswith(b"HTTP/1.1 1"):  # an interim response (100 Continue): skipped
            block = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 10)
        lines = block[:-4].decode("latin-1").split("\r\n")
        fields = [(k, v.strip()) for k, v in (line.split(":", 1) for line in lines[1:])]
        length = next((int(v) for k, v in fields if k.lower() == "content-length"), 0)
        status = int(lines[0].split()[1])
        body = b"" if head or status == 304 else await asyncio.wait_for(self.reader.readexactly(length), 10)
        return status, fields, body

    async def ask(self, raw: bytes, head: bool = False) -> tuple[int, list[tuple[str, str]], bytes]:
        await self.send(raw)
        return await self.response(head)

    async def closed(self) -> bool:
        """Whether the server closes the connection (within 5 s)."""
        try:
            return await asyncio.wait_for(self.reader.read(), 5) == b""
        except ConnectionError:
            return True


@contextlib.asynccontextmanager
async def connect(port: int) -> AsyncIterator[Conn]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        yield Conn(reader, writer)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


@contextlib.asynccontextmanager
async def aiohttp_connection(port: int) -> AsyncIterator[Conn]:
    """A connection handed to aiohttp: its first request is one the fast path never takes."""
    async with connect(port) as conn:
        assert (await conn.ask(request("/healthz")))[0] == 200
        yield conn


async def opened(port: int, *keys: str) -> None:
    """Each image asked for once on a connection of its own: aiohttp opens and verifies it, and
    the fast path can answer it from then on."""
    for key in keys:
        async with connect(port) as conn:
            assert (await conn.ask(request(url(key))))[0] == 200


def without_date(fields: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(k, v) for k, v in fields if k != "Date"]


@pytest.fixture
def blob(store) -> tuple[str, bytes]:
    data = os.urandom(600_000)
    return write_blob(store, data), data


# ---- the same answers as aiohttp's -----------------------------------------------------------

VARIANTS = {
    "GET": ((), "GET"),
    "HEAD": ((), "HEAD"),
    "our tag": (('If-None-Match: "{key}"',), "GET"),
    "weak tag among others": (('If-None-Match: "other", W/"{key}"',), "GET"),
    "any tag": (("If-None-Match: *",), "GET"),
    "another tag": (('If-None-Match: "not-it"',), "GET"),
    "HEAD with our tag": (('If-None-Match: "{key}"',), "HEAD"),
    "browser fields": (("User-Agent: Mozilla/5.0 (X11; Linux x86_64)", "Accept: image/avif,image/webp,*/*",
                        "Accept-Encoding: gzip, deflate, br", "Referer: http://127.0.0.1/i/x",
                        "If-Modified-Since: Wed, 21 Oct 2015 07:28:00 GMT", "Cache-Control: no-cache",
                        "Connection: keep-alive", "Content-Length: 0"), "GET"),
    "close": (("Connection: close",), "GET"),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
async def test_the_fast_path_answers_as_aiohttp_does(store, blob, variant):
    key, data = blob
    fields, method = VARIANTS[variant]
    raw = request(url(key), *(f.format(key=key) for f in fields), method=method)
    head = method == "HEAD"
    async with site(store) as served:
        async with connect(served.port) as first:  # the first request opens and verifies the file
            assert (await first.ask(request(url(key))))[2] == data
        assert (served.stats.fast, served.stats.opened) == (0, 1)
        async with aiohttp_connection(served.port) as conn:
            by_aiohttp = await conn.ask(raw, head)
        assert served.stats.fast == 0
        async with connect(served.port) as conn:
            fast = await conn.ask(raw, head)
            for c in served.site.connections:  # the head went out corked, and nothing stays corked
                assert c._sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CORK) == 0
            if variant == "close":
                assert await conn.closed()
            else:  # and the connection stays open for the next request
                assert (await conn.ask(request(url(key))))[2] == data
        assert served.stats.fast == 2 - (variant == "close")
        assert served.stats.opened == 1  # both from the open, verified file
    assert fast[0] == by_aiohttp[0] and fast[2] == by_aiohttp[2]
    assert without_date(fast[1]) == without_date(by_aiohttp[1])  # same fields, same order
    assert re.fullmatch(r"\w{3}, \d\d \w{3} \d{4} \d\d:\d\d:\d\d GMT", dict(fast[1])["Date"])
    expected = 304 if "tag" in variant and "another" not in variant else 200
    assert fast[0] == expected
    if expected == 200 and not head:
        assert hashlib.sha256(fast[2]).hexdigest() == key


async def test_real_clients_get_every_byte_over_many_connections(store, blob):
    key, data = blob
    async with site(store) as served:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{served.port}{url(key)}") as resp:
                assert await resp.read() == data

        async def client() -> list[bytes]:
            async with aiohttp.ClientSession() as session:  # its own keep-alive connection
                got = []
                for _ in range(10):
                    async with session.get(f"http://127.0.0.1:{served.port}{url(key)}") as resp:
                        assert resp.status == 200 and resp.headers["ETag"] == f'"{key}"'
                        got.append(await resp.read())
                return got

        bodies = [b for got in await asyncio.gather(*(client() for _ in range(30))) for b in got]
        assert len(bodies) == 300 and all(b == data for b in bodies)
        assert served.stats.fast == 300 and served.stats.opened == 1


# ---- what it leaves to aiohttp ---------------------------------------------------------------

LEFT_TO_AIOHTTP = {
    "range": (request("/images/{key}.png", "Range: bytes=0-9"), 206),
    "if-range": (request("/images/{key}.png", 'If-Range: "{key}"', "Range: bytes=0-9"), 206),
    "HTTP/1.0": (request("/images/{key}.png", version="1.0"), 200),
    "a query": (request("/images/{key}.png?size=small"), 200),
    "escaped": (request("/images/{escaped}.png"), 200),
    "POST": (request("/images/{key}.png", "Content-Length: 2", method="POST") + b"hi", 405),
    "chunked body": (request("/images/{key}.png", "Transfer-Encoding: chunked") + b"0\r\n\r\n", 200),
    "expect": (request("/images/{key}.png", "Expect: 100-continue", "Content-Length: 0"), 200),
    "upgrade": (request("/images/{key}.png", "Connection: upgrade", "Upgrade: websocket"), 200),
    "folded field": (request("/images/{key}.png", "X-A: one", " two"), 400),
    "non-ascii field": (request("/images/{key}.png").replace(b"Host: 127.0.0.1", b"Host: caf\xc3\xa9"), 200),
    "two tag fields": (request("/images/{key}.png", 'If-None-Match: "x"', 'If-None-Match: "{key}"'), 200),
    "unknown key": (request("/images/" + "0" * 64 + ".png"), 404),
    "unknown type": (request("/images/{key}.gif"), 404),
    "upper-case key": (request("/images/{upper}.png"), 404),
    "not HTTP": (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\0" * 64 + b"\r\n\r\n", 400),
    "no colon": (request("/images/{key}.png", "no colon here"), 400),
    "a field longer than aiohttp takes": (request("/images/{key}.png", "Cookie: " + "c" * 9000), 400),
    "200 fields": (request("/images/{key}.png", *[f"X-{i}: v" for i in range(200)]), 400),
    "a long head, each line short": (request("/images/{key}.png", *[f"X-{i}: {'v' * 90}" for i in range(100)]), 200),
}


@pytest.mark.parametrize("case", list(LEFT_TO_AIOHTTP))
async def test_anything_else_is_handed_to_aiohttp_with_what_was_read(store, blob, case):
    key, data = blob
    raw, status = LEFT_TO_AIOHTTP[case]
    escaped = f"%{ord(key[0]):02x}{key[1:]}"
    raw = raw.replace(b"{key}", key.encode()).replace(b"{escaped}", escaped.encode())
    raw = raw.replace(b"{upper}", key.upper().encode())
    async with site(store) as served:
        await opened(served.port, key)
        async with connect(served.port) as conn:
            got = await conn.ask(raw)
        assert got[0] == status, got
        assert served.stats.fast == 0
        if status == 200:
            assert got[2] == data


async def test_pipelined_requests_are_answered_in_order_across_the_hand_off(store, blob):
    key, data = blob
    small = write_blob(store, b"a small image")
    async with site(store) as served:
        await opened(served.port, key, small)
        async with connect(served.port) as conn:
            await conn.send(request(url(key)) + request(url(small), "If-None-Match: *") + request(url(small))
                            + request("/page") + request(url(key)))
            answers = [await conn.response() for _ in range(5)]
            assert [a[0] for a in answers] == [200, 304, 200, 200, 200]
            assert [a[2] for a in answers] == [data, b"", b"a small image", b"a page", data]
        assert served.stats.fast == 3  # then /page: aiohttp's for the rest of the connection


async def test_a_request_arriving_a_byte_at_a_time_is_answered(store, blob):
    key, data = blob
    async with site(store) as served:
        await opened(served.port, key)
        async with connect(served.port) as conn:
            for byte in request(url(key)):
                await conn.send(bytes([byte]))
                await asyncio.sleep(0.001)
            assert (await conn.response())[2] == data
        assert served.stats.fast == 1


async def test_a_request_then_a_half_close_is_answered_then_closed(store, blob):
    key, data = blob
    async with site(store) as served:
        await opened(served.port, key)
        async with connect(served.port) as conn:
            await conn.send(request(url(key)))
            conn.writer.write_eof()
            status, _, body = await conn.response()
            assert (status, body) == (200, data)
            assert await conn.closed()
        assert served.stats.fast == 1


# ---- the server's guarantees -----------------------------------------------------------------

async def test_a_replaced_or_damaged_file_is_never_served_from_the_open_one(store, blob, caplog):
    key, data = blob
    async with site(store) as served:
        async with connect(served.port) as conn:
            assert (await conn.ask(request(url(key))))[2] == data
            path = store.path_for(key, "png")
            tmp = path.with_suffix(".new")
            tmp.write_bytes(os.urandom(len(data)))  # same size, other bytes
            os.replace(tmp, path)
            status, _, body = await conn.ask(request(url(key)))  # the same connection
        assert (status, body) == (500, DAMAGED.encode())
        assert served.stats.fast == 0 and served.stats.damaged == 1
        async with connect(served.port) as conn:
            assert (await conn.ask(request(url(key))))[0] == 500
        path.write_bytes(data)  # restored: verified again, then fast again
        for _ in range(2):
            async with connect(served.port) as conn:
                assert (await conn.ask(request(url(key))))[2] == data
        assert served.stats.fast == 1


async def test_a_large_file_is_left_to_aiohttp_and_its_slots(store):
    key = write_big_blob(store.root, 3 * MIB)
    async with site(store, small_file_bytes=MIB) as served:
        for _ in range(2):
            async with connect(served.port) as conn:
                status, _, body = await conn.ask(request(url(key)))
                assert status == 200 and hashlib.sha256(body).hexdigest() == key
        assert served.stats.fast == 0 and served.stats.peak_streaming == 1


def _small_window(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    return sock


async def test_a_slow_reader_gets_the_whole_body_and_others_are_served_meanwhile(store, blob):
    big = write_big_blob(store.root, 16 * MIB)
    key, data = blob
    async with site(store, small_file_bytes=32 * MIB) as served:
        await opened(served.port, big, key)
        reader, writer = await asyncio.open_connection(sock=_small_window(served.port), limit=MIB)
        slow = Conn(reader, writer)
        await slow.send(request(url(big)) + request(url(key)))
        await until(lambda: served.stats.fast_waited == 1)  # the socket is full: the loop waits on it
        await asyncio.sleep(0.3)
        async with connect(served.port) as conn:  # not blocked meanwhile
            assert (await conn.ask(request(url(key))))[2] == data
        status, _, body = await slow.response()
        assert status == 200 and hashlib.sha256(body).hexdigest() == big
        assert (await slow.response())[2] == data  # the pipelined one, after it
        writer.close()
        assert served.stats.fast == 3


async def test_a_stalled_reader_is_dropped_and_every_file_is_closed(store, caplog):
    before = len(os.listdir("/proc/self/fd"))
    big = write_big_blob(store.root, 16 * MIB)
    async with site(store, small_file_bytes=32 * MIB, stall_timeout_s=0.5) as served:
        await opened(served.port, big)
        reader, writer = await asyncio.open_connection(sock=_small_window(served.port))
        with caplog.at_level(logging.INFO, logger="storage.image_site"):
            writer.write(request(url(big)))
            await until(lambda: served.stats.fast_waited == 1)
            await until(lambda: any("took nothing" in r.getMessage() for r in caplog.records))
        got = 0
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            while chunk := await asyncio.wait_for(reader.read(MIB), 5):
                got += len(chunk)
            raise asyncio.IncompleteReadError(b"", None)  # an EOF before the whole body
        assert got < 16 * MIB
        writer.close()
    assert len(os.listdir("/proc/self/fd")) == before  # the open files closed, the fast one too


async def test_idle_connections_are_closed_after_the_keepalive_timeout(store, blob):
    key, data = blob
    async with site(store, keepalive_timeout=0.3) as served:
        await opened(served.port, key)
        async with connect(served.port) as conn:
            assert (await conn.ask(request(url(key))))[2] == data
            assert await conn.closed()
        assert served.stats.fast == 1


async def test_shutting_down_closes_idle_connections_and_lets_a_response_finish(store, blob):
    big = write_big_blob(store.root, 16 * MIB)
    key, _ = blob
    async with site(store, small_file_bytes=32 * MIB, cleanup=False) as served:
        await opened(served.port, big, key)
        async with connect(served.port) as idle:
            await idle.ask(request(url(key)))
            reader, writer = await asyncio.open_connection(sock=_small_window(served.port), limit=MIB)
            busy = Conn(reader, writer)
            await busy.send(request(url(big)))
            await until(lambda: served.stats.fast_waited == 1)
            stopping = asyncio.create_task(served.runner.cleanup())
            assert await idle.closed()
            assert not stopping.done()  # it waits for the response under way
            status, _, body = await busy.response()
            assert status == 200 and hashlib.sha256(body).hexdigest() == big
            assert await busy.closed()
            await asyncio.wait_for(stopping, 10)
            writer.close()


async def test_the_fast_path_writes_the_access_log_aiohttp_writes(store, blob, caplog):
    key, _ = blob
    raw = request(url(key), "User-Agent: curl/8.0", "Referer: http://x/i/1")
    async with site(store, access_log=True) as served:
        with caplog.at_level(logging.INFO, logger="aiohttp.access"):
            async with connect(served.port) as conn:
                await conn.ask(raw)
            async with aiohttp_connection(served.port) as conn:
                await conn.ask(raw)
            async with connect(served.port) as conn:
                await conn.ask(raw)
                await conn.ask(request(url(key), "If-None-Match: *"))
        assert served.stats.fast == 2
    lines = [r.getMessage() for r in caplog.records if r.name == "aiohttp.access"]
    shape = (r'127\.0\.0\.1 \[\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d [+-]\d{4}\] "GET /images/' + key
             + r'\.png HTTP/1\.1" (\d{3}) (\d+) "([^"]*)" "([^"]*)"')
    found = [re.fullmatch(shape, line) for line in lines if "/healthz" not in line]
    assert all(found) and len(found) == 4, lines
    by_aiohttp, fast, not_modified = found[1], found[2], found[3]
    assert fast.groups() == by_aiohttp.groups()  # the head's size too: the same fields
    assert (fast[1], fast[3], fast[4]) == ("200", "http://x/i/1", "curl/8.0")
    assert 600_000 + 200 < int(fast[2]) < 600_000 + 400  # the body and its head
    assert not_modified.groups()[0::2] == ("304", "-") and 200 < int(not_modified[2]) < 400


async def test_without_sendfile_the_site_is_plain_aiohttp(store, blob):
    key, data = blob
    async with site(store, sendfile=False) as served:
        for _ in range(2):
            async with connect(served.port) as conn:
                assert (await conn.ask(request(url(key))))[2] == data
        assert served.stats.fast == 0


@web.middleware
async def _closed_after_opening(request: web.Request, handler):
    """Lets the first request through (it opens the file), then refuses every one."""
    if request.app[IMAGE_STATS].opened:
        raise web.HTTPForbidden()
    return await handler(request)


async def _hook(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["X-Hook"] = "1"


@pytest.mark.parametrize("extra", ["middleware", "response hook"])
async def test_an_app_with_middleware_or_response_hooks_is_plain_aiohttp(store, blob, extra):
    key, data = blob
    app = make_image_app(store)
    if extra == "middleware":
        app.middlewares.append(_closed_after_opening)
    else:
        app.on_response_prepare.append(_hook)
    async with listening(app) as (s, _):
        await opened(s.port, key)
        async with connect(s.port) as conn:
            status, fields, body = await conn.ask(request(url(key)))
        if extra == "middleware":
            assert status == 403
        else:
            assert (status, body) == (200, data) and ("X-Hook", "1") in fields
        assert app[IMAGE_STATS].fast == 0


async def test_an_app_without_images_is_served_by_a_plain_site():
    app = web.Application()
    app.router.add_get("/page", _page)
    async with listening(app) as (s, _):
        async with connect(s.port) as conn:
            assert (await conn.ask(request("/page")))[2] == b"a page"
        assert not s.connections


# ---- the parser's choices --------------------------------------------------------------------

KEY = "ab" * 32


@pytest.mark.parametrize("block, taken", [
    (f"GET /images/{KEY}.png HTTP/1.1", True),
    (f"HEAD /images/{KEY}.webp HTTP/1.1\r\nHost: x", True),
    (f"GET /images/{KEY}.png HTTP/1.1\r\nHost:x\r\nX-Empty:", True),
    (f"GET /images/{KEY}.png HTTP/1.1\r\nContent-Length: 0", True),
    (f"GET /images/{KEY}.png HTTP/1.1\r\nContent-Length: 00", False),
    (f"GET /images/{KEY}.png HTTP/1.1\r\nContent-Length: 0\r\nContent-Length: 0", False),
    (f"GET /images/{KEY}.png HTTP/1.1\r\nIf-None-Match: {KEY}", False),  # unquoted: aiohttp decides
    (f"GET /images/{KEY}.png HTTP/1.1\r\nIf-Unmodified-Since: x", False),
    (f"GET /images/{KEY}.png HTTP/1.1\r\nX: a\rb", False),
    (f"GET /images/{KEY}.png HTTP/1.1\r\nX: a\nb", False),
    (f"GET /images/{KEY}.png HTTP/1.1\r\nX : a", False),
    (f"GET  /images/{KEY}.png HTTP/1.1", False),
    (f"get /images/{KEY}.png HTTP/1.1", False),
    (f"GET /images/{KEY}.png HTTP/1.1 ", False),
    (f"GET /images/{KEY}.jpeg HTTP/1.1", False),
    (f"GET /images/{KEY[:-1]}.png HTTP/1.1", False),
    (f"GET /images/{KEY}.png/ HTTP/1.1", False),
    (f"OPTIONS /images/{KEY}.png HTTP/1.1", False),
    (f"GET /images/{KEY}.png HTTP/1.1" + "".join(f"\r\nX-{i}: v" for i in range(100)), True),
    (f"GET /images/{KEY}.png HTTP/1.1" + "".join(f"\r\nX-{i}: v" for i in range(101)), False),
])
def test_the_parser_takes_only_plain_requests(block, taken):
    ask = _parse(block.encode())
    assert (ask is not None) == taken
    if taken:
        assert ask.key == KEY.encode()
