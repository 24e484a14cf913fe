"""The SQLite database: one file, WAL mode, schema created and migrated on open.

Every write that must be atomic goes through `Database.transaction()`, which takes SQLite's write
lock up front (BEGIN IMMEDIATE), so that a check-then-update can never interleave with another
writer, in this process or another.
"""
from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import sqlite_utils

from .errors import StorageError

# Each entry migrates the schema from version i to i+1. Append only; never edit a released one.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE jobs (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        kind TEXT NOT NULL,
        status TEXT NOT NULL,
        user_id TEXT NOT NULL,
        guild_id TEXT,
        channel_id TEXT,
        nsfw_channel INTEGER NOT NULL DEFAULT 0,
        prompt TEXT NOT NULL DEFAULT '',
        negative_prompt TEXT,
        seed INTEGER,
        model TEXT,
        provider TEXT,
        width INTEGER,
        height INTEGER,
        steps INTEGER,
        guidance REAL,
        strength REAL,
        source_job_id INTEGER,
        options TEXT NOT NULL DEFAULT '{}',
        estimate_micros INTEGER NOT NULL DEFAULT 0,
        cost_micros INTEGER NOT NULL DEFAULT 0,
        sha256 TEXT,
        image_url TEXT,
        revised_prompt TEXT,
        note TEXT,
        error TEXT,
        error_code TEXT,
        timings TEXT NOT NULL DEFAULT '{}',
        message_id TEXT,
        owner TEXT,
        created_at REAL NOT NULL,
        started_at REAL,
        finished_at REAL
    );
    CREATE INDEX jobs_user ON jobs(user_id, id);
    CREATE INDEX jobs_status ON jobs(status);
    CREATE INDEX jobs_sha256 ON jobs(sha256);
    CREATE INDEX jobs_message ON jobs(message_id);
    CREATE TABLE accounts (
        user_id TEXT PRIMARY KEY,
        balance_micros INTEGER NOT NULL,
        reserved_micros INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE TABLE reservations (
        job_id INTEGER PRIMARY KEY,
        user_id TEXT NOT NULL,
        provider TEXT,
        paid INTEGER NOT NULL DEFAULT 0,
        amount_micros INTEGER NOT NULL,
        state TEXT NOT NULL,
        charged_micros INTEGER,
        created_at REAL NOT NULL,
        closed_at REAL
    );
    CREATE INDEX reservations_state ON reservations(state);
    CREATE INDEX reservations_paid ON reservations(paid, closed_at);
    CREATE TABLE ledger_entries (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        user_id TEXT NOT NULL,
        job_id INTEGER,
        kind TEXT NOT NULL,
        amount_micros INTEGER NOT NULL,
        balance_after_micros INTEGER NOT NULL,
        actor TEXT,
        created_at REAL NOT NULL
    );
    CREATE INDEX ledger_user ON ledger_entries(user_id, id);
    """,
    # 2: per-user and per-guild preferences; reservations remember their guild (guild caps);
    # jobs keep their uploaded inputs (edits can be reproduced).
    """
    CREATE TABLE user_settings (
        user_id TEXT PRIMARY KEY,
        model TEXT,
        aspect TEXT,
        private INTEGER NOT NULL DEFAULT 0,
        updated_at REAL NOT NULL
    );
    CREATE TABLE guild_settings (
        guild_id TEXT PRIMARY KEY,
        default_model TEXT,
        spend_cap_micros INTEGER,
        updated_at REAL NOT NULL
    );
    ALTER TABLE reservations ADD COLUMN guild_id TEXT;
    ALTER TABLE jobs ADD COLUMN source_sha256 TEXT;
    ALTER TABLE jobs ADD COLUMN mask_sha256 TEXT;
    CREATE INDEX reservations_guild ON reservations(guild_id, closed_at);
    """,
    # 3: whether the result was posted for the channel to see (others in the guild may then act
    # on it); a private or undelivered result belongs to its requester alone.
    """
    ALTER TABLE jobs ADD COLUMN public INTEGER NOT NULL DEFAULT 0;
    """,
    # 4: the request a reservation belongs to, so the per-user limit of requests in flight is
    # counted in the database and holds across processes.
    """
    ALTER TABLE reservations ADD COLUMN request_group TEXT;
    CREATE INDEX reservations_user_state ON reservations(user_id, state);
    """,
    # 5: prompt enhancement (a member's default; the prompt as typed) and tips for short prompts.
    """
    ALTER TABLE user_settings ADD COLUMN enhance INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE user_settings ADD COLUMN tipped_at REAL NOT NULL DEFAULT 0;
    ALTER TABLE guild_settings ADD COLUMN tips INTEGER NOT NULL DEFAULT 1;
    ALTER TABLE jobs ADD COLUMN original_prompt TEXT;
    """,
    # 6: outpainting (zoom out, pan): the edit of an earlier image on a larger canvas.
    """
    ALTER TABLE jobs ADD COLUMN outpaint TEXT;
    """,
    # 7: the moderation log.
    """
    CREATE TABLE moderation_events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        user_id TEXT NOT NULL,
        guild_id TEXT,
        channel_id TEXT,
        job_id INTEGER,
        stage TEXT NOT NULL,
        rule TEXT NOT NULL,
        score REAL,
        prompt TEXT,
        created_at REAL NOT NULL
    );
    CREATE INDEX moderation_user ON moderation_events(user_id, created_at);
    CREATE INDEX moderation_time ON moderation_events(created_at);
    """,
    # 8: a blocked output kept for review (moderation.keep_blocked_outputs), by its key in the
    # review store, which the image server never serves.
    """
    ALTER TABLE moderation_events ADD COLUMN review_sha256 TEXT;
    """,
    # 9: an image an age-restricted channel's policy shows as a spoiler.
    """
    ALTER TABLE jobs ADD COLUMN spoiler INTEGER NOT NULL DEFAULT 0;
    """,
    # 10: the gallery: an image an admin hid, or its requester deleted, is listed no more;
    # indexes for a guild's recent public images and for the variations of an image.
    """
    ALTER TABLE jobs ADD COLUMN hidden_at REAL;
    ALTER TABLE jobs ADD COLUMN hidden_by TEXT;
    ALTER TABLE jobs ADD COLUMN deleted_at REAL;
    CREATE INDEX jobs_guild_public ON jobs(guild_id, public, id);
    CREATE INDEX jobs_source ON jobs(source_job_id);
    """,
    # 11: budgets that refill. An account's balance is its allowance for the period (refilled
    # lazily at each boundary, its unspent part lapsing or carrying over) plus credit from grants;
    # blocks; allowances per role and member; exemptions; every movement an entry (held money
    # too); spend alerts claimed once; what was charged per UTC day, for the paid total and per
    # guild (so that a cap is checked without summing the day's jobs; the two indexes the old
    # cap queries used go, which makes each reservation and settlement cheaper to write). Balances
    # from before become
    # credit, which never lapses,
    # and one opening entry per account makes its entries sum to its balance and what it holds.
    """
    ALTER TABLE accounts ADD COLUMN allowance_micros INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE accounts ADD COLUMN period_start REAL NOT NULL DEFAULT 0;
    ALTER TABLE accounts ADD COLUMN blocked_at REAL;
    ALTER TABLE accounts ADD COLUMN blocked_reason TEXT;
    ALTER TABLE accounts ADD COLUMN blocked_by TEXT;
    ALTER TABLE ledger_entries ADD COLUMN held_micros INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE ledger_entries ADD COLUMN reason TEXT;
    ALTER TABLE ledger_entries ADD COLUMN period_start REAL;
    CREATE UNIQUE INDEX ledger_refill_once ON ledger_entries(user_id, period_start)
        WHERE kind = 'refill' AND period_start IS NOT NULL;
    INSERT INTO ledger_entries (user_id, kind, amount_micros, held_micros, balance_after_micros, actor,
        reason, created_at)
        SELECT a.user_id, 'adjust',
            a.balance_micros - COALESCE((SELECT SUM(e.amount_micros) FROM ledger_entries e
                                         WHERE e.user_id = a.user_id), 0),
            a.reserved_micros, a.balance_micros, 'easel', 'opening balance (budgets that refill)',
            CAST(strftime('%s', 'now') AS REAL)
        FROM accounts a;
    ALTER TABLE reservations ADD COLUMN roles TEXT NOT NULL DEFAULT '';
    ALTER TABLE reservations ADD COLUMN counted INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE reservations ADD COLUMN exempt INTEGER NOT NULL DEFAULT 0;
    DROP INDEX reservations_paid;
    DROP INDEX reservations_guild;
    CREATE INDEX reservations_closed ON reservations(closed_at);
    CREATE INDEX reservations_user_time ON reservations(user_id, created_at, state);
    CREATE INDEX reservations_guild_time ON reservations(guild_id, created_at, state);
    CREATE TABLE spend_days (
        scope TEXT NOT NULL,
        day REAL NOT NULL,
        charged_micros INTEGER NOT NULL,
        PRIMARY KEY (scope, day)
    );
    INSERT INTO spend_days (scope, day, charged_micros)
        SELECT 'paid', CAST(closed_at / 86400 AS INTEGER) * 86400.0, SUM(charged_micros) FROM reservations
        WHERE state = 'settled' AND paid = 1 AND charged_micros > 0 GROUP BY 2;
    INSERT INTO spend_days (scope, day, charged_micros)
        SELECT 'guild:' || guild_id, CAST(closed_at / 86400 AS INTEGER) * 86400.0, SUM(charged_micros)
        FROM reservations WHERE state = 'settled' AND guild_id IS NOT NULL AND charged_micros > 0 GROUP BY 1, 2;
    CREATE TABLE allowances (
        scope TEXT NOT NULL,
        subject_id TEXT NOT NULL,
        amount_micros INTEGER NOT NULL,
        actor TEXT,
        updated_at REAL NOT NULL,
        PRIMARY KEY (scope, subject_id)
    );
    CREATE TABLE exemptions (
        scope TEXT NOT NULL,
        subject_id TEXT NOT NULL,
        actor TEXT,
        created_at REAL NOT NULL,
        PRIMARY KEY (scope, subject_id)
    );
    CREATE TABLE spend_alerts (
        cap TEXT NOT NULL,
        period_start REAL NOT NULL,
        threshold INTEGER NOT NULL,
        spent_micros INTEGER NOT NULL,
        cap_micros INTEGER NOT NULL,
        created_at REAL NOT NULL,
        PRIMARY KEY (cap, period_start, threshold)
    );
    """,
    # 12: remix: a member's vary and reroll buttons open a modal to edit the prompt first.
    """
    ALTER TABLE user_settings ADD COLUMN remix INTEGER NOT NULL DEFAULT 0;
    """,
]

class Database:
    """A thread-safe handle on the easel database file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        memory = str(path) == ":memory:"
        if not memory:
            _check_place(self.path)
        try:
            # Autocommit mode: transactions are explicit (see transaction()).
            conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=30)
        except sqlite3.Error as exc:
            raise StorageError(f"{self.path}: cannot open the database ({exc})") from None
        try:
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            # Checkpoint the WAL every ~40 MB rather than every 4 MB: a checkpoint syncs the file,
            # and with the default the ledger spent a third of each commit on them. Truncated
            # back to 64 MB after each.
            conn.execute("PRAGMA wal_autocheckpoint=10000")
            conn.execute("PRAGMA journal_size_limit=67108864")
            conn.execute("PRAGMA foreign_keys=ON")
            self.conn = conn
            self.db = sqlite_utils.Database(conn)
            self._lock = threading.RLock()
            self._depth = 0
            self.migrate()
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise StorageError(_why(self.path, exc)) from None
        except BaseException:
            conn.close()
            raise

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One atomic write: takes the write lock at BEGIN; commits, or rolls back on error."""
        with self._lock:
            if self._depth:  # nested: join the outer transaction
                self._depth += 1
                try:
                    yield self.conn
                finally:
                    self._depth -= 1
                return
            self.conn.execute("BEGIN IMMEDIATE")
            self._depth = 1
            try:
                yield self.conn
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
            else:
                self.conn.execute("COMMIT")
            finally:
                self._depth = 0

    @contextmanager
    def locked(self) -> Iterator[sqlite_utils.Database]:
        """The sqlite-utils handle, for single-statement writes outside a transaction."""
        with self._lock:
            if self._depth:
                raise RuntimeError("sqlite-utils writes commit on their own; not inside transaction()")
            yield self.db

    def query(self, sql: str, params: tuple | dict = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self.conn.execute(sql, params).fetchall()

    def query_one(self, sql: str, params: tuple | dict = ()) -> sqlite3.Row | None:
        with self._lock:
            return self.conn.execute(sql, params).fetchone()

    @property
    def schema_version(self) -> int:
        return self.conn.execute("PRAGMA user_version").fetchone()[0]

    def migrate(self) -> None:
        with self.transaction() as conn:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > len(MIGRATIONS):
                raise StorageError(
                    f"the database {self.path} has schema version {version}, newer than this "
                    f"easel knows ({len(MIGRATIONS)}); upgrade easel"
                )
            for i in range(version, len(MIGRATIONS)):
                for statement in MIGRATIONS[i].split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {i + 1}")

    def check_writable(self) -> None:
        """Take the write lock and let it go: raises when the database cannot be written now."""
        with self._lock:
            self.conn.execute("BEGIN IMMEDIATE")
            self.conn.execute("ROLLBACK")

    def close(self) -> None:
        with self._lock:
            self.conn.close()


def _check_place(path: Path) -> None:
    """The database's folder exists (or is made) and the path is no directory."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise StorageError(f"{path.parent}: the data folder is a file, not a folder") from None
    except NotADirectoryError:
        raise StorageError(f"{path.parent}: part of the data folder's path is a file") from None
    except OSError as exc:
        raise StorageError(f"{path.parent}: cannot make the data folder ({exc.strerror})") from None
    if path.is_dir():
        raise StorageError(f"{path}: is a directory, not a database file")
    if path.exists() and not os.access(path, os.R_OK | os.W_OK):
        raise StorageError(f"{path}: the database cannot be read and written by this user")
    if not path.exists() and not os.access(path.parent, os.W_OK | os.X_OK):
        raise StorageError(f"{path.parent}: the data folder is not writable, so no database can be made")


def _why(path: Path, exc: sqlite3.DatabaseError) -> str:
    text = str(exc)
    if "not a database" in text or "malformed" in text:
        return f"{path}: not an easel database (not SQLite, or damaged)"
    if "readonly" in text or "read-only" in text:
        return f"{path}: the database is read-only for this user"
    return f"{path}: cannot use the database ({text})"


def now() -> float:
    return time.time()
