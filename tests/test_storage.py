"""Storage, in process: the blob store, the database, the image server and the budget ledger."""
from __future__ import annotations

import hashlib
import multiprocessing
import sqlite3
import threading

import pytest
from aiohttp import test_utils

from storage.blobs import LocalBlobStore
from storage.db import MIGRATIONS, Database
from storage.errors import StorageError
from storage.ledger import InsufficientFunds, Ledger
from storage.server import make_image_app
from tests.helpers import reserve_in_own_connection

ONE_USD = 1_000_000
PNG_BYTES = b"\x89PNG\r\n\x1a\n" + b"not really, but the store does not care" * 10


# ---- the blob store ----------------------------------------------------------------------

def test_put_is_content_addressed_and_idempotent(tmp_path):
    store = LocalBlobStore(tmp_path / "images", "http://img.example/")
    first = store.put(PNG_BYTES)
    again = store.put(PNG_BYTES)
    key = hashlib.sha256(PNG_BYTES).hexdigest()

    assert first == again
    assert first.key == key
    assert first.path == tmp_path / "images" / key[:2] / f"{key}.png"
    assert first.path.read_bytes() == PNG_BYTES
    assert first.size == len(PNG_BYTES)
    assert first.url == f"http://img.example/images/{key}.png"
    assert store.get(key) == PNG_BYTES
    assert store.exists(key)

    other = store.put(PNG_BYTES + b"!")
    assert other.key != key
    assert other.path.read_bytes() == PNG_BYTES + b"!"


def test_put_leaves_no_temporary_files(tmp_path):
    store = LocalBlobStore(tmp_path, "http://img.example")
    keys = {store.put(bytes([i]) * 100).key for i in range(5)}
    store.put(bytes([0]) * 100)

    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert sorted(p.name for p in files) == sorted(f"{k}.png" for k in keys)


@pytest.mark.parametrize("key", [
    "../../etc/passwd",
    "A" * 64,  # upper-case hex
    "a" * 63,
    "a" * 65,
    "g" * 64,
    "",
    "a" * 62 + "/x",
])
def test_path_for_rejects_anything_but_a_sha256_key(tmp_path, key):
    store = LocalBlobStore(tmp_path, "http://img.example")
    with pytest.raises(ValueError, match="not a blob key"):
        store.path_for(key)
    with pytest.raises(ValueError):
        store.get(key)


# ---- the database ------------------------------------------------------------------------

