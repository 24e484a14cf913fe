"""The request vocabulary every layer speaks: kinds, statuses and error codes, the generation
parameters, what a model can do, jobs, outcomes, verdicts, balances and money.

Pure data, standard library only: the storage, generator and moderation adapters import this
module (and `ports`) and nothing else of `bot`.
"""

from __future__ import annotations

import calendar
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

# The one bound on seeds: inline flags, the CLI, Discord's option ranges and random choice use it.
MAX_SEED = 2**32 - 1


class Kind(StrEnum):
    IMAGINE = "imagine"
    VARIATION = "variation"
    EDIT = "edit"
    UPSCALE = "upscale"


KINDS: tuple[Kind, ...] = tuple(Kind)


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    BLOCKED = "blocked"
    CANCELLED = "cancelled"
    REFUSED = "refused"

    @property
    def final(self) -> bool:
        return self not in (JobStatus.QUEUED, JobStatus.RUNNING)


class ErrorCode(StrEnum):
    """Why a job did not give an image; front ends map each to their own wording."""

    USAGE = "usage"  # the request cannot be served as asked
    NOT_FOUND = "not_found"  # no such job, or not one the requester may use
    FORBIDDEN = "forbidden"  # an admin's action, asked for by someone who is not one
    OVER_BUDGET = "over_budget"
    SPEND_CAP = "spend_cap"  # the server's daily or a guild's period cap
    RATE_LIMITED = "rate_limited"  # images per hour (a member's or a guild's)
    SUSPENDED = "suspended"  # an admin blocked the member from generating
    BUSY = "busy"  # too many jobs in flight
    BLOCKED = "blocked"  # moderation (ours or the provider's)
    FAILED = "failed"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"  # easel stopped before the job finished


class EventState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    PROGRESS = "progress"


def size_text(n: int) -> str:
    """Bytes in binary units, as limits are set: "20 MiB", never "21 MB" for a 20 MiB cap."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            value = n / scale
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{n} bytes"


# ---- money ----------------------------------------------------------------------------------

MICROS_PER_USD = 1_000_000
PERIODS = ("day", "week", "month")


def usd_to_micros(usd: float) -> int:
    return int(round(usd * MICROS_PER_USD))


def micros_to_usd(micros: int) -> float:
    return micros / MICROS_PER_USD


def period_start(period: str, t: float | None = None) -> float:
    """The start (UTC) of the budget period that contains time `t`."""
    t = time.time() if t is None else t
    g = time.gmtime(t)
    day = calendar.timegm((g.tm_year, g.tm_mon, g.tm_mday, 0, 0, 0))
    if period == "day":
        return day
    if period == "week":  # weeks start on Monday
        return day - g.tm_wday * 86400
    if period == "month":
        return calendar.timegm((g.tm_year, g.tm_mon, 1, 0, 0, 0))
    raise ValueError(f"unknown budget period {period!r}; periods: {', '.join(PERIODS)}")


@dataclass(frozen=True)
class Balance:
    user_id: str
    balance_micros: int  # money the user has, with nothing held
    reserved_micros: int  # held for jobs in flight

    @property
    def available_micros(self) -> int:
        return self.balance_micros - self.reserved_micros


# The most an admin may set or grant at once; beyond it an amount is surely a typo.
MAX_ADJUSTMENT_MICROS = 1_000_000 * 1_000_000


@dataclass(frozen=True)
class Adjustment(Balance):
    """A balance after an admin's change, and what the change did. The ledger never takes the
    available balance below zero: a grant that would is limited to what is available, and a
    balance is never set below what running jobs hold."""

    asked_micros: int = 0  # the change to the balance that was asked for
    applied_micros: int = 0  # the change made
    kind: str = "grant"  # or "set", "reset"

    @property
    def limited(self) -> bool:
        return self.applied_micros != self.asked_micros

    def describe(self) -> str:
        def usd(micros: int) -> str:
            return f"${abs(micros) / 1e6:.4f}"

        if self.kind == "reset":
            return f"reset the allowance to a full period's; the balance is {usd(self.balance_micros)}"
        if self.kind == "set":
            text = f"set the balance to {usd(self.balance_micros)}"
            if self.limited:
                asked = self.balance_micros - self.applied_micros + self.asked_micros
                text += f", not {usd(asked)}: {usd(self.reserved_micros)} is held for running jobs"
            return text
        text = f"{'added' if self.applied_micros >= 0 else 'took away'} {usd(self.applied_micros)}"
        if self.limited:
            text += (
                f" of the {usd(self.asked_micros)} asked: only that much was available"
                " (a balance never goes below zero)"
            )
        return text


class BudgetRefusal(Exception):
    """A reservation the ledger refused; nothing was held. `limit` names the limit, `resets_at`
    (when known) says when it lets the request through again; `describe(money)` words it in
    dollars or credits (front ends add the time in their own way)."""

    code = ErrorCode.OVER_BUDGET
    limit = "budget"
    resets_at: float | None = None

    def describe(self, money: Any = None) -> str:
        return str(self)


class TooManyRequests(BudgetRefusal):
    """The user's requests in flight, in any easel process, are at the limit."""

    code = ErrorCode.BUSY
    limit = "requests in flight"

    def __init__(self, in_flight: int, limit: int):
        super().__init__(
            f"you already have {in_flight} request{'' if in_flight == 1 else 's'} in flight "
            f"(the limit is {limit}); wait for one to finish"
        )


