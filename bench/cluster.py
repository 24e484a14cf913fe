"""Throughput of the Ray Serve GPU pool with 1, 2 and 4 replicas: 200 queued jobs from 20 users
through easel's fair queue and the cluster generator, each replica running a stand-in generator
that takes a fixed time per image (CPU only, one image at a time, like a GPU). Images per second
must grow near-linearly (at least 3.5x at 4 replicas) while the queue keeps its fair order
(round robin: every user's k-th job starts before any user's (k+1)-th).

    python -m bench.cluster
"""
from __future__ import annotations

import asyncio
import tempfile
import threading
import time
from pathlib import Path

from bot.core.admission import FairQueue
from bot.core.models import GeneratedImage, GenerationParams, GenerationRequest, Kind, ModelSpec

SECONDS_PER_IMAGE = 0.2
USERS, JOBS_PER_USER = 20, 10
REPLICAS = (1, 2, 4)
MODEL = "stand-in"


class FixedTimeGenerator:
    """A stand-in for the local generator on a GPU: one image at a time, `seconds` each."""

    provider = "local"

    def __init__(self, models: dict[str, str], seconds: float = SECONDS_PER_IMAGE):
        self._names, self._seconds = list(models), seconds
        self._gpu = threading.Lock()

    def models(self) -> list[ModelSpec]:
        return [ModelSpec(name=n, provider=self.provider, kinds=frozenset({"imagine"})) for n in self._names]

    async def generate(self, request: GenerationRequest, progress=None) -> GeneratedImage:
        await asyncio.to_thread(self._work)
        return GeneratedImage(b"png", request.width, request.height, request.model, self.provider, request.seed)

    def _work(self) -> None:
        with self._gpu:
            time.sleep(self._seconds)

    async def close(self) -> None:
        pass


async def _run(gen, replicas: int) -> tuple[float, list[str]]:
    """Images per second for 200 jobs, and the users in the order their jobs started."""
    limit = 3 * replicas  # jobs waiting on each replica keep them all busy
    queue = FairQueue(limit=limit)
    started: list[str] = []

    async def job(n: int, user: str) -> None:
        await queue.acquire(n, user)
        started.append(user)
        try:
            request = GenerationRequest(Kind.IMAGINE, GenerationParams(
                prompt=f"job {n}", seed=n, size=(64, 64), steps=1, model=MODEL))
            await gen.generate(request)
        finally:
            queue.release()

    for n in range(limit):  # hold every slot until all 200 jobs are queued
        await queue.acquire(-1 - n, "hold")
    # User-major order, the hardest case for fairness: user 0's ten jobs are queued first.
    jobs = [asyncio.ensure_future(job(u * JOBS_PER_USER + j, f"user{u}")) for u in range(USERS)
            for j in range(JOBS_PER_USER)]
    while len(queue) < len(jobs):
        await asyncio.sleep(0)
    begin = time.perf_counter()
    for _ in range(limit):
        queue.release()
    await asyncio.gather(*jobs)
    return USERS * JOBS_PER_USER / (time.perf_counter() - begin), started


def _fair(started: list[str]) -> bool:
    """Round robin: every user's k-th job started before any user's (k+1)-th."""
    counts = dict.fromkeys(set(started), 0)
    for user in started:
        counts[user] += 1
        if counts[user] - min(counts.values()) > 1:
            return False
    return True


def main() -> None:
    from generators.cluster import ClusterGenerator, connect
    from generators.serve_app import PoolOptions, deploy

    connect("local", local_cpus=2)
    data = Path(tempfile.mkdtemp(prefix="easel-bench-cluster-"))
    gen = ClusterGenerator(address="local", app="bench", models={MODEL: MODEL}, data_dir=data)
    rates = {}
    for replicas in REPLICAS:
        options = PoolOptions(num_gpus=0, num_cpus=0, min_replicas=replicas, max_replicas=replicas,
                              max_batch_size=1)
        deploy("bench", {"models": {MODEL: MODEL}}, options, generator="bench.cluster:FixedTimeGenerator")
        rate, started = asyncio.run(_run(gen, replicas))
        rates[replicas] = rate
        print(f"{replicas} replica{'s' if replicas > 1 else ' '}: {rate:6.2f} images/s "
              f"({rate / rates[1]:.2f}x), fair order: {'yes' if _fair(started) else 'NO'}")
    ideal = 1 / SECONDS_PER_IMAGE
    print(f"ideal: {ideal:.0f} images/s per replica; 4 replicas reach {rates[4] / rates[1]:.2f}x "
          f"(target >= 3.5x): {'ok' if rates[4] / rates[1] >= 3.5 else 'BELOW TARGET'}")


if __name__ == "__main__":
    main()
