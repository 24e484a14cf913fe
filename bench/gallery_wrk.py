"""The image server and the gallery under wrk, against nginx on the same machine.

Starts `easel serve` in its own process (the HTTP app with the gallery, listening through
storage.image_site's fast path, as deployed) on a fresh data folder holding a 600 KB PNG and a
member's 24 public images, and nginx (a temporary config, `worker_processes` as given, default 1:
one process against one) serving the same image file and a saved copy of the image's gallery
page, both up at once. Then `wrk -t2 -c200 -d10s` runs, one server at a time, against the image
in rounds (nginx, then easel, `--rounds` times), and against the gallery pages (`/i/<sha256>`,
`/u/<id>`) on easel and the saved page on nginx. Prints each round, requests/s, errors and the
ratios easel/nginx. Target: the image at 0.8x nginx or better, as the median of the rounds'
ratios. Neither server logs requests, unless `--access-log` turns both servers' on (easel's
default settings have it on).

    python -m bench.gallery_wrk [--duration 10] [--rounds 5] [--connections 200] [--threads 2]
                                [--access-log] [--json]

Needs Debian's `wrk` and `nginx` on the PATH.
"""
from __future__ import annotations

import argparse
import getpass
import io
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from PIL import Image

from tests.helpers import free_port, write_workspace_config

ROOT = Path(__file__).resolve().parent.parent
TARGET = 0.8
MEMBER = "111"
DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never a proxy from the environment


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def noise_png(target_bytes: int = 600_000) -> bytes:
    """A PNG of random pixels (which do not compress) of about `target_bytes`."""
    side = int((target_bytes / 3) ** 0.5)
    img = Image.frombytes("RGB", (side, side), os.urandom(side * side * 3))
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def seed_data(data: Path, public_url: str) -> str:
    """The 600 KB image and 24 small ones, all public jobs of MEMBER; the big one's key."""
    from bot.core.models import GenerationParams, JobStatus, Kind
    from storage.blobs import LocalBlobStore
    from storage.db import Database
    from storage.jobs import JobStore

    db = Database(data / "easel.db")
    blobs, jobs = LocalBlobStore(data / "images", public_url), JobStore(db)
    images = [noise_png(4000) for _ in range(23)] + [noise_png()]
    for i, png in enumerate(images):
        blob = blobs.put(png)
        params = GenerationParams(prompt=f"a lighthouse at dusk, study {i} <b>&</b>", seed=i, size=(364, 364),
                                  model="tiny", negative_prompt="blurry")
        jobs.create(kind=Kind.IMAGINE, status=JobStatus.DONE, user_id=MEMBER, guild_id="100", params=params,
                    provider="local", sha256=blob.key, image_url=blob.url, public=True, cost_micros=1000)
    db.close()
    return blob.key


def wait_until_up(url: str, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with status {proc.returncode}")
        try:
            with DIRECT.open(url, timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"{url} did not answer within {timeout:g}s")


@contextmanager
def running(cmd: list[str], url: str, log_path: Path, **kwargs):
    """The server `cmd` until the block ends; its output to `log_path` (a pipe nobody reads would
    fill and stall it)."""
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, **kwargs)
    try:
        wait_until_up(url, proc)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def nginx_config(root: Path, port: int, workers: int, access_log: bool = False) -> str:
    user = f"user {getpass.getuser()};" if os.geteuid() == 0 else ""  # else workers run as nobody
    temps = " ".join(f"{kind}_temp_path {root}/tmp-{kind};" for kind in
                     ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return f"""{user}
worker_processes {workers};
daemon off;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    {f"access_log {root}/access.log;" if access_log else "access_log off;"}
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000;
    {temps}
    types {{ image/png png; }}
    default_type text/html;
    server {{
        listen 127.0.0.1:{port};
        root {root}/www;
        location /images/ {{ add_header Cache-Control "public, max-age=31536000, immutable"; }}
    }}
}}
"""


def wrk(url: str, threads: int, connections: int, duration: int) -> dict[str, float]:
    done = subprocess.run(["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration}s", url],
                          capture_output=True, text=True, timeout=duration + 60)
    if done.returncode:
        raise SystemExit(f"wrk failed on {url}: {(done.stderr or done.stdout).strip()}")
    out = done.stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out)[1])
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    socket = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = (int(bad[1]) if bad else 0) + (sum(int(x) for x in socket.groups()) if socket else 0)
    return {"rps": rps, "errors": errors}


