"""The image server against real sockets: streaming, conditional and range requests, the bound
on concurrent streams, integrity checks, quiet handling of garbage, and memory under slow clients.

The helpers at the top (a blob writer, a server in its own process, slow and fast clients, RSS
readers) are shared with bench/image_server.py."""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import test_utils, web

import storage.server as server_mod
from storage.blobs import LocalBlobStore
from storage.server import DAMAGED, IMAGE_STATS, make_image_app
from tests.helpers import free_port

REPO = Path(__file__).resolve().parent.parent
MIB = 1 << 20

# ---- helpers (also used by bench/image_server.py) -----------------------------------------


def write_blob(store: LocalBlobStore, data: bytes, ext: str = "png") -> str:
    """Store `data` under its sha256 like LocalBlobStore.put, without the fsync (test data)."""
    key = hashlib.sha256(data).hexdigest()
    path = store.path_for(key, ext)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return key


def write_big_blob(root: Path, size: int, ext: str = "png") -> str:
    """A file of `size` random bytes stored under its real sha256 in the LocalBlobStore layout,
    written 1 MiB at a time; returns the key."""
    digest = hashlib.sha256()
    tmp = root / ".incoming-big"
    root.mkdir(parents=True, exist_ok=True)
    with open(tmp, "wb") as f:
        left = size
        while left:
            piece = os.urandom(min(MIB, left))
            digest.update(piece)
            f.write(piece)
            left -= len(piece)
    key = digest.hexdigest()
    path = LocalBlobStore(root, "http://unused").path_for(key, ext)
    path.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, path)
    return key


_SERVER = """
import sys
from aiohttp import web
from storage.blobs import LocalBlobStore
from storage.server import make_image_app
root, port = sys.argv[1], int(sys.argv[2])
app = make_image_app(LocalBlobStore(root, f"http://127.0.0.1:{port}"))
web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)
"""


@contextlib.contextmanager
def server_process(root: Path, timeout_s: float = 20.0) -> Iterator[tuple[subprocess.Popen, int]]:
    """`make_image_app` over `root`, served by web.run_app in a child process; yields it and its
    port once /healthz answers."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", _SERVER, str(root), str(port)], cwd=REPO, env=env)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the image server exited with {proc.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                    s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    if s.recv(64).startswith(b"HTTP/1.1 200"):
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the image server did not come up")
            time.sleep(0.05)
        yield proc, port
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def proc_status_kib(pid: int, field: str) -> int:
    """A figure from /proc/<pid>/status in KiB: VmRSS (now) or VmHWM (peak)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


async def slow_client(port: int, path: str, deadline: float, *, read_bytes: int = 4096,
                      interval_s: float = 0.05) -> tuple[bytes, int]:
    """GET `path` over a raw socket with a small receive buffer, reading `read_bytes` every
    `interval_s` until `deadline` (loop time); returns the status line and the bytes received."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    sock.setblocking(False)
    status, received = b"", 0
    try:
        await loop.sock_connect(sock, ("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(sock=sock, limit=64 * 1024)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        try:
            async with asyncio.timeout_at(deadline):
                while True:
                    data = await reader.read(read_bytes)
                    if not data:
                        break
                    if not status:
                        status = data.split(b"\r\n", 1)[0]
                    received += len(data)
                    await asyncio.sleep(interval_s)
        except TimeoutError:
            pass
        writer.close()
    finally:
        sock.close()
    return status, received


async def slow_load(pid: int, port: int, path: str, *, clients: int = 100, seconds: float = 4.0,
                    sample_s: float = 0.02) -> tuple[list[tuple[bytes, int]], int]:
    """`clients` slow clients of `path` for `seconds`, sampling the server's RSS meanwhile;
    returns what each client got and the peak RSS seen (KiB)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    peak = 0
    done = asyncio.Event()

    async def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, proc_status_kib(pid, "VmRSS"))
            await asyncio.sleep(sample_s)

    sampler = asyncio.create_task(sample())
    try:
        results = await asyncio.gather(*(slow_client(port, path, deadline) for _ in range(clients)))
    finally:
        done.set()
        await sampler
    return results, max(peak, proc_status_kib(pid, "VmRSS"))


