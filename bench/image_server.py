"""The image server's memory and throughput on a 50 MB image, with the server in its own process.

The server is `make_image_app` under web.run_app (defaults: 64 streams at once, 256 KiB chunks),
serving a store holding one file of random bytes under its sha256. Prints the server's RSS at rest,
the time of the first request (which hashes the file to verify it), the peak RSS under slow clients
(each reading 4 KiB every 50 ms), and the throughput of fast clients each downloading the whole
file at once, with the peak RSS meanwhile. Target: peak RSS under 200 MB.

    python -m bench.image_server [--size-mb 50] [--slow 100] [--seconds 5] [--fast 20]
"""
from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import aiohttp

from tests.test_image_server import (
    MIB,
    fast_load,
    proc_status_kib,
    server_process,
    slow_load,
    url,
    write_big_blob,
)

RSS_TARGET_MB = 200


def mb(kib: int) -> float:
    return kib / 1024


async def bench(size_mb: int, slow: int, seconds: float, fast: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "images"
        key = write_big_blob(root, size_mb * MIB)
        path = url(key)
        with server_process(root) as (proc, port):
            await asyncio.sleep(0.5)
            print(f"server RSS at rest:                 {mb(proc_status_kib(proc.pid, 'VmRSS')):7.1f} MB")

            async with aiohttp.ClientSession() as session:
                start = time.perf_counter()
                async with session.head(f"http://127.0.0.1:{port}{path}") as resp:
                    assert resp.status == 200, resp.status
                first = time.perf_counter() - start
            print(f"first request (hashes {size_mb} MB):      {first * 1000:7.1f} ms")

            results, peak = await slow_load(proc.pid, port, path, clients=slow, seconds=seconds)
            streaming = sum(1 for status, got in results if status.endswith(b" 200 OK"))
            received = sum(got for _, got in results)
            print(f"peak RSS, {slow} slow clients, {seconds:g} s:    {mb(peak):7.1f} MB"
                  f"  ({streaming} streaming, the rest waiting for a slot;"
                  f" {received / MIB:.1f} MB delivered)")
            await asyncio.sleep(0.5)  # let the server notice the clients have gone
            print(f"server RSS after the slow clients:  {mb(proc_status_kib(proc.pid, 'VmRSS')):7.1f} MB")

            peak_fast = 0
            done = asyncio.Event()

            async def sample() -> None:
                nonlocal peak_fast
                while not done.is_set():
                    peak_fast = max(peak_fast, proc_status_kib(proc.pid, "VmRSS"))
                    await asyncio.sleep(0.02)

            sampler = asyncio.create_task(sample())
            total, elapsed = await fast_load(port, path, clients=fast)
            done.set()
            await sampler
            assert total == fast * size_mb * MIB, total
            print(f"throughput, {fast} fast clients:        {total / MIB / elapsed:7.1f} MB/s"
                  f"  ({total / MIB:.0f} MB in {elapsed:.2f} s; peak RSS {mb(peak_fast):.1f} MB)")
            hwm = mb(proc_status_kib(proc.pid, "VmHWM"))
            verdict = "ok" if hwm < RSS_TARGET_MB else "OVER TARGET"
            print(f"server RSS high-water mark:         {hwm:7.1f} MB  (target < {RSS_TARGET_MB} MB: {verdict})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=50)
    parser.add_argument("--slow", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--fast", type=int, default=20)
    args = parser.parse_args()
    asyncio.run(bench(args.size_mb, args.slow, args.seconds, args.fast))


if __name__ == "__main__":
    main()