def _usd(micros: int) -> str:
    return f"${micros_to_usd(micros):.4f}"


class InsufficientFunds(BudgetRefusal):
    limit = "allowance"

    def __init__(
        self, user_id: str, available_micros: int, needed_micros: int, resets_at: float | None = None
    ):
        self.user_id = user_id
        self.available_micros = available_micros
        self.needed_micros = needed_micros
        self.resets_at = resets_at
        super().__init__(self.describe())

    def describe(self, money: Any = None) -> str:
        text = money.text if money is not None else _usd
        return (
            f"over budget: this costs up to {text(self.needed_micros)} and "
            f"{text(self.available_micros)} is available"
        )


class SpendCapReached(BudgetRefusal):
    code = ErrorCode.SPEND_CAP
    limit = "daily spending cap"

    def __init__(self, cap_micros: int, resets_at: float | None = None):
        self.cap_micros = cap_micros
        self.resets_at = resets_at
        super().__init__(self.describe())

    def describe(self, money: Any = None) -> str:
        cap = money.text(self.cap_micros) if money is not None else f"${micros_to_usd(self.cap_micros):.2f}"
        return f"this server's daily spending cap of {cap} is reached" + (
            "; paid generation resumes at 00:00 UTC" if self.resets_at is None else ""
        )


class GuildCapReached(BudgetRefusal):
    code = ErrorCode.SPEND_CAP
    limit = "server's spending cap"

    def __init__(self, cap_micros: int, resets_at: float | None = None):
        self.cap_micros = cap_micros
        self.resets_at = resets_at
        super().__init__(self.describe())

    def describe(self, money: Any = None) -> str:
        cap = money.text(self.cap_micros) if money is not None else f"${micros_to_usd(self.cap_micros):.2f}"
        return (
            f"this server's spending cap of {cap} for this budget period is reached; ask an admin to raise it"
        )


class RateLimited(BudgetRefusal):
    """Images per hour, a member's or a guild's (a rolling hour)."""

    code = ErrorCode.RATE_LIMITED

    def __init__(self, whose: str, limit: int, resets_at: float):
        self.whose, self.per_hour, self.resets_at = whose, limit, resets_at
        self.limit = f"{whose} images per hour"
        who = "you have" if whose == "your" else "this server has"
        super().__init__(f"{who} made {limit} image{'' if limit == 1 else 's'} in the last hour, the limit")


