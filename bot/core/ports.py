"""What the core needs from the outside world, as small structural interfaces. `storage/`,
`generators/` and `moderation/` implement them; tests use in-memory fakes. Every method here is
synchronous and may block (disk, SQLite, CPU) unless it is `async`: the core calls blocking ones
in a worker thread, never on the event loop."""

from __future__ import annotations

import builtins
from contextlib import AbstractContextManager
from typing import Any, Protocol, runtime_checkable

from .models import (
    Adjustment,
    Balance,
    Caps,
    Enhanced,
    GeneratedImage,
    GenerationRequest,
    GuildSettings,
    JobRecord,
    ModelSpec,
    ModerationEvent,
    ProgressCallback,
    StoredBlob,
    UserSettings,
    Verdict,
)
from .money import LedgerEntry, SpendAlert, Terms


class UnitOfWork(Protocol):
    def transaction(self) -> AbstractContextManager[Any]:
        """Everything inside commits together or not at all (job store and ledger writes join)."""
        ...


class JobStore(Protocol):
    def create(self, **values: Any) -> JobRecord: ...

    def update(self, job_id: int, **values: Any) -> None:
        """Change fields of a job (`params=` replaces its parameters); joins a transaction."""
        ...

    def get(self, job_id: int) -> JobRecord | None: ...

    def by_message(self, message_id: str) -> JobRecord | None: ...

    def latest_done(self, user_id: str) -> JobRecord | None: ...

    def list(self, *, user_id: str | None = None, limit: int = 20) -> builtins.list[JobRecord]: ...

    def unfinished(self) -> builtins.list[JobRecord]: ...

    def listed(
        self,
        *,
        user_id: str | None = None,
        guild_id: str | None = None,
        sha256: str | None = None,
        source_job_id: int | None = None,
        offset: int = 0,
        limit: int = 24,
    ) -> builtins.list[JobRecord]:
        """What the gallery may show, newest first: done jobs with an image, posted where the
        channel sees them (`public`), not from an age-restricted channel, neither hidden nor
        deleted; narrowed by each filter given."""
        ...

    def hide(self, job_id: int, actor: str) -> bool:
        """Take a job out of the gallery (an admin's decision); False if there is no such job."""
        ...

    def delete_from_gallery(self, job_id: int) -> bool:
        """Take a job out of the gallery at its requester's wish; False if there is no such job."""
        ...


class Ledger(Protocol):
    """Balances and reservations; every movement an append-only entry. An allowance refills
    lazily, once per period, on the first call that touches the account in a new period."""

    terms: Terms

    def balance(self, user_id: str, roles: tuple[str, ...] = ()) -> Balance: ...

    def reserve(
        self, user_id: str, job_id: int, amount_micros: int, caps: Caps, provider: str | None = None
    ) -> Balance:
        """Hold the amount, or raise a BudgetRefusal and hold nothing."""
        ...

    def settle(self, job_id: int, actual_micros: int, provider: str | None = None) -> int: ...

    def release(self, job_id: int) -> bool: ...

    def held_job_ids(self) -> list[int]: ...

    def set_balance(
        self, user_id: str, amount_micros: int, actor: str | None = None, reason: str | None = None
    ) -> Adjustment: ...

    def grant(
        self, user_id: str, amount_micros: int, actor: str | None = None, reason: str | None = None
    ) -> Adjustment: ...

    def reset(self, user_id: str, actor: str | None = None, roles: tuple[str, ...] = ()) -> Adjustment: ...

    def set_blocked(
        self, user_id: str, blocked: bool, reason: str | None = None, actor: str | None = None
    ) -> None: ...

    def blocked(self, user_id: str) -> str | None:
        """Why the member is blocked ("" without a reason); None when not blocked."""
        ...

    def history(self, user_id: str, limit: int = 50, before_id: int | None = None) -> list[LedgerEntry]: ...

    def spent_since(self, user_id: str, since: float) -> int: ...

    def top_spenders(
        self, since: float, limit: int = 10, guild_id: str | None = None
    ) -> list[tuple[str, int]]: ...

    def spend_by_provider(self, since: float, guild_id: str | None = None) -> dict[str, int]: ...

    def spend_rows(self, since: float, guild_id: str | None = None) -> list[tuple[Any, ...]]:
        """(user, roles comma-separated, guild, provider, model, closed_at, charged) per paid job."""
        ...

    def claim_alerts(
        self, daily_cap_micros: int, guild_id: str | None = None, guild_cap_micros: int | None = None
    ) -> list[SpendAlert]:
        """Thresholds of the caps that spend reached and no one was told of yet, each once."""
        ...


class BudgetRules(Protocol):
    """Allowances per period set by admins (scope default, role or user) and exemptions."""

    def set_allowance(
        self, scope: str, subject_id: str, amount_micros: int | None, actor: str | None
    ) -> None: ...

    def allowances(self) -> dict[tuple[str, str], int]: ...

    def allowance_of(self, user_id: str, roles: tuple[str, ...], default: int) -> int: ...

    def set_exempt(self, scope: str, subject_id: str, exempt: bool, actor: str | None) -> None: ...

    def exemptions(self) -> list[tuple[str, str]]: ...

    def exempt(self, user_id: str, roles: tuple[str, ...] = ()) -> bool: ...


