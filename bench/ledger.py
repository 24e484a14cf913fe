"""The budget ledger's throughput: reserve+settle pairs per second with 8 concurrent workers
(goal: above 2,000/s), as threads sharing one connection (as the bot runs) and as processes
with a connection each (the bot beside CLI commands); and the cost of the lazy period-refill
check per request: a reservation in a period already refilled, against one that refills.

    python -m bench.ledger [--pairs 2000] [--workers 8] [--json]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import tempfile
import threading
import time
from pathlib import Path

from bot.core.models import Caps
from bot.core.money import Terms
from storage.db import Database
from storage.ledger import Ledger

TERMS = Terms("day", 10**12, 0)
# Every check a busy server runs: a member's images per hour, the guild's cap and the daily cap
# on paid generation (a guild's images per hour is left out: at these rates it would refuse).
CAPS = Caps(paid=True, daily_cap_micros=10**15, user_images_per_hour=60, guild_id="g",
            guild_cap_micros=10**15, max_requests=4)
MEMBERS = 200  # per worker, taking turns


def _pairs(ledger: Ledger, worker: int, pairs: int) -> None:
    for i in range(pairs):
        job = worker * 10_000_000 + i
        ledger.reserve(f"user{worker}-{i % MEMBERS}", job, 40_000, CAPS, "openai")
        ledger.settle(job, 39_000, "openai")


def threads(path: Path, workers: int, pairs: int) -> float:
    db = Database(path)
    ledger = Ledger(db, TERMS)
    start = threading.Barrier(workers + 1)

    def run(w: int) -> None:
        start.wait()
        _pairs(ledger, w, pairs)

    pool = [threading.Thread(target=run, args=(w,)) for w in range(workers)]
    for t in pool:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in pool:
        t.join()
    elapsed = time.perf_counter() - t0
    db.close()
    return workers * pairs / elapsed


def _process(path: str, worker: int, pairs: int, start, done) -> None:
    db = Database(path)
    ledger = Ledger(db, TERMS)
    start.wait()
    _pairs(ledger, worker, pairs)
    db.close()
    done.put(time.perf_counter())


def processes(path: Path, workers: int, pairs: int) -> float:
    ctx = mp.get_context("fork")
    start, done = ctx.Event(), ctx.Queue()
    Database(path).close()
    pool = [ctx.Process(target=_process, args=(str(path), 100 + w, pairs, start, done)) for w in range(workers)]
    for p in pool:
        p.start()
    time.sleep(0.5)  # all connected
    t0 = time.perf_counter()
    start.set()
    ends = [done.get(timeout=600) for _ in pool]
    for p in pool:
        p.join()
    return workers * pairs / (max(ends) - t0)


def refill_cost(path: Path, samples: int) -> dict[str, float]:
    """Microseconds per reservation (median): in a period already refilled, and the first of a
    new period, which lapses and refills."""
    db = Database(path)
    clock = [1_800_000_000.0]
    ledger = Ledger(db, Terms("day", 10**12, 10**9), lambda: clock[0])
    steady, refilling = [], []
    for i in range(samples):
        user = f"r{i}"
        ledger.reserve(user, 50_000_000 + 2 * i, 1, Caps())  # opens the account (a first refill)
        t0 = time.perf_counter()
        ledger.reserve(user, 50_000_001 + 2 * i, 1, Caps())
        steady.append(time.perf_counter() - t0)
    clock[0] += 86400
    for i in range(samples):
        t0 = time.perf_counter()
        ledger.reserve(f"r{i}", 60_000_000 + i, 1, Caps())
        refilling.append(time.perf_counter() - t0)
    db.close()
    return {"reserve_us": statistics.median(steady) * 1e6, "reserve_with_refill_us": statistics.median(refilling) * 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=2000, help="reserve+settle pairs per worker")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        figures = {
            "threads_pairs_per_s": threads(root / "threads.db", args.workers, args.pairs),
            "processes_pairs_per_s": processes(root / "processes.db", args.workers, args.pairs // 2),
            **refill_cost(root / "refill.db", 500),
            "workers": args.workers,
        }
    if args.json:
        print(json.dumps(figures))
        return
    print(f"reserve+settle pairs/s, {args.workers} threads, one connection: {figures['threads_pairs_per_s']:,.0f}")
    print(f"reserve+settle pairs/s, {args.workers} processes, a connection each: "
          f"{figures['processes_pairs_per_s']:,.0f}")
    print(f"a reservation: {figures['reserve_us']:.0f} us; the first of a new period (lapse + refill): "
          f"{figures['reserve_with_refill_us']:.0f} us")


if __name__ == "__main__":
    main()
