"""In-memory implementations of the core's ports, for fast unit tests of the core: no SQLite,
no files, no Pillow."""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import re
from contextlib import contextmanager
from dataclasses import dataclass

from bot.core.models import (
    ALLOWED,
    Adjustment,
    Balance,
    Caps,
    GuildSettings,
    InsufficientFunds,
    JobRecord,
    JobStatus,
    StoredBlob,
    TooManyRequests,
    UserSettings,
    Verdict,
)
from bot.core.money import Terms


class MemoryUnitOfWork:
    @contextmanager
    def transaction(self):
        yield self


class MemoryJobs:
    def __init__(self):
        self.rows: dict[int, JobRecord] = {}
        self._ids = itertools.count(1)
        self.hidden: dict[int, str] = {}  # the gallery's: job id -> who hid it
        self.deleted: set[int] = set()

    def create(self, **values) -> JobRecord:
        job = JobRecord(id=next(self._ids), **values)
        self.rows[job.id] = job
        return job

    def update(self, job_id: int, **values) -> None:
        self.rows[job_id] = dataclasses.replace(self.rows[job_id], **values)

    def get(self, job_id):
        return self.rows.get(job_id)

    def by_message(self, message_id):
        return next((j for j in reversed(self.rows.values()) if j.message_id == message_id), None)

    def latest_done(self, user_id):
        return next((j for j in reversed(self.rows.values())
                     if j.user_id == user_id and j.status == JobStatus.DONE), None)

    def list(self, *, user_id=None, limit=20):
        rows = [j for j in reversed(self.rows.values()) if user_id is None or j.user_id == user_id]
        return rows[:limit]

    def unfinished(self):
        return [j for j in self.rows.values() if not j.status.final]

    def listed(self, *, user_id=None, guild_id=None, sha256=None, source_job_id=None, offset=0, limit=24):
        wanted = {"user_id": user_id, "guild_id": guild_id, "sha256": sha256, "source_job_id": source_job_id}
        rows = [j for j in reversed(self.rows.values())
                if j.status == JobStatus.DONE and j.sha256 and j.public and not j.nsfw_channel
                and not j.spoiler and j.id not in self.hidden and j.id not in self.deleted
                and all(v is None or getattr(j, k) == v for k, v in wanted.items())]
        return rows[offset:offset + limit]

    def hide(self, job_id, actor):
        if job_id not in self.rows:
            return False
        self.hidden.setdefault(job_id, actor)
        return True

    def delete_from_gallery(self, job_id):
        if job_id not in self.rows:
            return False
        self.deleted.add(job_id)
        return True