class ImageLimitReached(BudgetRefusal):
    """Free local images are counted, not charged: this many per period."""

    limit = "free images per period"

    def __init__(self, limit: int, resets_at: float):
        self.count, self.resets_at = limit, resets_at
        super().__init__(f"you have made your {limit} free image{'' if limit == 1 else 's'} for this period")


class MemberBlocked(BudgetRefusal):
    """An admin blocked the member; `reason` is for admins, not shown to the member."""

    code = ErrorCode.SUSPENDED
    limit = "blocked"

    def __init__(self, reason: str | None = None):
        self.reason = reason
        super().__init__("an admin has blocked you from generating images")


@dataclass(frozen=True)
class Caps:
    """The limits a reservation must fit besides the user's balance."""

    paid: bool = False  # money really spent with a provider: the daily cap applies
    daily_cap_micros: int = 0  # 0: no cap
    day_start: float = 0.0
    guild_id: str | None = None
    guild_cap_micros: int | None = None
    period_start: float = 0.0
    # Requests a user may have holding money at once, counted in the database, so that the
    # limit holds across processes (the bot and the CLI); 0: none. Jobs of one group count once.
    max_requests: int = 0
    group: str | None = None
    # The member's roles (their allowance is the most generous role's; a role can be exempt).
    roles: tuple[str, ...] = ()
    # Images per rolling hour, per member and per guild; 0: no limit.
    user_images_per_hour: int = 0
    guild_images_per_hour: int = 0
    # A free local image, counted against `images_per_period` rather than charged.
    counted: bool = False
    images_per_period: int = 0
    # When the limits above lift (for the refusal): the guild's period and the UTC day end.
    period_end: float | None = None
    day_end: float | None = None


# ---- generation -----------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerationParams:
    """What an image is made from. A request carries what was asked (None: not given); the
    planner fills it in; the generator request and the stored job embed the result."""

    prompt: str = ""
    negative_prompt: str | None = None
    seed: int | None = None
    size: tuple[int, int] | None = None
    steps: int | None = None
    guidance: float | None = None
    strength: float | None = None
    model: str | None = None
    # Model-specific settings (quality, style, sampler, ...), checked against ModelSpec.options.
    options: Mapping[str, str] = field(default_factory=dict)

    @property
    def width(self) -> int | None:
        return self.size[0] if self.size else None

    @property
    def height(self) -> int | None:
        return self.size[1] if self.size else None

    def but(self, **changes: Any) -> GenerationParams:
        return replace(self, **changes)


# Called from any thread with the fraction done (0..1) and, where available, a PNG preview.
ProgressCallback = Callable[[float, "bytes | None"], None]


class GeneratorError(Exception):
    """A generation failed. `transient` errors may succeed if retried."""

    transient = False


class TransientGeneratorError(GeneratorError):
    """Timeouts, rate limits, 5xx: worth retrying, perhaps after `retry_after` seconds."""

    transient = True

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class ContentPolicyError(GeneratorError):
    """The provider refused the prompt or image on content grounds. Never retried."""


class UnsupportedRequest(GeneratorError):
    """The model cannot serve this request (kind, size, seed, ...). Raised before spending."""


class GeneratorUnavailable(GeneratorError):
    """The generator cannot run here (missing extra, missing API key, no model files)."""


@dataclass(frozen=True)
class GenerationRequest:
    """One image to make, with resolved parameters (size and model set; the seed set unless the
    model cannot honour one). Images travel as validated PNG bytes."""

    kind: Kind
    params: GenerationParams
    source_image: bytes | None = None
    mask_image: bytes | None = None  # same size as source_image; white is repainted, black kept
    upscale_factor: int = 2
    control_image: bytes | None = None  # what a ControlNet follows (options "control", "control_scale")

    # Read-through names, so generators read `request.prompt` rather than `request.params.prompt`.
    @property
    def model(self) -> str:
        return self.params.model or ""

    @property
    def prompt(self) -> str:
        return self.params.prompt

    @property
    def negative_prompt(self) -> str | None:
        return self.params.negative_prompt

    @property
    def seed(self) -> int | None:
        return self.params.seed

    @property
    def width(self) -> int:
        return self.params.width or 0

    @property
    def height(self) -> int:
        return self.params.height or 0

    @property
    def steps(self) -> int | None:
        return self.params.steps

    @property
    def guidance(self) -> float | None:
        return self.params.guidance

    @property
    def strength(self) -> float | None:
        return self.params.strength

    @property
    def options(self) -> Mapping[str, str]:
        return self.params.options

    def for_model(self, model: str) -> GenerationRequest:
        return replace(self, params=self.params.but(model=model))


