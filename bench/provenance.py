"""C2PA signing time per image: `Provenance.stamp` (metadata, then an ES256 manifest signed with a
private CA's leaf, no timestamp authority) on a 1 MB PNG (noise, so it does not compress) and on
a 512x512 PNG like a generated image; with metadata only (unsigned) beside it, and the time to
read a signed image back (`read_provenance`). Prints the median and p95 of each, in ms.

    python -m bench.provenance [--runs 50]
"""
from __future__ import annotations

import argparse
import io
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from bot.core.models import GenerationParams, JobRecord, JobStatus, Kind
from storage.provenance import Provenance, read_provenance
from tests.test_provenance import make_credentials


def noise_png(nbytes: int) -> bytes:
    side = int((nbytes / 3) ** 0.5)
    img = Image.frombytes("RGB", (side, side), os.urandom(side * side * 3))
    out = io.BytesIO()
    img.save(out, "PNG")
    return out.getvalue()


def generated_png(side: int = 512) -> bytes:
    """Gradients under noise: compresses about as well as a diffusion model's output."""
    size = (side, side)
    img = Image.merge("RGB", [Image.effect_noise(size, 40).convert("L"),
                              Image.linear_gradient("L").resize(size),
                              Image.radial_gradient("L").resize(size)])
    out = io.BytesIO()
    img.save(out, "PNG")
    return out.getvalue()


def timings(fn: Callable[[], object], runs: int) -> tuple[float, float]:
    """(median, p95) in ms, after one warm-up call."""
    fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    times.sort()
    return statistics.median(times), times[min(len(times) - 1, int(len(times) * 0.95))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50)
    runs = parser.parse_args().runs
    job = JobRecord(1, Kind.IMAGINE, JobStatus.RUNNING, "bench",
                    GenerationParams(prompt="a lighthouse at dusk, oil painting", seed=42, size=(512, 512),
                                     steps=4, model="tiny"), provider="local")
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        signing = Provenance(*make_credentials(Path(tmp)))
        print(f"start-up (load and check the key, one trial signature): {(time.perf_counter() - start) * 1000:6.1f} ms")
    unsigned = Provenance()
    print(f"{'image':<28}{'signed stamp':>22}{'metadata only':>22}{'read back':>22}")
    print(f"{'':<28}{'median    p95':>22}{'median    p95':>22}{'median    p95':>22}")
    for label, data in (("1 MB PNG (noise)", noise_png(1_000_000)), ("512x512 PNG", generated_png())):
        signed = signing.stamp(data, job)
        assert read_provenance(signed).valid
        row = [timings(lambda d=data: signing.stamp(d, job), runs),
               timings(lambda d=data: unsigned.stamp(d, job), runs),
               timings(lambda s=signed: read_provenance(s), runs)]
        cells = "".join(f"{median:>13.1f}{p95:>9.1f}" for median, p95 in row)
        print(f"{label + f' ({len(data) / 1e6:.2f} MB)':<28}{cells}   (+{len(signed) - len(data)} bytes)")
    print(f"({runs} runs each, in ms; ES256, no timestamp authority, no thumbnail)")


if __name__ == "__main__":
    main()
