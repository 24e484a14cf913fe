"""1,000 concurrent reservations from several processes, each with its own connection, against
a balance that fits exactly N: exactly N are granted, the balance ends at exactly zero, and the
entries sum to it, every time; and a period's refill, raced by every process at the boundary,
happens once."""
from __future__ import annotations

import multiprocessing as mp
import sqlite3

import pytest

from bot.core.models import BudgetRefusal, Caps
from bot.core.money import Terms
from storage.db import Database
from storage.ledger import Ledger

PROCESSES = 4
ATTEMPTS = 250  # per process: 1,000 in all
PRICE = 1_000
JAN_1 = 1798761600.0  # 2027-01-01 00:00 UTC


def _reserve_many(path: str, first_job: int, start, results, now: float, allowance: int) -> None:
    db = Database(path)
    ledger = Ledger(db, Terms("month", allowance, 0), lambda: now)
    granted = 0
    start.wait()
    for job in range(first_job, first_job + ATTEMPTS):
        try:
            ledger.reserve("ann", job, PRICE, Caps())
            granted += 1
        except BudgetRefusal:
            pass
    db.close()
    results.put(granted)


def _race(path: str, now: float, allowance: int) -> list[int]:
    ctx = mp.get_context("fork")
    start, results = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_reserve_many, args=(path, 1 + i * ATTEMPTS, start, results, now, allowance))
             for i in range(PROCESSES)]
    for p in procs:
        p.start()
    start.set()
    counts = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    return counts


@pytest.mark.parametrize("fits", [1, 137, 999])
def test_exactly_n_of_1000_concurrent_reservations_are_granted(tmp_path, fits):
    path = str(tmp_path / "easel.db")
    now = JAN_1 - 86400
    Database(path).close()
    counts = _race(path, now, fits * PRICE)
    assert sum(counts) == fits
    db = Database(path)
    try:
        ledger = Ledger(db, Terms("month", fits * PRICE, 0), lambda: now)
        b = ledger.balance("ann")
        assert (b.balance_micros, b.reserved_micros, b.available_micros) == (fits * PRICE, fits * PRICE, 0)
        assert ledger.entry_sums("ann") == (fits * PRICE, fits * PRICE)
        held = db.query("SELECT COUNT(*), SUM(amount_micros) FROM reservations WHERE state = 'held'")[0]
        assert tuple(held) == (fits, fits * PRICE)
    finally:
        db.close()


def test_a_refill_raced_by_every_process_at_the_boundary_happens_once(tmp_path):
    path = str(tmp_path / "easel.db")
    db = Database(path)
    Ledger(db, Terms("month", 10 * PRICE, 0), lambda: JAN_1 - 1).balance("ann")  # opened in December
    db.close()
    counts = _race(path, JAN_1 + 5, 10 * PRICE)  # every process's first call sees a new month
    assert sum(counts) == 10  # one refill's worth, not four
    with sqlite3.connect(path) as conn:
        refills = conn.execute("SELECT period_start FROM ledger_entries WHERE kind = 'refill'").fetchall()
    assert refills == [(JAN_1 - 31 * 86400,), (JAN_1,)]