@dataclass(frozen=True)
class GeneratedImage:
    """One result. `seed` is None when the model cannot reproduce it from a seed."""

    data: bytes
    width: int
    height: int
    model: str
    provider: str
    seed: int | None
    cost_usd: float | None = None  # what the provider will bill, where known; else the estimate
    revised_prompt: str | None = None
    note: str | None = None  # e.g. how an upscale was made
    format: str = "png"


# Options that name LoRAs and a ControlNet: checked against ModelSpec.loras and .controlnets.
LORA_OPTION, CONTROL_OPTION, CONTROL_SCALE_OPTION = "lora", "control", "control_scale"
CONTROL_OPTIONS = (LORA_OPTION, CONTROL_OPTION, CONTROL_SCALE_OPTION)
MAX_LORAS = 3
LORA_WEIGHTS = (-2.0, 2.0)
CONTROL_SCALES = (0.0, 2.0)


def parse_loras(text: str) -> tuple[tuple[str, float | None], ...]:
    """'detail:0.8,ink' -> (('detail', 0.8), ('ink', None)): None takes the LoRA's own default."""
    loras: list[tuple[str, float | None]] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, weight = part.partition(":")
        if not name.replace("-", "").replace("_", "").replace(".", "").isalnum() or len(name) > 40:
            raise UnsupportedRequest(f"a LoRA is given as NAME or NAME:WEIGHT, not {part!r}")
        value = None
        if weight:
            try:
                value = float(weight)
            except ValueError:
                raise UnsupportedRequest(f"the LoRA weight in {part!r} is not a number") from None
            if not LORA_WEIGHTS[0] <= value <= LORA_WEIGHTS[1]:
                raise UnsupportedRequest(
                    f"a LoRA weight must be {LORA_WEIGHTS[0]:g} to {LORA_WEIGHTS[1]:g}, not {weight}"
                )
        if name in (n for n, _ in loras):
            raise UnsupportedRequest(f"the LoRA {name!r} is given twice")
        loras.append((name, value))
    if len(loras) > MAX_LORAS:
        raise UnsupportedRequest(f"at most {MAX_LORAS} LoRAs per image, not {len(loras)}")
    return tuple(loras)