class MemoryLedger:
    """Balances and reservations in dicts; the same rules as the SQLite ledger's."""

    def __init__(self, allowance_micros: int):
        self.allowance = allowance_micros
        self.terms = Terms(default_allowance_micros=allowance_micros)
        self.alerts: list = []  # what claim_alerts hands out, once
        self.balances: dict[str, int] = {}
        self.held: dict[int, tuple[str, int]] = {}
        self.charged: dict[int, int] = {}
        self.groups: dict[int, str | None] = {}

    def claim_alerts(self, daily_cap_micros, guild_id=None, guild_cap_micros=None):
        given, self.alerts = self.alerts, []
        return given

    def balance(self, user_id, roles=()):
        reserved = sum(a for u, a in self.held.values() if u == user_id)
        return Balance(user_id, self.balances.get(user_id, self.allowance), reserved)

    def reserve(self, user_id, job_id, amount_micros, caps: Caps, provider=None):
        caps = caps or Caps()
        if caps.max_requests:
            others = {self.groups.get(j) or f"job:{j}" for j, (u, _) in self.held.items()
                      if u == user_id and (self.groups.get(j) != caps.group or caps.group is None)}
            if len(others) >= caps.max_requests:
                raise TooManyRequests(len(others), caps.max_requests)
        self.groups[job_id] = caps.group
        b = self.balance(user_id)
        if b.available_micros < amount_micros:
            raise InsufficientFunds(user_id, b.available_micros, amount_micros)
        self.balances.setdefault(user_id, self.allowance)
        self.held[job_id] = (user_id, amount_micros)
        return self.balance(user_id)

    def settle(self, job_id, actual_micros, provider=None):
        if job_id not in self.held:
            return 0
        user, held = self.held.pop(job_id)
        charged = max(0, min(actual_micros, held))
        self.balances[user] -= charged
        self.charged[job_id] = charged
        return charged

    def release(self, job_id):
        return self.held.pop(job_id, None) is not None

    def held_job_ids(self):
        return list(self.held)

    def set_balance(self, user_id, amount_micros, actor=None):
        b = self.balance(user_id)
        return self._adjust(b, amount_micros - b.balance_micros,
                            max(amount_micros, b.reserved_micros) - b.balance_micros, "set")

    def grant(self, user_id, amount_micros, actor=None):
        b = self.balance(user_id)
        return self._adjust(b, amount_micros, max(amount_micros, -max(0, b.available_micros)), "grant")

    def reset(self, user_id, actor=None):
        return self.set_balance(user_id, self.allowance, actor)

    def _adjust(self, b, asked, applied, kind):
        self.balances[b.user_id] = b.balance_micros + applied
        after = self.balance(b.user_id)
        return Adjustment(b.user_id, after.balance_micros, after.reserved_micros, asked, applied, kind)


class MemoryBlobs:
    def __init__(self):
        self.data: dict[str, bytes] = {}

    def put(self, data, ext="png"):
        key = hashlib.sha256(data).hexdigest()
        self.data[key] = data
        return StoredBlob(key=key, url=f"memory://{key}.{ext}", size=len(data))

    def get(self, key, ext="png"):
        return self.data[key]

    def exists(self, key, ext="png"):
        return key in self.data

    def url_for(self, key, ext="png"):
        return f"memory://{key}.{ext}"


class MemoryPreferences:
    def __init__(self):
        self.users_by_id: dict[str, UserSettings] = {}
        self.guilds: dict[str, GuildSettings] = {}

    def user(self, user_id):
        return self.users_by_id.get(user_id, UserSettings(user_id))

    def users(self):
        return list(self.users_by_id.values())

    def set_user(self, settings):
        self.users_by_id[settings.user_id] = settings

    def guild(self, guild_id):
        return self.guilds.get(guild_id, GuildSettings(guild_id))

    def set_guild(self, settings):
        self.guilds[settings.guild_id] = settings


class Rejected(ValueError):
    pass


@dataclass(frozen=True)
class FakeImage:
    width: int
    height: int
    format: str = "FAKE"

    @property
    def image(self):
        return self


def fake_image(width: int, height: int, tag: str = "") -> bytes:
    """Bytes the fake codec reads as a `width`x`height` image."""
    return f"IMG:{width}x{height}:{tag}".encode()


class FakeCodec:
    """Reads `IMG:WxH:...` bytes; anything else is rejected like a non-image."""

    rejected = Rejected

    def decode(self, data, *, max_pixels=None, reject_blank=False):
        m = re.fullmatch(rb"IMG:(\d+)x(\d+):(.*)", data, re.S)
        if not m:
            raise Rejected("not an image")
        return FakeImage(int(m[1]), int(m[2]))

    def to_png(self, decoded, mode=None):
        return fake_image(decoded.width, decoded.height)


class TermScreen:
    """Blocks prompts that contain `term`."""

    def __init__(self, term: str = "forbidden"):
        self.term = term

    def screen_prompt(self, text, *, nsfw_channel=False):
        if self.term in text:
            return Verdict(False, rule="test", reason="the test rule")
        return ALLOWED


class AllowImages:
    def screen_image(self, image, *, nsfw_channel=False):
        return ALLOWED

    def unavailable_reason(self):
        return None


class FixedClock:
    def __init__(self, t: float = 1_750_000_000.0):
        self.t = t

    def time(self):
        return self.t