def test_a_fresh_file_is_migrated_to_the_latest_schema_in_wal_mode(tmp_path):
    path = tmp_path / "deep" / "er" / "easel.db"
    db = Database(path)
    assert db.schema_version == len(MIGRATIONS)
    tables = {r[0] for r in db.query("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"jobs", "accounts", "reservations", "ledger_entries"} <= tables
    db.close()

    # WAL is a property of the file: a plain connection sees it too.
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    finally:
        conn.close()


def test_opening_twice_is_harmless(tmp_path):
    path = tmp_path / "easel.db"
    first = Database(path)
    Ledger(first, ONE_USD).grant("ann", 250_000, actor="test")
    second = Database(path)  # while the first is still open
    assert second.schema_version == len(MIGRATIONS)
    assert Ledger(second, ONE_USD).balance("ann").balance_micros == 1_250_000
    second.close()
    first.close()

    third = Database(path)
    assert third.schema_version == len(MIGRATIONS)
    assert Ledger(third, ONE_USD).balance("ann").balance_micros == 1_250_000
    third.close()


def test_a_database_from_a_newer_easel_is_refused_untouched(tmp_path):
    path = tmp_path / "easel.db"
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    conn.close()

    with pytest.raises(StorageError, match="newer") as info:
        Database(path)
    assert str(path) in str(info.value)

    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS) + 1
        assert conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0
    finally:
        conn.close()


def test_a_failed_transaction_is_rolled_back(tmp_path):
    db = Database(tmp_path / "easel.db")
    with pytest.raises(ZeroDivisionError):
        with db.transaction() as conn:
            conn.execute(
                "INSERT INTO accounts (user_id, balance_micros, created_at, updated_at)"
                " VALUES ('ann', 5, 0, 0)"
            )
            1 / 0
    assert db.query("SELECT * FROM accounts") == []
    db.close()


# ---- the image server --------------------------------------------------------------------

async def test_image_server_headers_conditional_get_and_404s(tmp_path):
    store = LocalBlobStore(tmp_path, "http://img.example")
    blob = store.put(PNG_BYTES)
    async with test_utils.TestClient(test_utils.TestServer(make_image_app(store))) as client:
        resp = await client.get(f"/images/{blob.key}.png")
        assert resp.status == 200
        assert await resp.read() == PNG_BYTES
        assert resp.headers["Content-Type"] == "image/png"
        cache = [d.strip() for d in resp.headers["Cache-Control"].split(",")]
        assert "immutable" in cache
        max_age = next(int(d.split("=")[1]) for d in cache if d.startswith("max-age="))
        assert max_age >= 365 * 24 * 3600
        etag = resp.headers["ETag"]

        resp = await client.get(f"/images/{blob.key}.png", headers={"If-None-Match": etag})
        assert resp.status == 304
        assert await resp.read() == b""

        resp = await client.get(f"/images/{blob.key}.png", headers={"If-None-Match": '"other"'})
        assert resp.status == 200

        for path in [
            f"/images/{hashlib.sha256(b'never stored').hexdigest()}.png",  # unknown key
            f"/images/{blob.key.upper()}.png",
            f"/images/{blob.key}.txt",  # not an image type
            f"/images/{blob.key}.jpg",  # stored as png only
            "/images/..%2F..%2Fetc%2Fpasswd.png",
            "/images/../../etc/passwd",
            "/images/",
        ]:
            resp = await client.get(path)
            assert resp.status == 404, path

        resp = await client.get("/healthz")
        assert resp.status == 200
        assert await resp.json() == {"ok": True}


async def test_image_etag_is_the_content_key(tmp_path):
    """The bytes behind a key never change, so the key is the ETag: it survives a copy of the
    images folder (new mtimes) or a second server, unlike a file-stat ETag."""
    store = LocalBlobStore(tmp_path, "http://img.example")
    blob = store.put(PNG_BYTES)
    async with test_utils.TestClient(test_utils.TestServer(make_image_app(store))) as client:
        resp = await client.get(f"/images/{blob.key}.png")
        assert resp.headers["ETag"] == f'"{blob.key}"'
        for validators in (f'"{blob.key}"', f'"older", "{blob.key}"', f'W/"{blob.key}"'):
            resp = await client.get(f"/images/{blob.key}.png", headers={"If-None-Match": validators})
            assert resp.status == 304, validators  # RFC 9110: a list, compared weakly


# ---- the ledger --------------------------------------------------------------------------

def _entries(db: Database, user_id: str) -> list[tuple]:
    return [tuple(r) for r in db.query(
        "SELECT kind, job_id, amount_micros, balance_after_micros, actor FROM ledger_entries"
        " WHERE user_id = ? ORDER BY id", (user_id,))]


def _reservation(db: Database, job_id: int) -> tuple | None:
    row = db.query_one(
        "SELECT state, amount_micros, charged_micros FROM reservations WHERE job_id = ?", (job_id,)
    )
    return tuple(row) if row else None


@pytest.fixture
def db(tmp_path):
    database = Database(tmp_path / "easel.db")
    yield database
    database.close()


def test_reserve_settle_and_release_move_exact_amounts(db):
    ledger = Ledger(db, ONE_USD)
    assert ledger.balance("ann").balance_micros == ONE_USD  # a new user starts at the allowance

    held = ledger.reserve("ann", 1, 300_000)
    assert (held.balance_micros, held.reserved_micros, held.available_micros) == (ONE_USD, 300_000, 700_000)
    assert ledger.balance("ann") == held
    assert ledger.settle(1, 123_456) == 123_456
    b = ledger.balance("ann")
    assert (b.balance_micros, b.reserved_micros) == (876_544, 0)
    assert _reservation(db, 1) == ("settled", 300_000, 123_456)

    ledger.reserve("ann", 2, 50_000)
    assert ledger.release(2) is True
    b = ledger.balance("ann")
    assert (b.balance_micros, b.reserved_micros) == (876_544, 0)
    assert _reservation(db, 2) == ("released", 50_000, 0)

    assert _entries(db, "ann") == [
        ("refill", None, ONE_USD, ONE_USD, None),
        ("reserve", 1, 0, ONE_USD, None),
        ("settle", 1, -123_456, 876_544, None),
        ("reserve", 2, 0, 876_544, None),
        ("release", 2, 0, 876_544, None),
    ]
    held = db.query("SELECT held_micros FROM ledger_entries WHERE user_id = 'ann' ORDER BY id")
    assert [r[0] for r in held] == [0, 300_000, -300_000, 50_000, -50_000]


def test_settle_is_capped_at_the_reservation(db):
    ledger = Ledger(db, ONE_USD)
    ledger.reserve("ann", 7, 100_000)
    assert ledger.settle(7, 250_000) == 100_000
    b = ledger.balance("ann")
    assert (b.balance_micros, b.reserved_micros) == (900_000, 0)
    assert _reservation(db, 7) == ("settled", 100_000, 100_000)


def test_settling_or_releasing_twice_changes_nothing(db):
    ledger = Ledger(db, ONE_USD)
    ledger.reserve("ann", 1, 200_000)
    ledger.reserve("ann", 2, 200_000)
    assert ledger.settle(1, 150_000) == 150_000
    assert ledger.release(2) is True
    before = (ledger.balance("ann"), _entries(db, "ann"), _reservation(db, 1), _reservation(db, 2))

    assert ledger.settle(1, 150_000) == 0
    assert ledger.release(1) is False
    assert ledger.release(2) is False
    assert ledger.settle(2, 100_000) == 0
    assert ledger.settle(999, 100_000) == 0  # never reserved
    assert ledger.release(999) is False

    after = (ledger.balance("ann"), _entries(db, "ann"), _reservation(db, 1), _reservation(db, 2))
    assert after == before
    assert ledger.balance("ann").balance_micros == 850_000


def test_insufficient_funds_holds_nothing(db):
    ledger = Ledger(db, ONE_USD)
    ledger.reserve("ann", 1, 600_000)
    with pytest.raises(InsufficientFunds) as info:
        ledger.reserve("ann", 2, 400_001)
    assert (info.value.available_micros, info.value.needed_micros) == (400_000, 400_001)
    assert _reservation(db, 2) is None
    b = ledger.balance("ann")
    assert (b.balance_micros, b.reserved_micros) == (ONE_USD, 600_000)
    # What is left can still be reserved, to the micro-dollar.
    ledger.reserve("ann", 3, 400_000)
    assert ledger.balance("ann").available_micros == 0

    with pytest.raises(ValueError):
        ledger.reserve("ann", 4, -1)


def test_set_and_grant_write_ledger_entries(db):
    ledger = Ledger(db, ONE_USD)
    assert ledger.set_balance("ann", 5_000_000, actor="cli:admin").balance_micros == 5_000_000
    assert ledger.grant("ann", 250_000, actor="cli:admin").balance_micros == 5_250_000
    assert ledger.set_balance("ann", 0, actor="discord:42").balance_micros == 0

    entries = _entries(db, "ann")
    assert entries == [
        ("refill", None, ONE_USD, ONE_USD, None),
        ("adjust", None, 4_000_000, 5_000_000, "cli:admin"),
        ("grant", None, 250_000, 5_250_000, "cli:admin"),
        ("adjust", None, -5_250_000, 0, "discord:42"),
    ]
    # The entries are a complete account: they sum to the balance.
    assert sum(e[2] for e in entries) == ledger.balance("ann").balance_micros


def test_admin_changes_never_take_the_available_balance_below_zero(db):
    ledger = Ledger(db, ONE_USD)
    ledger.reserve("ann", 1, 300_000)  # a running job holds $0.30
    took = ledger.grant("ann", -999_999_000_000, actor="cli:admin")
    assert (took.asked_micros, took.applied_micros, took.limited) == (-999_999_000_000, -700_000, True)
    assert (took.balance_micros, took.available_micros) == (300_000, 0)
    assert "only that much was available" in took.describe()
    assert ledger.grant("ann", -1, actor="cli:admin").applied_micros == 0  # nothing left to take

    kept = ledger.set_balance("ann", 0, actor="discord:42")  # below what the job holds
    assert (kept.balance_micros, kept.available_micros, kept.applied_micros) == (300_000, 0, 0)
    assert kept.describe() == "set the balance to $0.3000, not $0.0000: $0.3000 is held for running jobs"
    assert ledger.settle(1, 300_000) == 300_000  # the job can still pay what it holds
    assert ledger.balance("ann").balance_micros == 0
    with pytest.raises(ValueError):
        ledger.set_balance("ann", -1)
    entries = _entries(db, "ann")
    assert sum(e[2] for e in entries) == ledger.balance("ann").balance_micros == 0
    assert min(e[3] for e in entries) >= 0  # no entry left a negative balance


def test_the_per_user_limit_of_requests_in_flight_is_kept_by_the_database(tmp_path):
    """Two processes (here: two connections) share it; the jobs of one group count once."""
    from bot.core.models import Caps, TooManyRequests

    first, second = Database(tmp_path / "e.db"), Database(tmp_path / "e.db")
    bot_ledger, cli_ledger = Ledger(first, ONE_USD), Ledger(second, ONE_USD)
    caps = lambda group: Caps(max_requests=2, group=group)  # noqa: E731
    bot_ledger.reserve("ann", 1, 10, caps("interaction:1"))
    bot_ledger.reserve("ann", 2, 10, caps("interaction:1"))  # the same /imagine count=2
    cli_ledger.reserve("ann", 3, 10, caps("request:cli"))
    with pytest.raises(TooManyRequests, match="already have 2 requests in flight"):
        cli_ledger.reserve("ann", 4, 10, caps("request:other"))
    with pytest.raises(TooManyRequests):
        cli_ledger.reserve("ann", 4, 10, Caps(max_requests=2))  # no group: a request of its own
    cli_ledger.reserve("bob", 5, 10, caps("request:bob"))  # another user is not limited by ann
    bot_ledger.reserve("ann", 6, 10, caps("interaction:1"))  # ann's group in flight may grow
    cli_ledger.settle(3, 10)
    bot_ledger.reserve("ann", 7, 10, caps("request:other"))  # a request finished: room again
    assert cli_ledger.balance("ann").reserved_micros == 40


def _check_concurrent_outcome(path, user_id: str, amount: int, outcomes: list[bool]) -> None:
    """Reservations are serialised: exactly as many succeed as the balance covers."""
    db = Database(path)
    try:
        b = Ledger(db, ONE_USD).balance(user_id)
        held = db.query_one(
            "SELECT COALESCE(SUM(amount_micros), 0), count(*) FROM reservations"
            " WHERE user_id = ? AND state = 'held'", (user_id,))
    finally:
        db.close()
    assert sum(outcomes) == ONE_USD // amount
    assert b.reserved_micros == held[0] == sum(outcomes) * amount
    assert held[1] == sum(outcomes)
    assert b.reserved_micros <= b.balance_micros == ONE_USD


@pytest.mark.parametrize("connections", ["shared", "one per thread"])
def test_concurrent_reservations_from_threads_never_overdraw(tmp_path, connections):
    path = tmp_path / "easel.db"
    Database(path).close()
    shared = Database(path)
    n, amount = 8, 300_000
    barrier = threading.Barrier(n)
    outcomes: list[bool] = []

    def worker(job_id: int) -> None:
        db = shared if connections == "shared" else Database(path)
        ledger = Ledger(db, ONE_USD)
        barrier.wait()
        try:
            ledger.reserve("ann", job_id, amount)
            outcomes.append(True)
        except InsufficientFunds:
            outcomes.append(False)
        finally:
            if db is not shared:
                db.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(1, n + 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    shared.close()
    assert len(outcomes) == n
    _check_concurrent_outcome(path, "ann", amount, outcomes)


def test_concurrent_reservations_from_processes_never_overdraw(tmp_path):
    path = tmp_path / "easel.db"
    Database(path).close()
    ctx = multiprocessing.get_context("spawn")  # no sqlite handle crosses a fork
    start, results = ctx.Event(), ctx.Queue()
    n, amount = 4, 400_000
    procs = [
        ctx.Process(target=reserve_in_own_connection,
                    args=(str(path), "ann", job_id, amount, ONE_USD, start, results))
        for job_id in range(1, n + 1)
    ]
    for p in procs:
        p.start()
    start.set()
    outcomes = dict(results.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert sorted(outcomes) == list(range(1, n + 1))
    _check_concurrent_outcome(path, "ann", amount, list(outcomes.values()))