@dataclass(frozen=True)
class ModelSpec:
    """What one model can do. `sizes` None means any size within `max_side`, in steps of `size_step`."""

    name: str
    provider: str
    kinds: frozenset[str]
    honours_seed: bool = True
    negative_prompt: bool = True
    sizes: tuple[tuple[int, int], ...] | None = None
    max_side: int = 2048
    min_side: int = 64
    size_step: int = 8
    max_prompt_chars: int = 2000
    default_size: tuple[int, int] = (512, 512)
    aliases: tuple[str, ...] = ()
    description: str = ""
    # The architecture (sd1, sd2, sdxl, sdxl-turbo, flux...), for defaults such as negative prompts.
    family: str = ""
    # The guidance scale used when a request gives none (None: the provider's own, unknown here).
    default_guidance: float | None = None
    # Options a request may set (quality, style, sampler...) and their allowed values; the first
    # is the default.
    options: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    # The inference steps and guidance scale a request may set; None: the model takes none.
    steps: tuple[int, int] | None = (1, 200)
    guidance: tuple[float, float] | None = (0.0, 30.0)
    # The LoRAs and ControlNets a request may name (options "lora" and "control").
    loras: tuple[str, ...] = ()
    controlnets: tuple[str, ...] = ()

    def check(self, request: GenerationRequest) -> None:
        """Raise UnsupportedRequest, with a message a user can act on, if this model cannot serve it."""
        if request.kind not in self.kinds:
            can = ", ".join(k for k in KINDS if k in self.kinds)
            raise UnsupportedRequest(f"{self.name} cannot do {request.kind} (it can do: {can})")
        if request.seed is not None and not self.honours_seed:
            raise UnsupportedRequest(
                f"{self.name} does not take a seed; use a model that does (for example a Flux or "
                f"local model) for a reproducible image"
            )
        if request.negative_prompt and not self.negative_prompt:
            raise UnsupportedRequest(f"{self.name} does not take a negative prompt (--no)")
        if len(request.prompt) > self.max_prompt_chars:
            raise UnsupportedRequest(
                f"the prompt is {len(request.prompt)} characters; {self.name} takes at most "
                f"{self.max_prompt_chars}"
            )
        self._check_ranges(request)
        self._check_options({k: v for k, v in request.options.items() if k not in CONTROL_OPTIONS})
        self._check_control(request)
        if request.kind != Kind.UPSCALE:  # an upscale's size follows from the source image
            self._check_size(request.width, request.height)

    def _check_ranges(self, request: GenerationRequest) -> None:
        for setting, value, allowed in (
            ("steps", request.steps, self.steps),
            ("guidance", request.guidance, self.guidance),
        ):
            if value is None:
                continue
            if allowed is None:
                raise UnsupportedRequest(f"{self.name} takes no {setting}")
            if not allowed[0] <= value <= allowed[1]:
                raise UnsupportedRequest(
                    f"{self.name} takes {setting} {allowed[0]:g}-{allowed[1]:g}, not {value:g}"
                )

    def _check_options(self, options: Mapping[str, str]) -> None:
        for key, value in options.items():
            if key not in self.options:
                known = "; ".join(f"{k}: {'|'.join(v)}" for k, v in self.options.items())
                raise UnsupportedRequest(
                    f"{self.name} has no option {key!r}" + (f" (its options: {known})" if known else "")
                )
            if value not in self.options[key]:
                raise UnsupportedRequest(
                    f"{self.name} {key} must be one of {', '.join(self.options[key])}, not {value!r}"
                )

    def _check_control(self, request: GenerationRequest) -> None:
        options = request.options
        for name, _ in parse_loras(options.get(LORA_OPTION, "")):
            if name not in self.loras:
                known = ", ".join(self.loras) or "none is configured"
                raise UnsupportedRequest(f"{self.name} has no LoRA {name!r} (its LoRAs: {known})")
        control = options.get(CONTROL_OPTION)
        if control is not None and control not in self.controlnets:
            known = ", ".join(self.controlnets) or "none is configured"
            raise UnsupportedRequest(f"{self.name} has no ControlNet {control!r} (its ControlNets: {known})")
        if control is not None and request.control_image is None:
            raise UnsupportedRequest(f"the ControlNet {control!r} needs a control image")
        if control is None and (request.control_image is not None or CONTROL_SCALE_OPTION in options):
            raise UnsupportedRequest("a control image or scale needs a ControlNet (--control NAME)")
        scale = options.get(CONTROL_SCALE_OPTION)
        if scale is not None:
            try:
                value = float(scale)
            except ValueError:
                value = -1.0
            if not CONTROL_SCALES[0] <= value <= CONTROL_SCALES[1]:
                raise UnsupportedRequest(
                    f"the control scale must be {CONTROL_SCALES[0]:g} to {CONTROL_SCALES[1]:g}, not {scale!r}"
                )

    def _check_size(self, w: int, h: int) -> None:
        if self.sizes is not None:
            if (w, h) not in self.sizes:
                options = ", ".join(f"{a}x{b}" for a, b in self.sizes)
                raise UnsupportedRequest(f"{self.name} cannot make {w}x{h}; sizes it makes: {options}")
            return
        for side in (w, h):
            if side < self.min_side or side > self.max_side or side % self.size_step:
                raise UnsupportedRequest(
                    f"{self.name} cannot make {w}x{h}: each side must be {self.min_side}-"
                    f"{self.max_side} and a multiple of {self.size_step}"
                )