class BlobStore(Protocol):
    def put(self, data: bytes, ext: str = "png") -> StoredBlob: ...

    def get(self, key: str, ext: str = "png") -> bytes: ...

    def exists(self, key: str, ext: str = "png") -> bool: ...

    def url_for(self, key: str, ext: str = "png") -> str:
        """The URL to show now (a presigned one is made afresh; may block)."""
        ...


class Provenance(Protocol):
    """What every stored image carries: its parameters as metadata and, with a certificate, a
    signed C2PA manifest (the source of an edit or variation as its ingredient)."""

    def stamp(self, data: bytes, job: JobRecord, *, source: bytes | None = None) -> bytes:
        """The bytes to store (blocking: called in a worker thread)."""
        ...

    def unsigned_reason(self) -> str | None:
        """None when images are signed; else why not, for the start-up log."""
        ...


class Preferences(Protocol):
    def user(self, user_id: str) -> UserSettings: ...

    def users(self) -> builtins.list[UserSettings]:
        """Every member's settings that differ from the defaults."""
        ...

    def set_user(self, settings: UserSettings) -> None: ...

    def guild(self, guild_id: str) -> GuildSettings: ...

    def set_guild(self, settings: GuildSettings) -> None: ...


class DecodedImage(Protocol):
    """A fully decoded, checked image; `image` is the codec's own object (a PIL image)."""

    @property
    def width(self) -> int: ...

    @property
    def height(self) -> int: ...

    @property
    def format(self) -> str: ...

    @property
    def image(self) -> Any: ...


class ImageCodec(Protocol):
    """Decoding and checking image bytes from outside; raises `rejected` with a reason."""

    rejected: type[Exception]

    def decode(
        self, data: bytes, *, max_pixels: int | None = None, reject_blank: bool = False
    ) -> DecodedImage: ...

    def to_png(self, decoded: DecodedImage, mode: str | None = None) -> bytes:
        """PNG bytes of the image, converted to `mode` ("RGB", "L") when given."""
        ...

    def extend(self, png: bytes, direction: str) -> tuple[bytes, bytes]:
        """Outpainting: the image on a larger canvas (zoom: 2x around it; left, right, up, down:
        half again that way) and the mask of the new area (white), both PNG."""
        ...

    def composite(self, result: bytes, canvas: bytes, mask: bytes) -> bytes:
        """The result at the canvas's size with the canvas's own pixels put back exactly where
        the mask is black (PNG)."""
        ...


class PromptScreen(Protocol):
    def screen_prompt(self, text: str, *, nsfw_channel: bool = False) -> Verdict: ...


class ImageScreen(Protocol):
    def screen_image(self, image: Any, *, nsfw_channel: bool = False) -> Verdict: ...

    def unavailable_reason(self) -> str | None: ...


class ModerationLog(Protocol):
    def record(self, event: ModerationEvent) -> None: ...

    def recent(
        self, *, user_id: str | None = None, guild_id: str | None = None, limit: int = 50
    ) -> list[ModerationEvent]:
        """Newest first; `guild_id` limits them to one guild's."""
        ...

    def counts(self, since: float) -> dict[str, int]:
        """Blocks per rule since `since`."""
        ...

    def blocks_since(self, user_id: str, since: float) -> int: ...


class Observer(Protocol):
    """What operators watch (metrics): the core reports, an adapter counts."""

    def job_finished(self, job: JobRecord) -> None: ...

    def provider_failed(self, provider: str, kind: str) -> None:
        """One failed call: kind is rate_limited, transient, unavailable, content_policy or error."""
        ...

    def blocked(self, stage: str, category: str) -> None:
        """A moderation block: stage is prompt, upload, output or provider."""
        ...

    def spend_alert(self, alert: SpendAlert) -> None:
        """Spend passed a threshold of a cap (once per threshold and period). Called from a
        worker thread."""
        ...


class NoObserver:
    def job_finished(self, job: JobRecord) -> None:
        pass

    def provider_failed(self, provider: str, kind: str) -> None:
        pass

    def blocked(self, stage: str, category: str) -> None:
        pass

    def spend_alert(self, alert: SpendAlert) -> None:
        pass


class PromptEnhancer(Protocol):
    """Expands a short prompt (subject, style, lighting, composition) with a chat model."""

    @property
    def max_cost_usd(self) -> float:
        """The most one enhancement can cost: what is reserved for it."""
        ...

    async def enhance(self, prompt: str) -> Enhanced:
        """The expanded prompt; raises a GeneratorError when the model cannot give one."""
        ...


class Clock(Protocol):
    def time(self) -> float:
        """Seconds since the epoch (UTC)."""
        ...


@runtime_checkable
class Generator(Protocol):
    """A source of images. `generate` must not block the event loop."""

    provider: str

    def models(self) -> list[ModelSpec]: ...

    def unavailable_reason(self) -> str | None:
        """None when usable; otherwise why not (missing extra, key, files), for `easel check`."""
        ...

    def estimate_cost(self, request: GenerationRequest) -> float:
        """An upper bound, in USD, reserved against the user's budget before the call."""
        ...

    async def generate(
        self, request: GenerationRequest, progress: ProgressCallback | None = None
    ) -> GeneratedImage: ...

    async def close(self) -> None: ...
