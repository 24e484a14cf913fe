"""Storage upkeep: that every object a row points to is there and intact (`verify`), removing the
objects nothing points to (`collect_garbage`), and copying one store into another before switching
the rows to it (`migrate`). All blocking: call them from the command line or a worker thread.

A job refers to its image (`sha256`) and to the uploads it was made from (`source_sha256`,
`mask_sha256`), all in the images store; a moderation event to a blocked output kept for review
(`review_sha256`), in the review store. Every object is a PNG under its sha256.
"""
from __future__ import annotations

import hashlib
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from .blobs import BlobInfo, is_key
from .db import Database
from .errors import StorageError

_T = TypeVar("_T")
EXT = "png"
WORKERS = 8  # objects checked or copied at once: a bucket answers faster to several requests
_JOB_REFS = (("sha256", "image"), ("source_sha256", "source"), ("mask_sha256", "mask"))


class Store(Protocol):
    """What upkeep needs of a blob store (LocalBlobStore and S3BlobStore have it)."""

    def get(self, key: str, ext: str = "png") -> bytes: ...

    def put(self, data: bytes, ext: str = "png") -> Any: ...

    def exists(self, key: str, ext: str = "png") -> bool: ...

    def delete(self, key: str, ext: str = "png") -> bool: ...

    def keys(self) -> Iterator[BlobInfo]: ...

    def location(self, key: str, ext: str = "png") -> str: ...


@dataclass(frozen=True)
class Problem:
    """An object a row points to that is not as it should be."""

    key: str
    problem: str  # "missing", "damaged" (its bytes hash to another key), "unreadable", "not a key"
    referrers: tuple[str, ...]  # "job 12 (image)", "moderation event 3"
    detail: str = ""
    store: str = "images"  # or "review"

    def as_dict(self) -> dict[str, Any]:
        return {"key": self.key, "problem": self.problem, "referrers": list(self.referrers),
                "detail": self.detail, "store": self.store}

    def __str__(self) -> str:
        detail = f" ({self.detail})" if self.detail else ""
        return f"{self.key}.{EXT}: {self.problem}{detail}; referred to by {', '.join(self.referrers)}"


@dataclass
class MigrationReport:
    copied: int = 0  # objects written to the destination
    present: int = 0  # already there, intact (an earlier run's)
    bytes_copied: int = 0
    rows_switched: int = 0  # jobs whose image_url now points to the destination
    problems: list[Problem] = field(default_factory=list)  # not copied; their rows unchanged

    def as_dict(self) -> dict[str, Any]:
        return {"copied": self.copied, "present": self.present, "bytes_copied": self.bytes_copied,
                "rows_switched": self.rows_switched, "problems": [p.as_dict() for p in self.problems]}


def references(db: Database) -> dict[str, list[str]]:
    """Every key the jobs refer to, with who refers to it ("job 12 (image)")."""
    refs: dict[str, list[str]] = defaultdict(list)
    rows = db.query(
        "SELECT id, sha256, source_sha256, mask_sha256 FROM jobs WHERE sha256 IS NOT NULL"
        " OR source_sha256 IS NOT NULL OR mask_sha256 IS NOT NULL ORDER BY id"
    )
    for row in rows:
        for column, role in _JOB_REFS:
            if row[column]:
                refs[row[column]].append(f"job {row['id']} ({role})")
    return dict(refs)


def review_references(db: Database) -> dict[str, list[str]]:
    """Every key of a blocked output kept for review, with the moderation events that keep it."""
    refs: dict[str, list[str]] = defaultdict(list)
    rows = db.query("SELECT id, review_sha256 FROM moderation_events WHERE review_sha256 IS NOT NULL ORDER BY id")
    for row in rows:
        refs[row["review_sha256"]].append(f"moderation event {row['id']}")
    return dict(refs)