# ---- jobs -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Requester:
    """Who asks, and where: the user pays; the channel decides what may be shown."""

    user_id: str
    guild_id: str | None = None
    channel_id: str | None = None
    nsfw_channel: bool = False
    roles: tuple[str, ...] = ()  # the member's role ids (allowances and exemptions go by them)


@dataclass(frozen=True)
class JobRequest:
    """What a front end asks for. `params.prompt` may carry inline flags."""

    kind: Kind
    requester: Requester
    params: GenerationParams = field(default_factory=GenerationParams)
    aspect: tuple[int, int] | None = None
    source_job_id: int | None = None
    image: bytes | None = None  # an uploaded image (edit, or variation of an upload)
    mask: bytes | None = None
    # Jobs of one request (the images of one /imagine count=4) share a group: together they
    # count as one against the per-user limit of jobs in flight.
    group: str | None = None
    # The member's own defaults, for a model (imagine, edit) or an aspect (imagine) that neither
    # the options nor the prompt's flags give.
    defaults: UserSettings | None = None
    enhance: bool | None = None  # expand the prompt with a chat model first (None: as the flags say)
    # Outpainting an earlier result (an edit of its extended canvas): "zoom" (out, 2x), or a pan
    # "left", "right", "up", "down" (the canvas grows by half the image that way).
    outpaint: str | None = None

    @property
    def user_id(self) -> str:
        return self.requester.user_id


@dataclass(frozen=True)
class JobRecord:
    """A job as stored: who asked, the parameters it was made with, its state and result."""

    id: int
    kind: Kind
    status: JobStatus
    user_id: str
    params: GenerationParams = field(default_factory=GenerationParams)
    guild_id: str | None = None
    channel_id: str | None = None
    nsfw_channel: bool = False
    provider: str | None = None
    source_job_id: int | None = None
    estimate_micros: int = 0
    cost_micros: int = 0
    sha256: str | None = None
    image_url: str | None = None
    revised_prompt: str | None = None
    note: str | None = None
    error: str | None = None
    error_code: ErrorCode | None = None
    timings: Mapping[str, float] = field(default_factory=dict)
    message_id: str | None = None
    public: bool = False  # posted where the channel sees it (see core.access)
    original_prompt: str | None = None  # the prompt as typed, when it was enhanced
    outpaint: str | None = None  # zoom, left, right, up or down: an outpainting of source_job_id
    spoiler: bool = False  # to be shown as a spoiler (an age-restricted channel's policy)
    owner: str | None = None  # the process running the job (see core.recovery)
    source_sha256: str | None = None  # an uploaded input image, kept in the blob store
    mask_sha256: str | None = None
    created_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None

    @property
    def prompt(self) -> str:
        return self.params.prompt

    @property
    def negative_prompt(self) -> str | None:
        return self.params.negative_prompt

    @property
    def seed(self) -> int | None:
        return self.params.seed

    @property
    def model(self) -> str | None:
        return self.params.model

    @property
    def width(self) -> int | None:
        return self.params.width

    @property
    def height(self) -> int | None:
        return self.params.height

    @property
    def steps(self) -> int | None:
        return self.params.steps

    @property
    def guidance(self) -> float | None:
        return self.params.guidance

    @property
    def strength(self) -> float | None:
        return self.params.strength

    @property
    def options(self) -> Mapping[str, str]:
        return self.params.options

    @property
    def requester(self) -> Requester:
        return Requester(self.user_id, self.guild_id, self.channel_id, self.nsfw_channel)


@dataclass(frozen=True)
class JobEvent:
    job_id: int
    state: EventState
    position: int | None = None
    fraction: float | None = None
    preview: bytes | None = None
    eta_s: float | None = None  # a queued job: seconds until it is done, from recent times