async def fast_load(port: int, path: str, *, clients: int = 20) -> tuple[int, float]:
    """`clients` downloads of `path` at full speed at once; returns total bytes and seconds."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients)) as session:
        async def one() -> int:
            got = 0
            async with session.get(f"http://127.0.0.1:{port}{path}") as resp:
                assert resp.status == 200, resp.status
                async for chunk in resp.content.iter_chunked(MIB):
                    got += len(chunk)
            return got

        start = time.perf_counter()
        sizes = await asyncio.gather(*(one() for _ in range(clients)))
        return sum(sizes), time.perf_counter() - start


# ---- in-process server fixtures ------------------------------------------------------------

@contextlib.asynccontextmanager
async def serving(app: web.Application) -> AsyncIterator[test_utils.TestClient]:
    async with test_utils.TestClient(test_utils.TestServer(app, host="127.0.0.1")) as client:
        yield client


async def until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.005)


@pytest.fixture
def blob(store) -> tuple[str, bytes]:
    """A 700 KB image: several chunks at chunk_bytes=64 KiB."""
    data = os.urandom(700_000)
    return write_blob(store, data), data


def url(key: str, ext: str = "png") -> str:
    return f"/images/{key}.{ext}"


# ---- plain, conditional and range requests -------------------------------------------------

async def test_get_streams_the_whole_file_with_content_key_headers(store, blob):
    key, data = blob
    async with serving(make_image_app(store, chunk_bytes=64 * 1024)) as client:
        resp = await client.get(url(key))
        assert resp.status == 200
        assert await resp.read() == data
        assert resp.headers["ETag"] == f'"{key}"'
        assert resp.headers["Cache-Control"] == "public, max-age=31536000, immutable"
        assert resp.headers["Content-Type"] == "image/png"
        assert resp.headers["Content-Length"] == str(len(data))
        assert resp.headers["Accept-Ranges"] == "bytes"
        assert "Transfer-Encoding" not in resp.headers

        jpg = write_blob(store, b"\xff\xd8 not really a jpeg", "jpg")
        resp = await client.get(url(jpg, "jpg"))
        assert resp.headers["Content-Type"] == "image/jpeg"
        assert await resp.read() == b"\xff\xd8 not really a jpeg"


async def test_if_none_match_answers_304(store, blob):
    key, _ = blob
    async with serving(make_image_app(store)) as client:
        for tags in (f'"{key}"', "*", f'W/"{key}"', f'"a", "{key}"'):
            resp = await client.get(url(key), headers={"If-None-Match": tags})
            assert resp.status == 304, tags
            assert resp.headers["ETag"] == f'"{key}"'
            assert await resp.read() == b""
        resp = await client.get(url(key), headers={"If-None-Match": '"something else"'})
        assert resp.status == 200


@pytest.mark.parametrize("header, span", [
    ("bytes=0-99", (0, 100)),
    ("bytes=100-", (100, 700_000)),
    ("bytes=-50", (700_000 - 50, 700_000)),
    ("bytes=699999-699999", (699_999, 700_000)),
    ("bytes=10-99999999", (10, 700_000)),  # the end is clamped
    ("bytes=-99999999", (0, 700_000)),  # a suffix longer than the file: all of it
    ("BYTES = 5 - 9", (5, 10)),
])
async def test_a_single_range_answers_206(store, blob, header, span):
    key, data = blob
    async with serving(make_image_app(store, chunk_bytes=64 * 1024)) as client:
        resp = await client.get(url(key), headers={"Range": header})
        assert resp.status == 206
        start, stop = span
        assert await resp.read() == data[start:stop]
        assert resp.headers["Content-Range"] == f"bytes {start}-{stop - 1}/{len(data)}"
        assert resp.headers["Content-Length"] == str(stop - start)
        assert resp.headers["ETag"] == f'"{key}"'


@pytest.mark.parametrize("header", ["bytes=700000-", "bytes=800000-900000", "bytes=-0", "bytes=9-5"])
async def test_an_unsatisfiable_range_answers_416(store, blob, header):
    key, _ = blob
    async with serving(make_image_app(store)) as client:
        resp = await client.get(url(key), headers={"Range": header})
        assert resp.status == 416
        assert resp.headers["Content-Range"] == "bytes */700000"


@pytest.mark.parametrize("header", ["bytes=0-1,5-9", "bytes=-", "bytes=a-b", "items=0-9", "0-9"])
async def test_several_or_malformed_ranges_get_the_whole_file(store, blob, header):
    key, data = blob
    async with serving(make_image_app(store)) as client:
        resp = await client.get(url(key), headers={"Range": header})
        assert resp.status == 200
        assert await resp.read() == data


async def test_if_range_with_our_etag_is_honoured_and_anything_else_sends_it_whole(store, blob):
    key, data = blob
    async with serving(make_image_app(store)) as client:
        resp = await client.get(url(key), headers={"Range": "bytes=0-9", "If-Range": f'"{key}"'})
        assert resp.status == 206
        assert await resp.read() == data[:10]
        for validator in ('"another"', f'W/"{key}"', "Wed, 21 Oct 2015 07:28:00 GMT"):
            resp = await client.get(url(key), headers={"Range": "bytes=0-9", "If-Range": validator})
            assert resp.status == 200, validator
            assert await resp.read() == data


async def test_head_answers_headers_without_a_body(store, blob):
    key, data = blob
    async with serving(make_image_app(store)) as client:
        resp = await client.head(url(key))
        assert resp.status == 200
        assert resp.headers["Content-Length"] == str(len(data))
        assert resp.headers["ETag"] == f'"{key}"'
        assert resp.headers["Content-Type"] == "image/png"
        assert await resp.read() == b""
        resp = await client.head(url(key), headers={"Range": "bytes=-10"})
        assert resp.status == 206
        assert resp.headers["Content-Range"] == f"bytes {len(data) - 10}-{len(data) - 1}/{len(data)}"
        resp = await client.head(url("0" * 64))
        assert resp.status == 404


# ---- missing and damaged files -------------------------------------------------------------

async def test_missing_files_are_404(store, blob, monkeypatch):
    key, _ = blob
    path = store.path_for(key)
    async with serving(make_image_app(store)) as client:
        assert (await client.get(url(key))).status == 200
        path.unlink()
        resp = await client.get(url(key))
        assert resp.status == 404
        assert await resp.text() == "no such image"

        other = write_blob(store, b"another image")
        store.path_for(other).unlink()
        store.path_for(other).mkdir()  # a directory where the file should be
        assert (await client.get(url(other))).status == 404

        # Gone between the stat and the open, or between the open and the hash.
        for step in ("_open", "_hash_file"):
            key2 = write_blob(store, os.urandom(1000) + step.encode())
            real = getattr(server_mod, step)

            def vanish_first(p, *args, real=real):
                Path(p).unlink()
                return real(p, *args)

            monkeypatch.setattr(server_mod, step, vanish_first)
            resp = await client.get(url(key2))
            assert resp.status == 404, step
            monkeypatch.setattr(server_mod, step, real)


async def test_a_damaged_file_is_refused_until_it_is_restored(store, blob, caplog):
    key, data = blob
    path = store.path_for(key)
    app = make_image_app(store)
    stats = app[IMAGE_STATS]
    async with serving(app) as client:
        for _ in range(2):
            resp = await client.get(url(key))
            assert resp.status == 200
            assert await resp.read() == data
        assert stats.hashed == 1  # verified once, not per request

        damaged = bytearray(data)
        damaged[1234] ^= 0xFF
        with caplog.at_level(logging.WARNING, logger="storage.server"):
            path.write_bytes(bytes(damaged))  # same size, new mtime
            for method in ("GET", "GET", "HEAD"):
                resp = await client.request(method, url(key))
                assert resp.status == 500, method
                assert resp.headers.get("ETag") != f'"{key}"'
                assert "immutable" not in resp.headers.get("Cache-Control", "")
                if method == "GET":
                    assert await resp.text() == DAMAGED
            resp = await client.get(url(key), headers={"Range": "bytes=0-9"})
            assert resp.status == 500
        warnings = [r for r in caplog.records if r.name == "storage.server"]
        assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
        assert warnings[0].exc_info is None and "damaged" in warnings[0].getMessage()
        assert stats.hashed == 2 and stats.damaged == 1  # the damaged state is remembered too

        path.write_bytes(data)
        resp = await client.get(url(key))
        assert resp.status == 200
        assert resp.headers["ETag"] == f'"{key}"'
        assert await resp.read() == data

        # Damaged before it was ever served.
        fresh = os.urandom(5000)
        key2 = write_blob(store, fresh)
        store.path_for(key2).write_bytes(fresh[:-1] + b"!")
        assert (await client.get(url(key2))).status == 500


async def test_concurrent_first_requests_share_one_verification(store, blob):
    key, data = blob
    app = make_image_app(store)
    async with serving(app) as client:
        async def get() -> bytes:
            async with client.get(url(key), headers={"If-None-Match": "garbage, W/"}) as resp:
                assert resp.status == 200
                return await resp.read()

        assert await asyncio.gather(*(get() for _ in range(20))) == [data] * 20
        assert app[IMAGE_STATS].hashed == 1


@pytest.mark.parametrize("sendfile", [True, False])
async def test_a_file_changed_while_streaming_breaks_the_response(store, tmp_path, caplog, sendfile):
    key = write_big_blob(store.root, 32 * MIB)
    path = store.path_for(key)
    async with serving(make_image_app(store, sendfile=sendfile)) as client:
        resp = await client.get(url(key))
        assert resp.status == 200
        await resp.content.readexactly(1000)
        with open(path, "r+b") as f:  # in place: same inode, new mtime
            f.seek(10 * MIB)
            f.write(b"tampered")
        with caplog.at_level(logging.WARNING, logger="storage.server"):
            with pytest.raises(aiohttp.ClientPayloadError):
                await resp.read()
            await until(lambda: any("changed while being served" in r.getMessage()
                                    for r in caplog.records))
        assert (await client.get(url(key))).status == 500


# ---- the open-file cache -------------------------------------------------------------------

async def test_a_verified_file_stays_open_until_it_is_replaced_or_removed(store, blob):
    key, data = blob
    path = store.path_for(key)
    app = make_image_app(store)
    stats = app[IMAGE_STATS]
    async with serving(app) as client:
        for _ in range(3):
            assert await (await client.get(url(key))).read() == data
        assert (await client.get(url(key), headers={"If-None-Match": f'"{key}"'})).status == 304
        assert (stats.opened, stats.hashed) == (1, 1)  # opened and hashed once, then served open

        tmp = path.with_suffix(".new")
        tmp.write_bytes(data)
        os.replace(tmp, path)  # the same bytes in a new file: the open one is no longer the path's
        assert await (await client.get(url(key))).read() == data
        assert (stats.opened, stats.hashed) == (2, 2)

        os.link(path, path.with_suffix(".link"))  # a second name: its state changed, check again
        assert await (await client.get(url(key))).read() == data
        assert (stats.opened, stats.hashed) == (3, 3)

        path.unlink()
        path.with_suffix(".link").unlink()
        assert (await client.get(url(key))).status == 404  # though a descriptor was open
        assert (await client.get(url(key), headers={"If-None-Match": f'"{key}"'})).status == 404


async def test_a_file_evicted_from_the_cache_mid_response_is_served_whole(store):
    big = write_big_blob(store.root, 32 * MIB)
    small = [write_blob(store, os.urandom(2000)) for _ in range(3)]
    app = make_image_app(store, open_files=1)
    stats = app[IMAGE_STATS]
    async with serving(app) as client:
        resp = await client.get(url(big))
        first = await resp.content.readexactly(1000)
        for key in small:  # each evicts the one before, the big one first, while it streams
            assert hashlib.sha256(await (await client.get(url(key))).read()).hexdigest() == key
        assert hashlib.sha256(first + await resp.read()).hexdigest() == big
        opened = stats.opened
        assert (await client.get(url(small[-1]))).status == 200  # the one still cached
        assert (await client.get(url(small[0]))).status == 200  # evicted: opened again
        assert stats.opened == opened + 1
    with pytest.raises(ValueError):
        make_image_app(store, open_files=0)


@pytest.mark.parametrize("sendfile", [True, False])
async def test_whole_files_and_ranges_by_sendfile_and_by_streaming(store, sendfile):
    key = write_big_blob(store.root, 3 * MIB + 12345)
    data = store.path_for(key).read_bytes()
    app = make_image_app(store, sendfile=sendfile, chunk_bytes=100_000)
    async with serving(app) as client:
        assert await (await client.get(url(key))).read() == data
        resp = await client.get(url(key), headers={"Range": "bytes=1000000-2500000"})
        assert resp.status == 206 and await resp.read() == data[1_000_000:2_500_001]
        many = await asyncio.gather(*(client.get(url(key)) for _ in range(8)))
        assert [await r.read() for r in many] == [data] * 8
    # The first request opens it twice (to learn its size, then again with a stream slot); the
    # other nine use the open file.
    assert app[IMAGE_STATS].opened == 2


# ---- the bound on concurrent streams -------------------------------------------------------

async def test_at_most_max_streams_large_responses_stream_at_once(store):
    # 32 MiB: far more than the socket buffers take, so a stalled reader keeps its slot.
    key = write_big_blob(store.root, 32 * MIB)
    small = write_blob(store, b"a small image")
    app = make_image_app(store, max_streams=2)
    stats = app[IMAGE_STATS]
    async with serving(app) as client:
        a = await client.get(url(key))
        b = await client.get(url(key))
        head_a = await a.content.readexactly(1000)
        await b.content.readexactly(1000)
        assert stats.streaming == 2

        c_task = asyncio.create_task(client.get(url(key)))
        await until(lambda: stats.waiting == 1)
        await asyncio.sleep(0.2)
        assert not c_task.done()  # no status line yet: it waits for a slot, unlike these
        resp = await client.get(url(small))
        assert await resp.read() == b"a small image"
        assert (await client.head(url(key))).status == 200

        rest_a = await a.read()  # a finishes, which frees a slot for c
        c = await asyncio.wait_for(c_task, 20)
        assert c.status == 200
        digest = hashlib.sha256(head_a + rest_a).hexdigest()
        assert digest == key
        assert hashlib.sha256(await c.read()).hexdigest() == key
        await b.read()
        assert stats.peak_streaming == 2
        await until(lambda: stats.streaming == 0 and stats.waiting == 0)


async def test_a_client_gone_mid_stream_frees_its_slot_quietly(store, caplog):
    key = write_big_blob(store.root, 32 * MIB)
    app = make_image_app(store, max_streams=1)
    stats = app[IMAGE_STATS]
    async with serving(app) as client:
        with caplog.at_level(logging.DEBUG):
            resp = await client.get(url(key))
            await resp.content.readexactly(1000)
            resp.close()  # drops the connection
            await until(lambda: stats.streaming == 0)
            resp = await client.get(url(key))
            assert hashlib.sha256(await resp.read()).hexdigest() == key
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


async def test_a_stalled_reader_is_dropped_and_gives_its_slot_back(store):
    key = write_big_blob(store.root, 32 * MIB)
    app = make_image_app(store, max_streams=1, stall_timeout_s=0.5)
    stats = app[IMAGE_STATS]
    async with serving(app) as client:
        stalled = await client.get(url(key))
        await stalled.content.readexactly(1000)  # and then reads no more
        waiting = asyncio.create_task(client.get(url(key)))
        await until(lambda: stats.waiting == 1)
        resp = await asyncio.wait_for(waiting, 20)  # the slot came back without the stalled one reading
        assert hashlib.sha256(await resp.read()).hexdigest() == key
        with pytest.raises(aiohttp.ClientPayloadError):
            await stalled.read()


# ---- malformed HTTP ------------------------------------------------------------------------

@pytest.mark.parametrize("request_bytes", [
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n",
    b"GET /images/\x00 HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /healthz HTTP/9.Z\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(64),  # TLS to a plain port
    b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nNOT HTTP AT ALL\r\n\r\n",  # garbage after a good one
])
async def test_malformed_http_is_answered_400_without_a_traceback(store, caplog, request_bytes):
    async with serving(make_image_app(store)) as client:
        with caplog.at_level(logging.DEBUG):
            reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
            writer.write(request_bytes)
            answer = await asyncio.wait_for(reader.read(), 10)
            writer.close()
        assert answer.startswith(b"HTTP/1.") and b" 400 Bad Request\r\n" in answer
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
        assert all("\n" not in r.getMessage() for r in caplog.records if r.name == "aiohttp.server")


# ---- memory under 100 slow clients ---------------------------------------------------------

async def test_memory_stays_bounded_under_100_slow_clients_of_a_50mb_image(tmp_path):
    root = tmp_path / "images"
    key = write_big_blob(root, 50 * MIB)
    with server_process(root) as (proc, port):
        rest = proc_status_kib(proc.pid, "VmRSS")
        results, peak = await slow_load(proc.pid, port, url(key), clients=100, seconds=4.0)
        hwm = proc_status_kib(proc.pid, "VmHWM")
    print(f"\nimage server RSS: {rest / 1024:.1f} MB at rest, peak {peak / 1024:.1f} MB sampled"
          f" ({hwm / 1024:.1f} MB high-water) under 100 slow clients of a 50 MB image")
    served = [got for status, got in results if status == b"HTTP/1.1 200 OK"]
    assert len(served) >= 64  # the default bound: at least that many stream at once
    assert all(got > 50_000 for got in served)
    assert hwm < 200 * 1024, f"peak RSS {hwm / 1024:.1f} MB"
