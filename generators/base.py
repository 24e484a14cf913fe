"""The generator interface: what every image generator (local or cloud) takes and returns.

A generator serves one or more models. Each model declares what it can do (`ModelSpec`), so a
request it cannot serve is refused before any money is reserved.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal, Mapping, Protocol, runtime_checkable

Kind = Literal["imagine", "variation", "edit", "upscale"]
KINDS: tuple[Kind, ...] = ("imagine", "variation", "edit", "upscale")

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
    # Options a request may set (quality, style, ...) and their allowed values; the first is the
    # default.
    options: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    # The inference steps and guidance scale a request may set; None: the model takes none.
    steps: tuple[int, int] | None = (1, 200)
    guidance: tuple[float, float] | None = (0.0, 30.0)

    def check(self, request: "GenerationRequest") -> None:
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
        for setting, value, allowed in (("steps", request.steps, self.steps),
                                        ("guidance", request.guidance, self.guidance)):
            if value is None:
                continue
            if allowed is None:
                raise UnsupportedRequest(f"{self.name} takes no {setting}")
            if not allowed[0] <= value <= allowed[1]:
                raise UnsupportedRequest(
                    f"{self.name} takes {setting} {allowed[0]:g}-{allowed[1]:g}, not {value:g}"
                )
        for key, value in request.options.items():
            if key not in self.options:
                known = "; ".join(f"{k}: {'|'.join(v)}" for k, v in self.options.items())
                raise UnsupportedRequest(
                    f"{self.name} has no option {key!r}" + (f" (its options: {known})" if known else "")
                )
            if value not in self.options[key]:
                raise UnsupportedRequest(
                    f"{self.name} {key} must be one of {', '.join(self.options[key])}, not {value!r}"
                )
        if request.kind == "upscale":
            return  # the output size follows from the source image
        w, h = request.width, request.height
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


@dataclass(frozen=True)
class GenerationRequest:
    """One image to make. Images travel as encoded bytes (PNG), already validated by the caller."""

    kind: str
    model: str
    prompt: str
    width: int
    height: int
    negative_prompt: str | None = None
    seed: int | None = None  # None only for models that do not honour seeds
    steps: int | None = None
    guidance: float | None = None
    source_image: bytes | None = None
    mask_image: bytes | None = None  # same size as source_image; white is repainted, black kept
    strength: float | None = None
    upscale_factor: int = 2
    options: dict[str, str] = field(default_factory=dict)  # provider-specific: quality, style, ...


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


@runtime_checkable
class Generator(Protocol):
    """A source of images. `generate` must not block the event loop."""

    provider: str

    def models(self) -> list[ModelSpec]: ...

    def unavailable_reason(self) -> str | None:
        """None when usable; otherwise why not (missing extra, key, files), for `easel check`."""

    def estimate_cost(self, request: GenerationRequest) -> float:
        """An upper bound, in USD, reserved against the user's budget before the call."""

    async def generate(
        self, request: GenerationRequest, progress: ProgressCallback | None = None
    ) -> GeneratedImage: ...

    async def close(self) -> None: ...