def bench(duration: int, connections: int, threads: int, workers: int, rounds: int,
          access_log: bool = False) -> dict:
    """Both servers up side by side (idle while the other is measured), then `rounds` rounds,
    each a run on nginx's image and one on easel's, one right after the other: this machine's
    throughput drifts by tens of percent from minute to minute, and a ratio of two runs seconds
    apart is steadier than one of runs a minute apart. Then the pages, once."""
    load = (threads, connections, duration)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.chmod(root, 0o755)  # nginx's workers read below it
        easel_port = write_workspace_config(root / "easel", **{"generators.local": {"enabled": False}})
        data = root / "easel" / "data"
        key = seed_data(data, f"http://127.0.0.1:{easel_port}")
        easel = f"http://127.0.0.1:{easel_port}"
        paths = {"image": f"/images/{key}.png", "image page": f"/i/{key}", "member page": f"/u/{MEMBER}"}
        stored = data / "images" / key[:2] / f"{key}.png"
        (root / "www" / "images").mkdir(parents=True)
        (root / "www" / "i").mkdir()
        os.link(stored, root / "www" / "images" / f"{key}.png")  # the same file
        nginx_port = free_port()
        (root / "nginx.conf").write_text(nginx_config(root, nginx_port, workers, access_log))
        nginx = f"http://127.0.0.1:{nginx_port}"
        # Like for like: both log each request, or neither does.
        env = {**os.environ, "EASEL_CONFIG": str(root / "easel" / "easel.toml"),
               "EASEL_SERVER__ACCESS_LOG": str(access_log).lower()}
        with running([sys.executable, "-m", "bot.cli", "serve"], easel + "/healthz", root / "easel.log",
                     env=env, cwd=ROOT), \
             running(["nginx", "-p", str(root), "-c", str(root / "nginx.conf")], nginx + paths["image"],
                     root / "nginx.log"):
            with DIRECT.open(easel + paths["image page"]) as resp:
                (root / "www" / "i" / key).write_bytes(resp.read())  # the page as easel rendered it
            for url in (easel + paths["image"], nginx + paths["image"]):
                wrk(url, threads, connections, 2)  # warm-up (easel's first request verifies the file)
            image_rounds = []
            for n in range(rounds):
                got = {"nginx": wrk(nginx + paths["image"], *load), "easel": wrk(easel + paths["image"], *load)}
                got["ratio"] = round(got["easel"]["rps"] / got["nginx"]["rps"], 3)
                image_rounds.append(got)
                log(f"image, round {n + 1}: {got}")
            results = {}
            for label, base, names in (("easel", easel, ("image page", "member page")),
                                       ("nginx", nginx, ("image page",))):
                for name in names:
                    wrk(base + paths[name], threads, connections, 2)
                    results[f"{label} {name}"] = wrk(base + paths[name], *load)
                    log(f"{label} {name}: {results[f'{label} {name}']}")
        image_bytes = stored.stat().st_size
    ratio = statistics.median(r["ratio"] for r in image_rounds)
    return {"image_bytes": image_bytes, "image_rounds": image_rounds, "results": results,
            "ratios": {"image (median of rounds)": ratio,
                       "image page": round(results["easel image page"]["rps"] / results["nginx image page"]["rps"], 3)},
            "target": TARGET, "ok": ratio >= TARGET}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per run (default 10)")
    parser.add_argument("--connections", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--nginx-workers", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5, help="image runs on each server, interleaved (default 5)")
    parser.add_argument("--access-log", action="store_true", help="both servers log each request (to a file)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    for tool in ("wrk", "nginx"):
        if shutil.which(tool) is None:
            print(f"{tool} is not installed (apt-get install {tool})", file=sys.stderr)
            return 2
    report = bench(args.duration, args.connections, args.threads, args.nginx_workers, args.rounds, args.access_log)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for n, r in enumerate(report["image_rounds"], 1):
            print(f"image, round {n}: nginx {r['nginx']['rps']:>7.0f} req/s, easel {r['easel']['rps']:>7.0f} req/s"
                  f"  ({r['nginx']['errors'] + r['easel']['errors']} errors): {r['ratio']:.2f}x")
        for name, r in report["results"].items():
            print(f"{name:<20} {r['rps']:>10.0f} req/s  ({r['errors']} errors)")
        ratios = report["ratios"]
        print(f"image ({report['image_bytes']} bytes): easel/nginx = {ratios['image (median of rounds)']:.2f}x, the median "
              f"of {len(report['image_rounds'])} rounds (target {TARGET}x or better: "
              f"{'ok' if report['ok'] else 'BELOW TARGET'})")
        print(f"image page: easel (rendered) / nginx (a saved copy) = {ratios['image page']:.2f}x")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
