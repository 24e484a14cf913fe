"""Job records: one row per request, with its state, parameters, timings and result."""
from __future__ import annotations

import json
from dataclasses import fields
from typing import Any

from bot.core.models import ErrorCode, GenerationParams, JobRecord, JobStatus, Kind

from .db import Database, now

# The parameters are stored flat, one column each; `size` as width and height.
_PARAM_COLUMNS = ("prompt", "negative_prompt", "seed", "steps", "guidance", "strength", "model",
                  "options")
_COLUMNS = ({f.name for f in fields(JobRecord)} - {"params"}) | set(_PARAM_COLUMNS) | {"width", "height"}


# The gallery's columns (migration 10) are read by the gallery's queries, not kept on JobRecord.
_GALLERY_COLUMNS = ("hidden_at", "hidden_by", "deleted_at")
_LISTED = ("status = 'done' AND sha256 IS NOT NULL AND public = 1 AND nsfw_channel = 0 AND spoiler = 0"
           " AND hidden_at IS NULL AND deleted_at IS NULL")


def _record(row: Any) -> JobRecord:
    data = dict(row)
    for key in _GALLERY_COLUMNS:
        data.pop(key, None)
    width, height = data.pop("width"), data.pop("height")
    params = {k: data.pop(k) for k in _PARAM_COLUMNS}
    params["options"] = json.loads(params["options"] or "{}")
    data["timings"] = json.loads(data["timings"] or "{}")
    data["nsfw_channel"] = bool(data["nsfw_channel"])
    data["public"] = bool(data["public"])
    data["spoiler"] = bool(data["spoiler"])
    data["kind"], data["status"] = Kind(data["kind"]), JobStatus(data["status"])
    data["error_code"] = ErrorCode(data["error_code"]) if data["error_code"] else None
    size = (width, height) if width is not None and height is not None else None
    return JobRecord(params=GenerationParams(size=size, **params), **data)


def _encode(values: dict[str, Any]) -> dict[str, Any]:
    out = dict(values)
    params = out.pop("params", None)
    if isinstance(params, GenerationParams):
        out.update({k: getattr(params, k) for k in _PARAM_COLUMNS})
        out["width"], out["height"] = params.size or (None, None)
        out["options"] = dict(params.options)
    unknown = set(out) - _COLUMNS
    if unknown:
        raise KeyError(f"unknown job fields: {sorted(unknown)}")
    for key in ("options", "timings"):
        if key in out:
            out[key] = json.dumps(dict(out[key]), sort_keys=True)
    if "status" in out:
        out["status"] = str(JobStatus(out["status"]))
    for key in ("kind", "error_code"):
        if out.get(key) is not None:
            out[key] = str(out[key])
    return out


class JobStore:
    def __init__(self, db: Database):
        self.db = db

    def create(self, **values: Any) -> JobRecord:
        values.setdefault("status", JobStatus.QUEUED)
        values.setdefault("created_at", now())
        with self.db.locked():
            job_id = self.db.db["jobs"].insert(_encode(values)).last_pk
        job = self.get(job_id)
        assert job is not None
        return job

    def update(self, job_id: int, **values: Any) -> None:
        """Change a job; joins the caller's transaction, so it can commit with a ledger step."""
        row = _encode(values)
        sets = ", ".join(f"{k} = ?" for k in row)
        with self.db.transaction() as conn:
            conn.execute(f"UPDATE jobs SET {sets} WHERE id = ?", (*row.values(), job_id))

    def get(self, job_id: int) -> JobRecord | None:
        row = self.db.query_one("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return _record(row) if row else None

    def by_message(self, message_id: str) -> JobRecord | None:
        row = self.db.query_one(
            "SELECT * FROM jobs WHERE message_id = ? ORDER BY id DESC LIMIT 1", (message_id,)
        )
        return _record(row) if row else None

    def latest_done(self, user_id: str) -> JobRecord | None:
        row = self.db.query_one(
            "SELECT * FROM jobs WHERE user_id = ? AND status = 'done' ORDER BY id DESC LIMIT 1",
            (user_id,),
        )
        return _record(row) if row else None

    def list(self, *, user_id: str | None = None, limit: int = 20) -> list[JobRecord]:
        if user_id is None:
            rows = self.db.query("SELECT * FROM jobs ORDER BY id DESC LIMIT ?", (limit,))
        else:
            rows = self.db.query(
                "SELECT * FROM jobs WHERE user_id = ? ORDER BY id DESC LIMIT ?", (user_id, limit)
            )
        return [_record(r) for r in rows]

    def unfinished(self) -> list[JobRecord]:
        rows = self.db.query("SELECT * FROM jobs WHERE status IN ('queued', 'running') ORDER BY id")
        return [_record(r) for r in rows]

    def listed(self, *, user_id: str | None = None, guild_id: str | None = None,
               sha256: str | None = None, source_job_id: int | None = None, offset: int = 0,
               limit: int = 24) -> list[JobRecord]:
        """What the gallery may show, newest first (see bot.core.ports.JobStore.listed)."""
        where = [_LISTED]
        params: list[Any] = []
        for column, value in (("user_id", user_id), ("guild_id", guild_id), ("sha256", sha256),
                              ("source_job_id", source_job_id)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        rows = self.db.query(
            f"SELECT * FROM jobs WHERE {' AND '.join(where)} ORDER BY id DESC LIMIT ? OFFSET ?",
            (*params, limit, offset),
        )
        return [_record(r) for r in rows]

    def hide(self, job_id: int, actor: str) -> bool:
        with self.db.transaction() as conn:
            cur = conn.execute("UPDATE jobs SET hidden_at = COALESCE(hidden_at, ?), hidden_by = "
                               "COALESCE(hidden_by, ?) WHERE id = ?", (now(), actor, job_id))
        return cur.rowcount > 0

    def delete_from_gallery(self, job_id: int) -> bool:
        with self.db.transaction() as conn:
            cur = conn.execute("UPDATE jobs SET deleted_at = COALESCE(deleted_at, ?) WHERE id = ?",
                               (now(), job_id))
        return cur.rowcount > 0

    def spend_by_provider_since(self, since: float) -> dict[str, int]:
        rows = self.db.query(
            "SELECT provider, SUM(cost_micros) FROM jobs WHERE finished_at >= ? AND cost_micros > 0"
            " GROUP BY provider",
            (since,),
        )
        return {r[0]: r[1] for r in rows}
