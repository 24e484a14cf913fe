"""Routing + download + re-hosting overhead with a cloud provider that answers in a fixed time.

A fake OpenAI on 127.0.0.1 (in its own thread and event loop, so its work does not count against
ours) answers every dall-e-3 call in 500 ms with a URL to a distinct 1024x1024 PNG. 100 jobs are
submitted at once through the real pipeline and the real openai SDK; the provider concurrency
limit is 4, so the ceiling is 4 / 0.5 s = 8 jobs/s. Prints jobs/s (target: within 10% of the
ceiling) and the event-loop lag: the worst delay of a 10 ms ticker (target: under 50 ms).

    python bench/cloud_throughput.py [--jobs 100] [--concurrency 4] [--latency 0.5]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import threading
import time

from bot.config import settings_from_dict
from moderation import NoImageScreen
from tests.fakes.providers import FakeOpenAI, image_bytes
from tests.helpers import job_request, start_app


def start_fake_in_thread(latency_s: float, images: list[bytes]) -> tuple[FakeOpenAI, callable]:
    loop = asyncio.new_event_loop()
    fake = FakeOpenAI()
    fake.latency_s = latency_s
    outputs = iter(images)
    fake.make_output = lambda w, h: next(outputs)
    started = threading.Event()

    def run():
        asyncio.set_event_loop(loop)
        loop.run_until_complete(fake.start())
        started.set()
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    started.wait()

    def stop():
        asyncio.run_coroutine_threadsafe(fake.stop(), loop).result()
        loop.call_soon_threadsafe(loop.stop)
        thread.join()

    return fake, stop


async def ticker(lags: list[float], stop: asyncio.Event) -> None:
    while not stop.is_set():
        t = time.perf_counter()
        await asyncio.sleep(0.01)
        lags.append(time.perf_counter() - t - 0.01)


async def run(jobs: int, concurrency: int, latency: float) -> None:
    images = [image_bytes(1024, 1024, shade=i) for i in range(jobs + 1)]
    fake, stop_fake = start_fake_in_thread(latency, images)
    os.environ["OPENAI_API_KEY"] = fake.api_key
    with tempfile.TemporaryDirectory() as tmp:
        settings = settings_from_dict({
            "storage": {"database": f"{tmp}/easel.db", "images_dir": f"{tmp}/images"},
            "generation": {"default_model": "dall-e-3"},
            "generators": {"local": {"enabled": False},
                           "openai": {"base_url": f"{fake.base_url}/v1", "max_concurrent": concurrency}},
        })
        app = start_app(settings, image_screen=NoImageScreen())
        warm = await app.service.submit(job_request("imagine", "warm", "warm up"))
        assert warm.ok, warm.error
        lags: list[float] = []
        stop = asyncio.Event()
        tick = asyncio.create_task(ticker(lags, stop))
        t0 = time.perf_counter()
        outs = await asyncio.gather(*[
            app.service.submit(job_request("imagine", f"user{i}", f"a lighthouse, study {i}"))
            for i in range(jobs)])
        elapsed = time.perf_counter() - t0
        stop.set()
        await tick
        await app.close()
    stop_fake()
    done = sum(o.ok for o in outs)
    failed = [o.error for o in outs if not o.ok]
    ceiling = concurrency / latency
    rate = done / elapsed
    print(f"{done}/{jobs} jobs done in {elapsed:.2f} s: {rate:.2f} jobs/s; ceiling {ceiling:.2f} jobs/s "
          f"({100 * rate / ceiling:.1f}% of it; target >= 90%)")
    print(f"event-loop lag (10 ms ticker): max {max(lags) * 1000:.1f} ms, "
          f"p99 {sorted(lags)[int(0.99 * (len(lags) - 1))] * 1000:.1f} ms (target: max < 50 ms)")
    if failed:
        print("failures:", failed[:3])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--latency", type=float, default=0.5)
    args = parser.parse_args()
    asyncio.run(run(args.jobs, args.concurrency, args.latency))


if __name__ == "__main__":
    main()
