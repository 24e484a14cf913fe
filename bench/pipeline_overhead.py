"""Pipeline overhead per job: everything but the generator call.

A generator that returns a prepared 512x512 PNG at once stands in for the model, so the time
measured is parsing, screening, the budget transactions, queueing, validation, re-hosting and
recording. Prints median and p99 over N jobs (target: median under 25 ms), first with image
screening off, then with the nudenet classifier (its cost shown separately).

    python bench/pipeline_overhead.py [--jobs 200]
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time

from bot.config import settings_from_dict
from moderation import NoImageScreen, NudeNetScreen
from tests.fakes.generators import PreparedGenerator
from tests.helpers import job_request, start_app


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


async def run(jobs: int, screen, label: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        settings = settings_from_dict({
            "storage": {"database": f"{tmp}/easel.db", "images_dir": f"{tmp}/images"},
            "generation": {"default_model": "fake-model"},
            "budget": {"default_allowance_usd": 1000.0},
        })
        gen = PreparedGenerator(price_usd=0.001)
        app = start_app(settings, generators=[gen], image_screen=screen)
        await app.service.submit(job_request("imagine", "warm-up", "warm up", seed=0, size=(512, 512)))
        totals, steps = [], {}
        for i in range(jobs):
            # A distinct seed per job: distinct images, so every job really writes its file.
            t0 = time.perf_counter()
            out = await app.service.submit(
                job_request("imagine", f"user{i % 10}", f"a lighthouse at dusk --seed {i + 1}", size=(512, 512)))
            total = (time.perf_counter() - t0) * 1000
            assert out.ok, out.error
            totals.append(total - out.job.timings.get("generate", 0.0))
            for k, v in out.job.timings.items():
                steps.setdefault(k, []).append(v)
        await app.close()
    print(f"{label}: {jobs} jobs, overhead per job: median {statistics.median(totals):.2f} ms, "
          f"p99 {percentile(totals, 0.99):.2f} ms (target: median < 25 ms)")
    print("  per step (median ms): " + ", ".join(
        f"{k} {statistics.median(v):.2f}" for k, v in steps.items()))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=200)
    args = parser.parse_args()
    asyncio.run(run(args.jobs, NoImageScreen(), "image screening off"))
    asyncio.run(run(args.jobs, NudeNetScreen(), "nudenet image screening"))


if __name__ == "__main__":
    main()