def verify(db: Database, blobs: Store, *, review: Store | None = None) -> list[Problem]:
    """Every object the rows refer to that is missing, unreadable or does not hash to its key;
    with `review`, the review store's objects too. Empty when all is well."""
    checks = [(key, refs, blobs, "images") for key, refs in references(db).items()]
    if review is not None:
        checks += [(key, refs, review, "review") for key, refs in review_references(db).items()]

    def check(item: tuple[str, list[str], Store, str]) -> Problem | None:
        key, refs, store, name = item
        try:
            _read_intact(store, key)
        except _Bad as bad:
            return Problem(key, bad.problem, tuple(refs), bad.detail, name)
        return None

    return sorted((p for p in _parallel(check, checks) if p is not None), key=lambda p: (p.store, p.key))


def collect_garbage(
    db: Database, blobs: Store, *, dry_run: bool = True, min_age_s: float = 3600.0
) -> list[str]:
    """The objects (`<key>.<ext>`) that no job refers to, removed unless `dry_run`. Objects
    younger than `min_age_s` are kept: a job stores its image before the row that points to it."""
    stored = list(blobs.keys())
    referenced = set(references(db))  # read after listing: rows written meanwhile are counted
    cutoff = time.time() - min_age_s
    garbage = [b for b in stored if b.key not in referenced and b.modified <= cutoff]
    if not dry_run:
        list(_parallel(lambda b: blobs.delete(b.key, b.ext), garbage))
    return [f"{b.key}.{b.ext}" for b in garbage]


def migrate(db: Database, src: Store, dst: Store) -> MigrationReport:
    """Copy every object the jobs refer to from `src` to `dst`, each checked against its key, then
    point the jobs' image_url at `dst` in one transaction. Idempotent: run again, it copies only
    what is missing (or damaged) in `dst` and switches only the rows not yet switched."""
    report = MigrationReport()
    refs = references(db)

    def copy(key: str) -> tuple[str, int] | Problem:
        return _copy(src, dst, key, refs[key])

    done = []
    for key, outcome in zip(sorted(refs), _parallel(copy, sorted(refs)), strict=True):
        if isinstance(outcome, Problem):
            report.problems.append(outcome)
            continue
        done.append(key)
        what, size = outcome
        report.copied += what == "copied"
        report.present += what == "present"
        report.bytes_copied += size
    with db.transaction() as conn:
        for key in done:
            url = dst.location(key, EXT)
            cur = conn.execute(
                "UPDATE jobs SET image_url = ? WHERE sha256 = ? AND image_url IS NOT ?", (url, key, url)
            )
            report.rows_switched += cur.rowcount
    return report


def _copy(src: Store, dst: Store, key: str, refs: list[str]) -> tuple[str, int] | Problem:
    """("copied", bytes) or ("present", 0); a Problem when the source's object is not right."""
    try:
        _read_intact(dst, key)
        return "present", 0
    except _Bad as bad:
        if bad.problem == "damaged":  # a bad copy (from elsewhere): copy it again
            dst.delete(key, EXT)
    try:
        data = _read_intact(src, key)
    except _Bad as bad:
        return Problem(key, bad.problem, tuple(refs), bad.detail)
    dst.put(data, EXT)
    return "copied", len(data)


class _Bad(Exception):
    def __init__(self, problem: str, detail: str = ""):
        super().__init__(problem)
        self.problem, self.detail = problem, detail


def _read_intact(store: Store, key: str) -> bytes:
    """The object's bytes, or _Bad when it is missing, unreadable or hashes to another key."""
    if not is_key(key):
        raise _Bad("not a key")
    try:
        data = store.get(key, EXT)
    except FileNotFoundError:
        raise _Bad("missing") from None
    except (StorageError, OSError) as exc:
        raise _Bad("unreadable", _why(exc)) from None
    actual = hashlib.sha256(data).hexdigest()
    if actual != key:
        raise _Bad("damaged", f"its bytes hash to {actual[:12]}...")
    return data


def _why(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def _parallel(fn: Callable[[Any], _T], items: Iterable[Any]) -> Iterator[_T]:
    """`map(fn, items)` on a few threads, in order."""
    with ThreadPoolExecutor(WORKERS, thread_name_prefix="easel-storage") as pool:
        yield from pool.map(fn, items)
