"""Put and get throughput of the blob stores for 1 MB PNGs: the local folder, and the S3 store
against moto's S3 server on 127.0.0.1.

Each image is random noise, so PNG cannot compress it, and each is distinct, so no put is skipped
as already stored. Puts and gets run from `--threads` worker threads, as the core calls the store.
moto runs in this process (one GIL for server and client) and keeps objects in memory: its figures
are the store's own overhead, a lower bound for a real bucket's latency, not a forecast of it.

    python -m bench.storage [--images 24] [--threads 1 8] [--json]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

SIDE = 592  # 592 x 592 RGB noise: about 1.05 MB as PNG
BUCKET = "easel-bench"


def noise_pngs(count: int) -> list[bytes]:
    from PIL import Image

    out = []
    for _ in range(count):
        buf = io.BytesIO()
        Image.frombytes("RGB", (SIDE, SIDE), os.urandom(SIDE * SIDE * 3)).save(buf, "PNG", compress_level=1)
        out.append(buf.getvalue())
    return out


@contextmanager
def moto_store() -> Iterator[Any]:
    from moto.server import ThreadedMotoServer

    from storage.s3 import S3BlobStore
    from tests.helpers import free_port

    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                      AWS_EC2_METADATA_DISABLED="true")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    try:
        import boto3

        endpoint = f"http://127.0.0.1:{server.get_host_and_port()[1]}"
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
        store = S3BlobStore(BUCKET, prefix="bench", endpoint_url=endpoint, region="us-east-1")
        try:
            yield store
        finally:
            store.close()
    finally:
        server.stop()


def timed(fn: Callable[[Any], Any], items: list[Any], threads: int) -> tuple[float, list[Any]]:
    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(fn, items))
    return time.perf_counter() - start, results


def run(store: Any, name: str, images: list[bytes], threads: int) -> dict[str, Any]:
    size = sum(len(i) for i in images)
    put_s, blobs = timed(store.put, images, threads)
    get_s, back = timed(store.get, [b.key for b in blobs], threads)
    assert back == images, "a get returned other bytes than were put"
    for b in blobs:  # the next round puts the same images again: make it store them again
        store.delete(b.key)
    return {
        "store": name, "threads": threads, "images": len(images), "mb": round(size / 1e6, 2),
        "put_mb_s": round(size / 1e6 / put_s, 1), "put_ms_each": round(put_s * 1000 / len(images), 2),
        "get_mb_s": round(size / 1e6 / get_s, 1), "get_ms_each": round(get_s * 1000 / len(images), 2),
    }


def bench(count: int, threads: list[int]) -> list[dict[str, Any]]:
    from storage.blobs import LocalBlobStore

    images = noise_pngs(count)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        local = LocalBlobStore(tmp, "http://127.0.0.1:8080")
        rows += [run(local, "local", images, n) for n in threads]
    with moto_store() as s3:
        rows += [run(s3, "s3 (moto)", images, n) for n in threads]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=24, help="how many 1 MB PNGs (default 24)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 8], help="worker threads (default 1 8)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    rows = bench(args.images, args.threads)
    if args.json:
        print(json.dumps({"image_bytes": rows[0]["mb"] / rows[0]["images"], "results": rows}))
        return
    print(f"{args.images} noise PNGs of ~{rows[0]['mb'] / rows[0]['images']:.2f} MB each")
    print(f"{'store':<10} {'threads':>7}  {'put MB/s':>9} {'ms/put':>8}  {'get MB/s':>9} {'ms/get':>8}")
    for r in rows:
        print(f"{r['store']:<10} {r['threads']:>7}  {r['put_mb_s']:>9.1f} {r['put_ms_each']:>8.2f}"
              f"  {r['get_mb_s']:>9.1f} {r['get_ms_each']:>8.2f}")


if __name__ == "__main__":
    main()