EventSink = Callable[[JobEvent], None]


@dataclass(frozen=True)
class QueueEntry:
    """A job holding or waiting for a generator slot, as /queue shows it."""

    job_id: int
    user_id: str
    provider: str
    model: str | None
    position: int | None  # None: running
    eta_s: float | None = None


@dataclass(frozen=True)
class JobOutcome:
    status: JobStatus
    job: JobRecord | None = None
    error: str | None = None
    error_code: ErrorCode | None = None
    image_path: str | None = None
    balance_usd: float | None = None
    retry_at: float | None = None  # a budget refusal: when the limit lifts, where known

    @property
    def ok(self) -> bool:
        return self.status == JobStatus.DONE

    def as_dict(self) -> dict[str, Any]:
        job = self.job
        return {
            "job_id": job.id if job else None,
            "status": str(self.status),
            "seed": job.seed if job else None,
            "model": job.model if job else None,
            "provider": job.provider if job else None,
            "width": job.width if job else None,
            "height": job.height if job else None,
            "cost_usd": micros_to_usd(job.cost_micros) if job else 0.0,
            "sha256": job.sha256 if job else None,
            "image_path": self.image_path,
            "image_url": job.image_url if job else None,
            "error": self.error,
            "error_code": str(self.error_code) if self.error_code else None,
            "retry_at": self.retry_at,
        }


class StoreFailed(Exception):
    """The image store could not keep an image (after its own retries); the message says why,
    with no secret in it. The job fails and is refunded."""


class Refusal(Exception):
    """A request turned down before or while it runs; the message is for the user."""

    def __init__(self, code: ErrorCode, message: str, status: JobStatus = JobStatus.REFUSED):
        super().__init__(message)
        self.code = code
        self.status = status


class Blocked(Refusal):
    """A moderation block, with what decided it (for the moderation log; never shown as is)."""

    def __init__(self, message: str, *, stage: str, rule: str, score: float | None = None):
        super().__init__(ErrorCode.BLOCKED, message, JobStatus.BLOCKED)
        self.stage, self.rule, self.score = stage, rule, score
        self.review_sha256: str | None = None  # set when the blocked output is kept for review


# ---- moderation, storage, preferences -------------------------------------------------------


@dataclass(frozen=True)
class ModerationEvent:
    """One moderation decision: who, where, at which stage, what decided it."""

    user_id: str
    stage: str  # prompt, upload, output or provider
    rule: str  # the category or rule; for the provider, its name
    guild_id: str | None = None
    channel_id: str | None = None
    job_id: int | None = None
    score: float | None = None
    prompt: str | None = None  # only when the settings keep prompts (moderation.log_prompts)
    created_at: float = 0.0
    review_sha256: str | None = None  # a blocked output kept for review, in the review store


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    rule: str | None = None  # the rule that blocked it; None when allowed
    # For the user: names the rule, never repeats the offending words.
    reason: str | None = None
    # Image screens: the highest classifier score among blocked labels, for tuning the threshold.
    score: float | None = None


ALLOWED = Verdict(allowed=True)


@dataclass(frozen=True)
class StoredBlob:
    key: str  # sha256 of the bytes, hex
    url: str
    size: int
    path: Path | None = None  # where it lies on this machine, for stores that have one


@dataclass(frozen=True)
class Enhanced:
    """A prompt as a chat model expanded it, and what that cost."""

    prompt: str
    cost_usd: float = 0.0


@dataclass(frozen=True)
class UserSettings:
    user_id: str
    model: str | None = None
    aspect: str | None = None
    private: bool = False
    enhance: bool = False  # enhance every prompt of this member (imagine)
    tipped_at: float = 0.0  # when this member last got a tip for a short prompt
    remix: bool = False  # vary and reroll buttons open a modal to edit the prompt first


@dataclass(frozen=True)
class GuildSettings:
    guild_id: str
    default_model: str | None = None
    spend_cap_micros: int | None = None  # per budget period; None: no cap
    tips: bool = True  # tips for short prompts
