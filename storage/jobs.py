"""Job records: one row per request, with its state, parameters, timings and result."""
from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from typing import Any

from .db import JOB_STATES, Database, now

FINAL_STATES = frozenset({"done", "failed", "blocked", "cancelled", "refused"})


@dataclass
class JobRecord:
    id: int
    kind: str
    status: str
    user_id: str
    guild_id: str | None = None
    channel_id: str | None = None
    nsfw_channel: bool = False
    prompt: str = ""
    negative_prompt: str | None = None
    seed: int | None = None
    model: str | None = None
    provider: str | None = None
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    guidance: float | None = None
    strength: float | None = None
    source_job_id: int | None = None
    options: dict[str, Any] = field(default_factory=dict)
    estimate_micros: int = 0
    cost_micros: int = 0
    sha256: str | None = None
    image_url: str | None = None
    revised_prompt: str | None = None
    note: str | None = None
    error: str | None = None
    error_code: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    message_id: str | None = None
    owner: str | None = None  # host:pid of the process running the job
    source_sha256: str | None = None  # an uploaded input image, kept in the blob store
    mask_sha256: str | None = None
    created_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None

    @classmethod
    def from_row(cls, row) -> "JobRecord":
        data = dict(row)
        data["options"] = json.loads(data["options"] or "{}")
        data["timings"] = json.loads(data["timings"] or "{}")
        data["nsfw_channel"] = bool(data["nsfw_channel"])
        return cls(**data)


_COLUMNS = {f.name for f in fields(JobRecord)}


def _encode(values: dict[str, Any]) -> dict[str, Any]:
    unknown = set(values) - _COLUMNS
    if unknown:
        raise KeyError(f"unknown job fields: {sorted(unknown)}")
    out = dict(values)
    for key in ("options", "timings"):
        if key in out:
            out[key] = json.dumps(out[key], sort_keys=True)
    if "status" in out and out["status"] not in JOB_STATES:
        raise ValueError(f"unknown job status {out['status']!r}")
    return out


class JobStore:
    def __init__(self, db: Database):
        self.db = db

    def create(self, **values: Any) -> JobRecord:
        values.setdefault("status", "queued")
        values.setdefault("created_at", now())
        with self.db.locked():
            job_id = self.db.db["jobs"].insert(_encode(values)).last_pk
        return self.get(job_id)

    def update(self, job_id: int, **values: Any) -> None:
        """Change a job; joins the caller's transaction, so it can commit with a ledger step."""
        row = _encode(values)
        sets = ", ".join(f"{k} = ?" for k in row)
        with self.db.transaction() as conn:
            conn.execute(f"UPDATE jobs SET {sets} WHERE id = ?", (*row.values(), job_id))

    def get(self, job_id: int) -> JobRecord | None:
        row = self.db.query_one("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return JobRecord.from_row(row) if row else None

    def by_message(self, message_id: str) -> JobRecord | None:
        row = self.db.query_one(
            "SELECT * FROM jobs WHERE message_id = ? ORDER BY id DESC LIMIT 1", (message_id,)
        )
        return JobRecord.from_row(row) if row else None

    def latest_done(self, user_id: str) -> JobRecord | None:
        row = self.db.query_one(
            "SELECT * FROM jobs WHERE user_id = ? AND status = 'done' ORDER BY id DESC LIMIT 1",
            (user_id,),
        )
        return JobRecord.from_row(row) if row else None

    def list(self, *, user_id: str | None = None, limit: int = 20) -> list[JobRecord]:
        if user_id is None:
            rows = self.db.query("SELECT * FROM jobs ORDER BY id DESC LIMIT ?", (limit,))
        else:
            rows = self.db.query(
                "SELECT * FROM jobs WHERE user_id = ? ORDER BY id DESC LIMIT ?", (user_id, limit)
            )
        return [JobRecord.from_row(r) for r in rows]

    def unfinished(self) -> list[JobRecord]:
        rows = self.db.query("SELECT * FROM jobs WHERE status IN ('queued', 'running') ORDER BY id")
        return [JobRecord.from_row(r) for r in rows]

    def spend_by_provider_since(self, since: float) -> dict[str, int]:
        rows = self.db.query(
            "SELECT provider, SUM(cost_micros) FROM jobs WHERE finished_at >= ? AND cost_micros > 0"
            " GROUP BY provider",
            (since,),
        )
        return {r[0]: r[1] for r in rows}
