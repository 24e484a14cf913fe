"""The local generator on this machine's CPU with the tiny random model: images/s and s/it at
batch 1 and batch 4 (four compatible jobs let in together and merged into one pipeline call),
each with stock kernels and with batch_exact (batch-invariant kernels: a batched image
bit-identical to its solo run; at batch 1, jobs one after another on a generator with batching
on), and the share of each job's time spent outside the diffusers call (checks, batching, PNG
encoding, the worker hand-off).

    python -m bench.local_generator [--jobs 8] [--size 256] [--steps 8]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

from generators.local import DiffusersGenerator
from tests.helpers import generation_request


async def run(batch: int, exact: bool, jobs: int, size: int, steps: int, data_dir: Path) -> dict:
    # Price 1 USD a second: each image's cost is then its share of the diffusers call's seconds.
    # batch_exact takes effect with batching on: a batch 1 run with it has batching on, no window.
    gen = DiffusersGenerator({"tiny": "tiny"}, data_dir=data_dir, device="cpu", price_per_second_usd=1.0,
                             batch_size=4 if exact else batch, batch_window_s=0.2 if batch > 1 else 0.0,
                             batch_exact=exact)
    requests = [generation_request(model="tiny", prompt=f"a lighthouse {i}", seed=i, width=size,
                                   height=size, steps=steps) for i in range(jobs)]
    try:
        await gen.generate(requests[0])  # loads the model
        started = time.perf_counter()
        if batch == 1:
            images = [await gen.generate(r) for r in requests]
        else:
            images = await asyncio.gather(*(gen.generate(r) for r in requests))
        wall = time.perf_counter() - started
    finally:
        await gen.close()
    inside = sum(image.cost_usd for image in images)
    return {"batch": batch, "batch_exact": exact, "images": jobs, "size": size, "steps": steps,
            "images_per_s": round(jobs / wall, 3), "s_per_it": round(wall / (jobs / batch * steps), 4),
            "share_outside_diffusers": round(max(0.0, 1 - inside / wall), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = [asyncio.run(run(b, exact, args.jobs, args.size, args.steps, Path(tmp)))
                   for exact in (False, True) for b in (1, 4)]
    stock = results[0]["images_per_s"]  # batch 1, stock kernels: what batching off gives
    for result in results[1:]:
        result["speedup_over_batch_1"] = round(result["images_per_s"] / stock, 2)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
