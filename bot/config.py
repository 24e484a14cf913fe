"""Settings: one TOML file and `EASEL_*` environment variables, validated at start-up into frozen
pydantic models.

Where the file comes from: `--config PATH`, else `$EASEL_CONFIG`, else `./easel.toml`, else the
built-in defaults. Any key can also be set by an environment variable `EASEL_<SECTION>__<KEY>`
(`EASEL_SERVER__PORT=9000`, `EASEL_GENERATORS__OPENAI__TIMEOUT_S=30`; lists and tables as JSON),
which wins over the file. Values passed to `settings_from_dict` win over both. Relative paths
are relative to the file's folder (to the current folder when there is no file). An unknown
key, a wrong type or an impossible value raises ConfigError with one line that names the key
(or the variable) and the file (or "environment").

Secrets are never settings: the file names the environment variable that holds each one, and it
is read only when asked for (`api_key()`, `token()`), so it is in no repr and no error.

GENERATORS is the one list of generators: their `[generators.<name>]` tables, their classes
(imported only when built), their constructor arguments (`generator_kwargs`) and their queue
limits (`queue_limits`) all come from it.
"""
from __future__ import annotations

import difflib
import errno
import importlib
import json
import os
import re
import socket
import tomllib
import types
import typing
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, NamedTuple

from pydantic import (
    AfterValidator,
    AllowInfNan,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    Strict,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    create_model,
    model_validator,
)
from pydantic_core import PydanticCustomError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict


class ConfigError(Exception):
    """A bad setting; the message is one line that names the key and the file."""


# --- value types and rules --------------------------------------------------------------------
# Strict: a TOML string is never read as a number, nor true as 1. Numbers accept integers.

Int = StrictInt
Str = StrictStr
Bool = StrictBool
Number = Annotated[float, Strict(), AllowInfNan(False)]
Strings = tuple[StrictStr, ...]  # a TOML list of strings, kept immutable

_RULE = "easel_rule"


def _rule(ok: Callable[[Any], bool], message: str) -> AfterValidator:
    """A check on an already well-typed value; `message` follows the key: "'server.port' <message>"."""

    def check(value: Any) -> Any:
        if not ok(value):
            raise PydanticCustomError(_RULE, message)
        return value

    return AfterValidator(check)


def _one_of(*choices: str, message: str) -> AfterValidator:
    return _rule(lambda v: v in choices, message)


_POSITIVE = _rule(lambda v: v > 0, "must be positive")
_NOT_NEGATIVE = _rule(lambda v: v >= 0, "cannot be negative")
_AT_LEAST_1 = _rule(lambda v: v >= 1, "must be at least 1")
_HTTP = ("http://", "https://")

EnvName = Annotated[Str, _rule(lambda v: bool(v.strip()), "must name an environment variable")]
Seconds = Annotated[Number, _POSITIVE]
Concurrency = Annotated[Int, _AT_LEAST_1]


class _Section(BaseModel):
    """A `[section]` table: frozen once loaded; a key it does not know is an error."""

    model_config = ConfigDict(frozen=True, extra="forbid")


# --- sections ---------------------------------------------------------------------------------


class S3Settings(_Section):
    """`[storage.s3]`: any S3-compatible bucket (AWS S3, Cloudflare R2, MinIO, Backblaze B2).
    Credentials are no settings: boto3 reads them from the environment (AWS_ACCESS_KEY_ID and
    AWS_SECRET_ACCESS_KEY, AWS_PROFILE, an instance role)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    bucket: Str = ""
    # Objects go to <prefix>/<ab>/<sha256>.png; empty: at the bucket's top.
    prefix: Annotated[Str, _rule(lambda v: ".." not in v.split("/"), "cannot contain '..'")] = "images"
    region: Str = ""  # empty: boto3's own (AWS_REGION, AWS_DEFAULT_REGION, ~/.aws/config)
    # Empty: AWS S3 itself; else the service's endpoint, e.g. https://<account>.r2.cloudflarestorage.com.
    endpoint_url: Annotated[Str, _rule(lambda v: not v or v.startswith(_HTTP), "must start with http:// or https://")] = ""
    # A CDN or public bucket address in front of the objects (URL = base + "/" + object name);
    # empty: presigned GETs, made afresh whenever a URL is shown, valid for presign_ttl_s.
    public_base_url: Annotated[Str, _rule(lambda v: not v or v.startswith(_HTTP), "must start with http:// or https://")] = ""
    presign_ttl_s: Annotated[Int, _rule(lambda v: 60 <= v <= 604800, "must be 60-604800 (seconds; 7 days at most)")] = 3600


def _s3_for_backend(s3: S3Settings, info: Any) -> S3Settings:
    if info.data.get("backend") == "s3" and not s3.bucket.strip():
        raise PydanticCustomError(_RULE, 'needs a bucket when storage.backend is "s3": set storage.s3.bucket')
    return s3


class StorageSettings(_Section):
    model_config = ConfigDict(frozen=True, extra="forbid")

    database: Str = "data/easel.db"
    images_dir: Str = "data/images"
    # The address at which `easel serve` (or `easel run`) is reachable; image URLs are built on it.
    public_url: Annotated[Str, _rule(lambda v: v.startswith(_HTTP), "must start with http:// or https://")] = (
        "http://127.0.0.1:8080"
    )
    # Where images are kept: "local" (images_dir, served by `easel serve`) or "s3" ([storage.s3]).
    backend: Annotated[Str, _one_of("local", "s3", message='must be "local" or "s3"')] = "local"
    s3: Annotated[S3Settings, AfterValidator(_s3_for_backend)] = Field(
        default_factory=S3Settings, validate_default=True)


class ServerSettings(_Section):
    model_config = ConfigDict(frozen=True, extra="forbid")

    host: Str = "127.0.0.1"
    port: Annotated[Int, _rule(lambda v: 0 < v < 65536, "must be 1-65535")] = 8080
    # One log line per HTTP request (aiohttp's access log); off behind a CDN or a proxy that logs.
    access_log: Bool = True


class GenerationSettings(_Section):
    model_config = ConfigDict(frozen=True, extra="forbid")

    default_model: Str = "tiny"
    max_prompt_chars: Annotated[Int, _rule(lambda v: 1 <= v <= 100_000, "must be 1-100000")] = 2000
    # Variations: how far from the source (0 keeps it, 1 ignores it). The one default for it.
    default_strength: Annotated[Number, _rule(lambda v: 0.0 < v <= 1.0, "must be in (0, 1]")] = 0.6
    upscale_factor: Annotated[Int, _rule(lambda v: v in (2, 4), "must be 2 or 4")] = 2
    job_timeout_s: Seconds = 600.0
    max_upload_bytes: Annotated[Int, _POSITIVE] = 20 * 1024 * 1024
    max_upload_pixels: Annotated[Int, _POSITIVE] = 40_000_000


class QueueSettings(_Section):
    model_config = ConfigDict(frozen=True, extra="forbid")

    max_jobs_per_user: Annotated[Int, _AT_LEAST_1] = 2  # queued or running; more are refused


_AT_MOST_A_MILLION = _rule(lambda v: v <= 1_000_000, "must be at most 1000000 (USD)")


def _is_term(term: str) -> bool:
    return any(c.isalnum() for c in term.removesuffix("*"))


class BudgetSettings(_Section):
    model_config = ConfigDict(frozen=True, extra="forbid")

    # Each member's allowance per period; it refills at each period boundary (admins can set
    # one per role and per member, and grant credit on top, which never lapses).
    default_allowance_usd: Annotated[Number, _NOT_NEGATIVE, _AT_MOST_A_MILLION] = 1.0
    # The period allowances refill over, and spend reports and guild caps count over: day, week
    # or month (UTC).
    period: Annotated[Str, _one_of("day", "week", "month", message="must be day, week or month")] = "month"
    # How much unspent allowance carries over into the next period; 0 = it lapses.
    carry_over_cap_usd: Annotated[Number, _NOT_NEGATIVE, _AT_MOST_A_MILLION] = 0.0
    # Stops all paid (cloud) generation once this much was spent today (UTC); 0 = no cap.
    daily_spend_cap_usd: Annotated[Number, _NOT_NEGATIVE, _AT_MOST_A_MILLION] = 0.0
    # A guild's spending cap per period, where its admins set none (/budget guild-cap); 0 = none.
    guild_cap_usd: Annotated[Number, _NOT_NEGATIVE, _AT_MOST_A_MILLION] = 0.0
    # Images per rolling hour, per member and per guild; 0 = no limit.
    user_images_per_hour: Annotated[Int, _rule(lambda v: 0 <= v <= 100_000, "must be 0-100000")] = 0
    guild_images_per_hour: Annotated[Int, _rule(lambda v: 0 <= v <= 1_000_000, "must be 0-1000000")] = 0
    # Local images free but counted: this many per member and period (0 = they cost money like
    # any other, at generators.local.price_per_second_usd).
    free_local_images: Annotated[Int, _rule(lambda v: 0 <= v <= 1_000_000, "must be 0-1000000")] = 0
    # Show amounts as credits of this many USD each (e.g. 0.01); 0 = show dollars.
    credit_usd: Annotated[Number, _NOT_NEGATIVE, _AT_MOST_A_MILLION] = 0.0


class PromptRuleSettings(_Section):
    model_config = ConfigDict(frozen=True, extra="forbid")

    # A term ending in * matches words that begin with it; a term must have a letter or digit.
    terms: Annotated[Strings, _rule(lambda v: all(_is_term(t) for t in v),
                                    "every term needs a letter or digit (an empty or '*' term would match everything)")] = ()
    allow_in_nsfw_channels: Bool = False


class ModerationSettings(_Section):
    model_config = ConfigDict(frozen=True, extra="forbid")

    # "nudenet", or "none" to turn image screening off
    image_classifier: Annotated[Str, _one_of("nudenet", "none", message='must be "nudenet" or "none"')] = "nudenet"
    nsfw_threshold: Annotated[Number, _rule(lambda v: 0.0 < v < 1.0, "must be between 0 and 1")] = 0.5
    # age-restricted channels: "allow" nudity there, or "block" everywhere
    nsfw_channels: Annotated[Str, _one_of("allow", "block", message='must be "allow" or "block"')] = "allow"
    blocked_outputs_are_paid: Bool = False
    # More image screens, run after nudenet (the first block wins): a transformers
    # image-classification model (a folder or hub id) with the labels it blocks and their score
    # thresholds, e.g. {"nsfw" = 0.8}; and diffusers' Stable Diffusion safety checker (a folder).
    classifier_model: Str = ""
    classifier_labels: dict[Str, Annotated[Number, _rule(lambda v: 0 < v <= 1, "must be above 0 and at most 1")]] = Field(
        default_factory=dict)
    safety_checker: Str = ""
    # Age-restricted channels, per category (a screen's rule, e.g. "nudity", "nsfw"): "allow",
    # "spoiler" or "block"; categories not named follow nsfw_channels. Minors: never allowed.
    nsfw_policy: dict[Str, Annotated[Str, _one_of("allow", "spoiler", "block", message='must be "allow", "spoiler" or "block"')]] = Field(
        default_factory=dict)
    # None: the built-in rules (moderation.DEFAULT_PROMPT_RULES). A table replaces them; the
    # rules on child sexual content and on minors with sexual or suggestive terms always apply.
    prompt_rules: dict[Str, PromptRuleSettings] | None = None
    # Names whose likeness is not drawn (the "likeness" rule), e.g. ["Jane Doe"].
    real_people: Strings = ()
    # A semantic screen after the term rules (needs the semantic extra; ~100 ms a prompt on a
    # small CPU): a sentence-embedding model compares each prompt with category examples, to
    # catch paraphrases the lists miss. Thresholds per category override the defaults.
    semantic: Bool = False
    semantic_thresholds: dict[Str, Annotated[Number, _rule(lambda v: 0 < v < 1, "must be between 0 and 1")]] = Field(
        default_factory=dict)
    # The moderation log keeps who, where and why; the prompt text only with this on.
    log_prompts: Bool = False
    # After this many blocked requests within cooldown_window_s, a member waits cooldown_s from
    # the last one; 0: no cool-down.
    cooldown_after: Annotated[Int, _rule(lambda v: 0 <= v <= 100, "must be 0-100")] = 3
    cooldown_window_s: Seconds = 600.0
    cooldown_s: Seconds = 900.0
    # Keep blocked outputs for admins to review, in review_dir: never served by the image server.
    keep_blocked_outputs: Bool = False
    review_dir: Str = "data/review"


# --- generators -------------------------------------------------------------------------------


class LocalGeneratorSettings(_Section):
    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: Bool = True
    # name -> source: "tiny" (a small random-weight model built offline), a folder, or a hub id.
    models: Annotated[dict[Str, Str], _rule(bool, "cannot be empty")] = Field(
        default_factory=lambda: {"tiny": "tiny"})
    device: Annotated[Str, _one_of("auto", "cuda", "mps", "cpu", message="must be auto, cuda, mps or cpu")] = "auto"
    dtype: Annotated[Str, _one_of("auto", "float16", "bfloat16", "float32",
                                  message="must be auto, float16, bfloat16 or float32")] = "auto"
    steps: Annotated[Int, _rule(lambda v: 1 <= v <= 200, "must be 1-200")] = 4
    guidance: Number = 0.0
    max_concurrent: Concurrency = 1
    price_per_second_usd: Annotated[Number, _NOT_NEGATIVE] = 0.001  # what a second of this machine costs a user
    upscaler: Str = ""  # a diffusers upscaler folder or id; empty: Lanczos resampling, labelled

    class Model(_Section):
        """`[generators.local.overrides.NAME]`: a model's settings over its family's defaults."""

        family: Annotated[Str, _one_of("sd1", "sd2", "sdxl", "sd-turbo", "sdxl-turbo", "flux", "flux-dev", "tiny",
                                       message="must be sd1, sd2, sdxl, sd-turbo, sdxl-turbo, flux or flux-dev")] | None = None
        size: Annotated[Str, _rule(lambda v: bool(re.fullmatch(r"\d{2,4}x\d{2,4}", v)), "must be WxH")] | None = None
        steps: Annotated[Int, _rule(lambda v: 1 <= v <= 200, "must be 1-200")] | None = None
        guidance: Annotated[Number, _NOT_NEGATIVE] | None = None
        negative_prompt: Bool | None = None
        safety_checker: Bool = False  # diffusers' own checker, as well as easel's screens
        preview: Str | None = None  # an AutoencoderTiny (TAESD) folder or hub id for step previews

    class Lora(_Section):
        source: Str
        weight: Number = 1.0
        triggers: Strings = ()

    class ControlNet(_Section):
        source: Str
        preprocessor: Annotated[Str, _one_of("none", "canny", "depth", "openpose", "scribble", "lineart", "softedge",
                                             message="must be none, canny, depth, openpose, scribble, lineart or softedge")] | None = None

    overrides: dict[Str, Model] = Field(default_factory=dict)
    loras: dict[Str, Str | Lora] = Field(default_factory=dict)  # name -> file, folder or hub id
    controlnets: dict[Str, Str | ControlNet] = Field(default_factory=dict)
    memory_budget_gb: Annotated[Number, _NOT_NEGATIVE] = 0.0  # loaded models kept within it; 0: no bound
    # Compatible queued jobs run as one pipeline call of up to batch_size images; max_concurrent
    # (the jobs let into the generator at once) defaults to it.
    batch_size: Annotated[Int, _rule(lambda v: 1 <= v <= 16, "must be 1-16")] = 1
    batch_window_ms: Annotated[Int, _rule(lambda v: 0 <= v <= 5000, "must be 0-5000")] = 50
    # With batch_size above 1: batch-invariant kernels, so a batched image is bit-identical to its
    # solo run (a lone image without guidance then costs about half as much again).
    batch_exact: Bool = True
    cpu_offload: Bool = False
    vae_tiling: Bool = False
    vae_slicing: Bool = False
    attention: Annotated[Str, _one_of("sdpa", "default", message="must be sdpa or default")] = "sdpa"
    compile: Bool = False  # torch.compile the UNet (minutes of warm-up per size on first use)
    channels_last: Bool = False

    @model_validator(mode="before")
    @classmethod
    def _slots_for_batches(cls, data: Any) -> Any:
        if isinstance(data, dict) and "batch_size" in data and "max_concurrent" not in data:
            data = {**data, "max_concurrent": data["batch_size"]}
        return data

    def generator_kwargs(self, settings: Settings) -> dict[str, Any] | None:
        """Keyword arguments for DiffusersGenerator, or None when it is disabled."""
        if not self.enabled:
            return None
        kwargs: dict[str, Any] = {
            "models": dict(self.models),
            "data_dir": settings.path(settings.storage.images_dir).parent,
            "device": self.device,
            "dtype": self.dtype,
            "default_steps": self.steps,
            "default_guidance": self.guidance,
            "price_per_second_usd": self.price_per_second_usd,
            "upscaler": self.upscaler or None,
        }
        device = {k: getattr(self, k) for k in ("cpu_offload", "vae_tiling", "vae_slicing", "compile",
                                                 "channels_last") if getattr(self, k)}
        if self.attention != "sdpa":
            device["attention"] = self.attention
        extra = {
            "overrides": {k: v.model_dump(exclude_none=True) for k, v in self.overrides.items()},
            "loras": {k: v if isinstance(v, str) else v.model_dump() for k, v in self.loras.items()},
            "controlnets": {k: v if isinstance(v, str) else v.model_dump(exclude_none=True)
                            for k, v in self.controlnets.items()},
            "memory_budget_gb": self.memory_budget_gb,
            "device_options": device,
        }
        if self.batch_size > 1:
            kwargs |= {"batch_size": self.batch_size, "batch_window_s": self.batch_window_ms / 1000,
                       "batch_exact": self.batch_exact}
        return kwargs | {k: v for k, v in extra.items() if v}  # only what is set beyond the defaults


class CloudGeneratorSettings(_Section):
    """What every cloud provider's table holds; each provider subclasses it with its defaults."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # Used as soon as the environment variable `api_key_env` is set, unless enabled = false.
    enabled: Bool = True
    api_key_env: EnvName = ""
    # Empty: the SDK's own default, which honours OPENAI_BASE_URL / REPLICATE_BASE_URL.
    base_url: Annotated[Str, _rule(lambda v: not v or v.startswith(_HTTP),
                                   "must start with http:// or https://")] = ""
    timeout_s: Seconds = 120.0
    max_concurrent: Concurrency = 4
    # Empty: every model the provider offers here; else only these (names or aliases).
    models: Strings = ()
    # USD, overriding easel's built-in table of public prices (see `easel models`).
    prices: dict[Str, Number] = Field(default_factory=dict)

    def api_key(self) -> str | None:
        return os.environ.get(self.api_key_env) or None

    def generator_kwargs(self, settings: Settings) -> dict[str, Any] | None:
        """Keyword arguments for the provider's generator (the key included), or None when it is
        disabled or its key is not set: a cloud generator is available as soon as its key is."""
        key = self.api_key()
        if not self.enabled or key is None:
            return None
        return {
            "api_key": key,
            "base_url": self.base_url or None,
            "timeout_s": self.timeout_s,
            "prices": dict(self.prices) or None,
            "enabled_models": list(self.models) or None,
        }


class OpenAISettings(CloudGeneratorSettings):
    model_config = ConfigDict(frozen=True, extra="forbid")

    api_key_env: EnvName = "OPENAI_API_KEY"
    timeout_s: Seconds = 180.0


class ReplicateSettings(CloudGeneratorSettings):
    model_config = ConfigDict(frozen=True, extra="forbid")

    api_key_env: EnvName = "REPLICATE_API_TOKEN"
    timeout_s: Seconds = 120.0


class TogetherSettings(CloudGeneratorSettings):
    model_config = ConfigDict(frozen=True, extra="forbid")

    api_key_env: EnvName = "TOGETHER_API_KEY"
    timeout_s: Seconds = 60.0


_GOOGLE_KEY_ENVS = ("GOOGLE_API_KEY", "GEMINI_API_KEY")  # google-genai's order


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("true", "1")


class GoogleSettings(CloudGeneratorSettings):
    """Imagen 4 (Vertex AI) and Gemini image, through google-genai, which reads GOOGLE_API_KEY
    (else GEMINI_API_KEY), GOOGLE_GENAI_USE_VERTEXAI, GOOGLE_CLOUD_PROJECT/LOCATION and
    GOOGLE_VERTEX_BASE_URL / GOOGLE_GEMINI_BASE_URL; the keys here override them."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    api_key_env: EnvName = "GOOGLE_API_KEY"
    timeout_s: Seconds = 120.0
    # true: Vertex AI (Imagen and Gemini); false: the Gemini API (Gemini image only); "auto":
    # as GOOGLE_GENAI_USE_VERTEXAI says.
    vertex: Annotated[Bool | Str, _rule(lambda v: isinstance(v, bool) or v == "auto",
                                        'must be true, false or "auto"')] = "auto"
    # Vertex AI with Application Default Credentials instead of an express-mode key; empty:
    # GOOGLE_CLOUD_PROJECT / GOOGLE_CLOUD_LOCATION.
    project: Str = ""
    location: Str = ""

    def api_key(self) -> str | None:
        names = (self.api_key_env,) + (_GOOGLE_KEY_ENVS[1:] if self.api_key_env == _GOOGLE_KEY_ENVS[0] else ())
        return next((os.environ[n] for n in names if os.environ.get(n)), None)

    def use_vertex(self) -> bool:
        return _env_true("GOOGLE_GENAI_USE_VERTEXAI") if self.vertex == "auto" else bool(self.vertex)

    def generator_kwargs(self, settings: Settings) -> dict[str, Any] | None:
        """As for every cloud provider, plus the mode; also built without a key on Vertex AI with
        a project (Application Default Credentials)."""
        if not self.enabled:
            return None
        key, vertex = self.api_key(), self.use_vertex()
        project = self.project or (os.environ.get("GOOGLE_CLOUD_PROJECT", "") if key is None else "")
        if key is None and not (vertex and project):
            return None
        return {
            "api_key": key or "",
            "base_url": self.base_url or None,
            "timeout_s": self.timeout_s,
            "prices": dict(self.prices) or None,
            "enabled_models": list(self.models) or None,
            "vertex": vertex,
            "project": self.project or None,
            "location": self.location or None,
        }


class FireworksSettings(CloudGeneratorSettings):
    model_config = ConfigDict(frozen=True, extra="forbid")

    api_key_env: EnvName = "FIREWORKS_API_KEY"
    timeout_s: Seconds = 60.0


_SERVERS = _rule(lambda v: all(u.startswith(_HTTP) for u in v), "must be http:// or https:// URLs")


class ComfyUISettings(_Section):
    """ComfyUI servers running workflows exported in API format; off until servers are listed."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: Bool = True
    servers: Annotated[Strings, _SERVERS] = ()  # e.g. ["http://gpu1:8188", "http://gpu2:8188"]
    # model name -> a workflow file in API format, with "$prompt", "$seed"... placeholders.
    workflows: dict[Str, Str] = Field(default_factory=dict)
    price_per_image_usd: Annotated[Number, _NOT_NEGATIVE, _AT_MOST_A_MILLION] = 0.0
    timeout_s: Seconds = 300.0
    max_concurrent: Concurrency = 4  # jobs at once over all its servers

    def generator_kwargs(self, settings: Settings) -> dict[str, Any] | None:
        """Keyword arguments for ComfyUI, or None when it is disabled or has no servers."""
        if not self.enabled or not self.servers:
            return None
        return {
            "servers": list(self.servers),
            "workflows": {name: str(settings.path(path)) for name, path in self.workflows.items()},
            "price_per_image_usd": self.price_per_image_usd,
            "timeout_s": self.timeout_s,
        }


class A1111Settings(_Section):
    """AUTOMATIC1111 / SD.Next / Forge servers started with --api; off until servers are listed."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: Bool = True
    servers: Annotated[Strings, _SERVERS] = ()  # e.g. ["http://gpu1:7860"]
    # Checkpoints offered (model_name or title); empty: every checkpoint the servers list.
    models: Strings = ()
    sampler: Str = ""  # the sampler when a request names none; empty: the server's default
    price_per_image_usd: Annotated[Number, _NOT_NEGATIVE, _AT_MOST_A_MILLION] = 0.0
    timeout_s: Seconds = 300.0
    max_concurrent: Concurrency = 2  # jobs at once over all its servers

    def generator_kwargs(self, settings: Settings) -> dict[str, Any] | None:
        """Keyword arguments for Automatic1111, or None when it is disabled or has no servers."""
        if not self.enabled or not self.servers:
            return None
        return {
            "servers": list(self.servers),
            "models": list(self.models) or None,
            "sampler": self.sampler,
            "price_per_image_usd": self.price_per_image_usd,
            "timeout_s": self.timeout_s,
        }


def _at_least_a_batch(value: int, info: Any) -> int:
    if value < info.data.get("max_batch_size", 1):
        raise PydanticCustomError(_RULE, "must be at least max_batch_size (or a batch could never fill)")
    return value


def _max_at_least_min(value: int, info: Any) -> int:
    if value < info.data.get("min_replicas", 0):
        raise PydanticCustomError(_RULE, "must be at least min_replicas")
    return value


class ClusterSettings(_Section):
    """A Ray Serve GPU pool (the cluster extra). `easel cluster deploy` deploys the models of
    [generators.local.models] as the Serve application `app`, one deployment per model; `models`
    here maps easel model names to those deployed models. Off until an address and models are set."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    setup_hint: ClassVar[str] = "set generators.cluster.address and [generators.cluster.models] to use it"

    enabled: Bool = True
    # "local": a Ray instance started inside easel on this machine's CPUs (for trying it out);
    # "auto": the cluster `ray start` runs on this machine; else the head's host:port or
    # ray://host:10001.
    address: Str = ""
    app: Annotated[Str, _rule(lambda v: bool(v.strip()), "cannot be empty")] = "easel"
    # easel model name -> deployed model (a [generators.local.models] name), e.g. pool-sdxl = "sdxl".
    models: dict[Str, Str] = Field(default_factory=dict)
    # Per replica; with address = "local" no GPU is asked for.
    num_gpus: Annotated[Number, _NOT_NEGATIVE] = 1.0
    num_cpus: Annotated[Number, _NOT_NEGATIVE] = 1.0
    # Replicas per model, scaled on ongoing requests per replica (target_ongoing_requests).
    min_replicas: Annotated[Int, _rule(lambda v: 0 <= v <= 1000, "must be 0-1000")] = 1
    max_replicas: Annotated[Int, _rule(lambda v: 1 <= v <= 1000, "must be 1-1000"),
                            AfterValidator(_max_at_least_min)] = 1
    target_ongoing_requests: Annotated[Number, _POSITIVE] = 2.0
    # Concurrent compatible requests (same model, size, steps, guidance, options) that a replica
    # merges into one batch, and how long it waits for them.
    max_batch_size: Annotated[Int, _rule(lambda v: 1 <= v <= 64, "must be 1-64")] = 4
    batch_wait_timeout_s: Annotated[Number, _rule(lambda v: 0 <= v <= 10, "must be 0-10 (seconds)")] = 0.05
    # Requests a replica holds at once (in its batches and queued there); more wait at the front
    # end for a replica with room, so a busy replica does not queue work an idle one could run.
    max_ongoing_requests: Annotated[Int, _rule(lambda v: 1 <= v <= 1000, "must be 1-1000"),
                                    AfterValidator(_at_least_a_batch)] = 8
    timeout_s: Seconds = 600.0
    max_concurrent: Concurrency = 8  # jobs this front end sends the pool at once
    local_cpus: Annotated[Int, _NOT_NEGATIVE] = 0  # address = "local": CPUs Ray may use; 0: all

    def deployment(self, settings: Settings) -> dict[str, Any]:
        """What `easel cluster deploy` deploys: the local generator's keyword arguments (on the
        CPU with address = "local") and the pool's options (generators.serve_app.PoolOptions)."""
        local = settings.generators.local.model_copy(update={"enabled": True})
        kwargs = local.generator_kwargs(settings) or {}
        local_mode = self.address == "local"
        if local_mode:
            kwargs["device"] = "cpu"
        options = {"num_gpus": 0.0 if local_mode else self.num_gpus, "num_cpus": self.num_cpus,
                   "min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
                   "target_ongoing_requests": self.target_ongoing_requests,
                   "max_batch_size": self.max_batch_size, "batch_wait_timeout_s": self.batch_wait_timeout_s,
                   "max_ongoing_requests": self.max_ongoing_requests}
        return {"generator_kwargs": kwargs, "options": options}

    def generator_kwargs(self, settings: Settings) -> dict[str, Any] | None:
        """Keyword arguments for ClusterGenerator, or None when it is off (disabled, or no address
        or models)."""
        if not self.enabled or not self.address.strip() or not self.models:
            return None
        local = settings.generators.local
        kwargs: dict[str, Any] = {
            "address": self.address,
            "app": self.app,
            "models": dict(self.models),
            "sources": dict(local.models),
            "data_dir": settings.path(settings.storage.images_dir).parent,
            "price_per_second_usd": local.price_per_second_usd,
            "timeout_s": self.timeout_s,
        }
        if self.address == "local":
            kwargs["deploy"] = self.deployment(settings)
            kwargs["local_cpus"] = self.local_cpus or None
        return kwargs


@dataclass(frozen=True)
class GeneratorEntry:
    """One generator: its `[generators.<name>]` table (and provider name), its class as
    "module:Class" (imported only when built) and the class of its settings section."""

    name: str
    target: str
    settings_class: type[BaseModel]

    def section(self, settings: Settings) -> Any:
        """settings.generators.<name>"""
        return getattr(settings.generators, self.name)

    def load(self) -> type:
        module, _, attr = self.target.partition(":")
        return getattr(importlib.import_module(module), attr)


# The one list of generators. Adding a provider: its module, its settings class and a line here
# (and its table in config.example.toml).
GENERATORS: tuple[GeneratorEntry, ...] = (
    GeneratorEntry("local", "generators.local:DiffusersGenerator", LocalGeneratorSettings),
    GeneratorEntry("openai", "generators.openai_images:OpenAIImages", OpenAISettings),
    GeneratorEntry("replicate", "generators.replicate_flux:ReplicateFlux", ReplicateSettings),
    GeneratorEntry("together", "generators.together_flux:TogetherFlux", TogetherSettings),
    GeneratorEntry("google", "generators.google_imagen:GoogleImagen", GoogleSettings),
    GeneratorEntry("fireworks", "generators.fireworks_flux:FireworksFlux", FireworksSettings),
    GeneratorEntry("comfyui", "generators.comfyui:ComfyUI", ComfyUISettings),
    GeneratorEntry("a1111", "generators.a1111:Automatic1111", A1111Settings),
    GeneratorEntry("cluster", "generators.cluster:ClusterGenerator", ClusterSettings),
)

# [generators]: one field per registry entry, each defaulting to its section's defaults.
GeneratorsSettings = create_model(
    "GeneratorsSettings",
    __base__=_Section,
    __module__=__name__,
    __doc__="The [generators.*] tables, one per entry of GENERATORS.",
    **{e.name: (e.settings_class, Field(default_factory=e.settings_class)) for e in GENERATORS},
)


def queue_limits(settings: Settings) -> dict[str, int]:
    """Provider name -> jobs it runs at once (its section's max_concurrent)."""
    return {e.name: e.section(settings).max_concurrent for e in GENERATORS}


# --- the rest ---------------------------------------------------------------------------------


class RoutingSettings(_Section):
    model_config = ConfigDict(frozen=True, extra="forbid")

    # model -> the model that serves instead while it fails (same request kinds), e.g.
    # "flux-schnell" = "together/flux-schnell".
    fallbacks: dict[Str, Str] = Field(default_factory=dict)
    # Attempts per model for transient failures (timeouts, 429, 5xx), with backoff and jitter.
    retry_attempts: Annotated[Int, _rule(lambda v: 1 <= v <= 10, "must be 1-10")] = 3
    retry_base_delay_s: Annotated[Number, _NOT_NEGATIVE] = 1.0
    # The longest wait a provider may ask for (Retry-After) before a retry; one that asks for
    # longer (or for more than the job has left) is given up on at once: fallback, or refund.
    retry_max_wait_s: Seconds = 60.0
    # After this many failed jobs in a row a provider is taken out of rotation for cooldown_s.
    breaker_failures: Annotated[Int, _AT_LEAST_1] = 3
    breaker_cooldown_s: Seconds = 60.0


_URL = _rule(lambda v: not v or v.startswith(("http://", "https://", "ws://", "wss://")), "must be a URL")


def _shard_ids_in_range(ids: tuple[int, ...], info: Any) -> tuple[int, ...]:
    shards = info.data.get("shards")
    if ids and not isinstance(shards, int) or ids and shards == 0:
        raise PydanticCustomError(_RULE, "needs discord.shards set to a number of shards")
    if any(not 0 <= i < shards for i in ids) or len(set(ids)) != len(ids):
        raise PydanticCustomError(_RULE, f"must be distinct shard numbers from 0 to {shards - 1 if ids else 0}")
    return ids


class DiscordSettings(_Section):
    model_config = ConfigDict(frozen=True, extra="forbid")

    # The environment variable that holds the bot token.
    token_env: EnvName = "DISCORD_TOKEN"
    # Discord-compatible REST base and gateway (for REST/gateway proxies); the environment
    # variables DISCORD_API_BASE and DISCORD_GATEWAY_URL win over these. Empty: Discord itself.
    api_base: Annotated[Str, _URL] = ""
    gateway_url: Annotated[Str, _URL] = ""
    # Guild ids to sync commands to at once (handy while testing); empty: global commands.
    sync_guilds: Annotated[Strings, _rule(lambda v: all(g.isdigit() for g in v),
                                          "must be guild ids (digits)")] = ()
    # Role names or ids whose members may run /budget; empty: members with Manage Server.
    admin_roles: Strings = ()
    # A channel id for notes to admins (a member cooled down after repeated blocks); empty: none.
    admin_channel: Annotated[Str, _rule(lambda v: v == "" or v.isdigit(), "must be a channel id (digits)")] = ""
    # Least seconds between two progress edits of one message (Discord rate limits).
    progress_interval_s: Annotated[Number, _rule(lambda v: v >= 1.0, "must be at least 1")] = 2.0
    # Most images one /imagine may ask for.
    max_count: Annotated[Int, _rule(lambda v: 1 <= v <= 4, "must be 1-4")] = 4
    # How far a result's Vary (Subtle) and Vary (Strong) buttons go from it (0-1, img2img strength).
    vary_subtle: Annotated[Number, _rule(lambda v: 0 < v <= 1, "must be above 0 and at most 1")] = 0.35
    vary_strong: Annotated[Number, _rule(lambda v: 0 < v <= 1, "must be above 0 and at most 1")] = 0.8
    # On shutdown, how long running jobs get to finish before they are cancelled and refunded.
    shutdown_grace_s: Annotated[Number, _NOT_NEGATIVE] = 30.0
    # Gateway shards: 0 (one connection, no sharding), "auto" (an AutoShardedClient with the
    # count Discord recommends), or a count; with a count, shard_ids are this process's shards
    # (several processes split the guilds), empty: all of them.
    shards: Annotated[Any, _rule(lambda v: v == "auto" or (type(v) is int and 0 <= v <= 100_000),
                                       'must be "auto" or a number of shards (0: no sharding)')] = 0
    shard_ids: Annotated[tuple[StrictInt, ...], AfterValidator(_shard_ids_in_range)] = ()

    def token(self) -> str | None:
        return os.environ.get(self.token_env) or None

    def resolved_api_base(self) -> str | None:
        return os.environ.get("DISCORD_API_BASE") or self.api_base or None

    def resolved_gateway_url(self) -> str | None:
        return os.environ.get("DISCORD_GATEWAY_URL") or self.gateway_url or None


# The file's table while load_settings builds Settings: a source below the environment.
_FILE_DATA: ContextVar[Mapping[str, Any]] = ContextVar("easel_file_data", default=types.MappingProxyType({}))


class _EnvironmentSource(PydanticBaseSettingsSource):
    """`EASEL_<SECTION>__<KEY>` variables (see _read_environment)."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ reads every variable at once

    def __call__(self) -> dict[str, Any]:
        return _read_environment()[0]


class _FileSource(PydanticBaseSettingsSource):
    """The TOML file's table, below the environment."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(_FILE_DATA.get())


class LoggingSettings(_Section):
    model_config = ConfigDict(frozen=True, extra="forbid")

    # "human" lines, "json" lines (one object per event), or "auto": human on a terminal.
    format: Annotated[Str, _one_of("auto", "human", "json", message='must be "auto", "human" or "json"')] = "auto"
    level: Annotated[Str, _one_of("DEBUG", "INFO", "WARNING", "ERROR", message="must be DEBUG, INFO, WARNING or ERROR")] = "INFO"


class PromptsSettings(_Section):
    """Helping prompts give good images: default negative prompts, and tips for short prompts."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # easel's own defaults for sd1, sd2 and sdxl models (core/negatives.py); the table below
    # overrides them by model name or family ("" switches one off).
    builtin_negatives: Bool = True
    negative_prompts: dict[Str, Str] = Field(default_factory=dict)
    # A prompt of fewer words gets a private tip with its result, once a day per member; 0: never.
    tip_under_words: Annotated[Int, _rule(lambda v: 0 <= v <= 50, "must be 0-50")] = 4


class EnhanceSettings(_Section):
    """Prompt enhancement (--enhance): a chat model expands a short prompt, through any
    OpenAI-compatible endpoint (OpenAI, a local Ollama or vLLM server, a gateway)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: Str = ""  # the chat model; empty: enhancement is off, and --enhance is refused
    base_url: Str = ""  # empty: OpenAI's (or $OPENAI_BASE_URL)
    api_key_env: EnvName = "OPENAI_API_KEY"
    timeout_s: Seconds = 20.0
    max_tokens: Annotated[Int, _rule(lambda v: 16 <= v <= 2000, "must be 16-2000")] = 200
    # What a failed enhancement does: "original" (use the prompt as typed, with a note) or "refuse".
    on_failure: Annotated[Str, _one_of("original", "refuse", message='must be "original" or "refuse"')] = "original"
    # What the member pays per 1000 tokens (prompt and answer together).
    price_per_1k_tokens_usd: Annotated[Number, _NOT_NEGATIVE, _AT_MOST_A_MILLION] = 0.0006

    def api_key(self) -> str | None:
        return os.environ.get(self.api_key_env) or None


class ProvenanceSettings(_Section):
    """C2PA signing of every stored image (the provenance extra): a PEM certificate chain (the
    leaf first) and its private key. Both empty: images carry their metadata but no signature."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    cert_chain: Str = ""
    private_key: Str = ""

    def provenance_kwargs(self, settings: Settings) -> dict[str, Any]:
        """Keyword arguments for storage.provenance.Provenance: the paths resolved against the
        settings file's folder; None where not set."""
        return {
            "cert_chain": settings.path(self.cert_chain) if self.cert_chain else None,
            "private_key": settings.path(self.private_key) if self.private_key else None,
        }


class Settings(BaseSettings):
    """All settings. Precedence: init values (settings_from_dict) > EASEL_* variables > the file
    (load_settings) > defaults."""

    model_config = SettingsConfigDict(frozen=True, extra="forbid", env_prefix="EASEL_",
                                      env_nested_delimiter="__")

    storage: StorageSettings = Field(default_factory=StorageSettings)
    server: ServerSettings = Field(default_factory=ServerSettings)
    generation: GenerationSettings = Field(default_factory=GenerationSettings)
    queue: QueueSettings = Field(default_factory=QueueSettings)
    budget: BudgetSettings = Field(default_factory=BudgetSettings)
    moderation: ModerationSettings = Field(default_factory=ModerationSettings)
    generators: GeneratorsSettings = Field(default_factory=GeneratorsSettings)  # type: ignore[valid-type]
    routing: RoutingSettings = Field(default_factory=RoutingSettings)
    discord: DiscordSettings = Field(default_factory=DiscordSettings)
    prompts: PromptsSettings = Field(default_factory=PromptsSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    enhance: EnhanceSettings = Field(default_factory=EnhanceSettings)
    provenance: ProvenanceSettings = Field(default_factory=ProvenanceSettings)

    # Where the settings came from (None: built-in defaults) and what relative paths resolve to;
    # set by load_settings, never by the file.
    _source: Path | None = PrivateAttr(default=None)
    _base_dir: Path = PrivateAttr(default_factory=Path.cwd)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Our own environment source: it parses each value by the type of its key (strict types
        # take no strings) and lets errors name the variable. No .env file, no secrets dir.
        return init_settings, _EnvironmentSource(settings_cls), _FileSource(settings_cls)

    @property
    def source(self) -> Path | None:
        return self._source

    @property
    def base_dir(self) -> Path:
        return self._base_dir

    def path(self, value: str) -> Path:
        p = Path(value).expanduser()
        return p if p.is_absolute() else self.base_dir / p


# --- loading ----------------------------------------------------------------------------------


def listen_error(settings: Settings, exc: OSError) -> ConfigError:
    """One line for an address the image server cannot listen on."""
    where = settings.source or "built-in defaults"
    host, port = settings.server.host, settings.server.port
    if isinstance(exc, socket.gaierror):
        why = f"the host {host!r} does not resolve"
    elif exc.errno == errno.EADDRINUSE:
        why = f"port {port} is already in use on {host}"
    else:
        why = exc.strerror or str(exc)
    return ConfigError(f"server.host/server.port (from {where}): cannot listen on {host}:{port}: {why}")


MAX_CONFIG_BYTES = 1 << 20  # a settings file is a few KiB; /dev/zero is not one


def find_config(explicit: str | None) -> Path | None:
    if explicit:
        return Path(explicit)
    if os.environ.get("EASEL_CONFIG"):
        return Path(os.environ["EASEL_CONFIG"])
    default = Path("easel.toml")
    return default if default.exists() else None


def load_settings(explicit: str | None = None) -> Settings:
    path = find_config(explicit)
    if path is None:
        return _build({}, where="config")
    where = str(path)
    from .files import FileRefused, read_bounded

    try:
        text = read_bounded(path, MAX_CONFIG_BYTES, "config file").decode("utf-8")
    except FileRefused as exc:
        raise ConfigError(str(exc)) from None
    except UnicodeDecodeError:
        raise ConfigError(f"{where}: the config file is not UTF-8 text") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: not valid TOML ({exc})") from None
    settings = _build({}, where=where, file=data)
    settings._source = path
    settings._base_dir = path.resolve().parent
    return settings


def settings_from_dict(data: Mapping[str, Any], *, where: str = "config") -> Settings:
    """Settings from `data` (a parsed TOML table); EASEL_* variables fill what it leaves out."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: settings must be a table")
    for key in data:  # before BaseSettings sees them: "_env_file" and the like are no settings
        if key not in Settings.model_fields:
            raise ConfigError(f"{where}: unknown key '{key}'{_did_you_mean(Settings, (), key)}")
    return _build(data, where=where)


def _build(init: Mapping[str, Any], *, where: str, file: Mapping[str, Any] | None = None) -> Settings:
    token = _FILE_DATA.set(file or {})
    try:
        return Settings(**init)
    except ValidationError as exc:
        env_data, env_names = _read_environment()
        layers = (_Layer(where, init, None), _Layer("environment", env_data, env_names),
                  _Layer(where, file or {}, None))
        raise _config_error(exc, layers) from None
    finally:
        _FILE_DATA.reset(token)


# --- the environment --------------------------------------------------------------------------


def _read_environment() -> tuple[dict[str, Any], dict[tuple[str, ...], str]]:
    """(nested table, path -> variable name) of every EASEL_<SECTION>__<KEY>[__<KEY>] variable.
    Names are case-insensitive; variables without the delimiter (EASEL_CONFIG) are no settings."""
    prefix = Settings.model_config["env_prefix"].upper()
    delimiter = Settings.model_config["env_nested_delimiter"]
    found = []
    for name, text in os.environ.items():
        if name.upper().startswith(prefix) and delimiter in name[len(prefix):]:
            path = tuple(part.lower() for part in name[len(prefix):].split(delimiter))
            found.append((path, name, text))
    data: dict[str, Any] = {}
    names: dict[tuple[str, ...], str] = {}
    for path, name, text in sorted(found, key=lambda f: (len(f[0]), f[0], f[1])):
        node = data
        for part in path[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[path[-1]] = _parse_env_value(text, _type_at(path))
        names[path] = name
    return data, names


def _parse_env_value(text: str, tp: Any) -> Any:
    """`text` as the type its key wants; left a string when it does not parse, so that
    validation names the variable."""
    s = text.strip()
    if tp is bool:
        return {"true": True, "1": True, "yes": True, "on": True,
                "false": False, "0": False, "no": False, "off": False}.get(s.lower(), text)
    if tp is int:
        return int(s) if re.fullmatch(r"[+-]?\d+", s) else text
    if tp is float:
        try:
            return float(s)
        except ValueError:
            return text
    if tp is None or tp is str:
        return text
    try:  # lists and tables: JSON
        return json.loads(text)
    except ValueError:
        return text


# --- errors -----------------------------------------------------------------------------------


def _unwrap(tp: Any) -> Any:
    while True:
        origin = typing.get_origin(tp)
        if origin is Annotated:
            tp = typing.get_args(tp)[0]
        elif origin in (typing.Union, types.UnionType):
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        else:
            return tp


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _type_at(path: tuple) -> Any:
    """The (unwrapped) type at `path` from Settings, or None where the path leaves the schema."""
    tp: Any = Settings
    for part in path:
        tp = _unwrap(tp)
        origin = typing.get_origin(tp)
        if _is_model(tp):
            field = tp.model_fields.get(part)
            if field is None:
                return None
            tp = field.annotation
        elif origin is dict or origin is Mapping:
            tp = typing.get_args(tp)[1]
        elif origin in (tuple, list):
            tp = typing.get_args(tp)[0]
        else:
            return None
    return _unwrap(tp)


def _dotted(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _did_you_mean(model: Any, parent: tuple, key: str) -> str:
    known = list(model.model_fields) if _is_model(model) else []
    close = difflib.get_close_matches(str(key), known, n=1)
    return f" (did you mean '{_dotted(parent + (close[0],))}'?)" if close else ""


def _has(data: Any, loc: tuple) -> bool:
    node = data
    for part in loc:
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif isinstance(node, (list, tuple)) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
        else:
            return False
    return True


class _Layer(NamedTuple):
    where: str  # the file, "config", or "environment"
    data: Mapping[str, Any]
    names: dict[tuple[str, ...], str] | None  # the environment's variable names


_TYPE_WORDS = {
    "int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer",
    "float_type": "a number", "float_parsing": "a number", "finite_number": "a finite number",
    "string_type": "a string", "bool_type": "true or false", "bool_parsing": "true or false",
    "dict_type": "a table", "mapping_type": "a table", "model_type": "a table",
    "model_attributes_type": "a table",
}
_LIST_TYPES = {"list_type", "tuple_type", "iterable_type", "set_type"}
_ITEM_WORDS = {str: "strings", int: "integers", float: "numbers"}


def _config_error(exc: ValidationError, layers: tuple[_Layer, ...]) -> ConfigError:
    """The first error of `exc` as today's one line: "<where>: '<key>' <problem>". Values from
    the environment are never echoed (a misplaced secret must not reach a log)."""
    err = exc.errors(include_url=False)[0]
    loc = tuple(err["loc"])
    layer = next((layer for layer in layers if _has(layer.data, loc)), layers[0])
    kind = err["type"]
    if layer.names is not None:  # from the environment: name the variable
        below = [p for p in layer.names if p[:len(loc)] == loc]
        if below:  # the variable's path is the key's, or goes on below it (an unknown section)
            path = min(below, key=len)
            key = f"'{layer.names[path]}'"
        else:  # a key inside a JSON value
            above = [p for p in layer.names if loc[:len(p)] == p]
            path = max(above, key=len) if above else loc
            key = f"'{_dotted(loc)}' (from {layer.names[path]})" if above else f"'{_dotted(loc)}'"
        shown = ""
        if kind == "extra_forbidden":
            close = difflib.get_close_matches(str(loc[-1]), _field_names(loc[:-1]), n=1)
            hint = ""
            if close and below:
                prefix = Settings.model_config["env_prefix"]
                delimiter = Settings.model_config["env_nested_delimiter"]
                suggested = (prefix + delimiter.join(loc[:-1] + (close[0],) + path[len(loc):])).upper()
                hint = f" (did you mean '{suggested}'?)"
            elif close:
                hint = f" (did you mean '{_dotted(loc[:-1] + (close[0],))}'?)"
            return ConfigError(f"{layer.where}: unknown key {key}{hint}")
    else:
        key = f"'{_dotted(loc)}'"
        shown = f", not {err['input']!r}"
        if kind == "extra_forbidden":
            return ConfigError(f"{layer.where}: unknown key {key}{_did_you_mean(_type_at(loc[:-1]), loc[:-1], loc[-1])}")
    if kind == _RULE:
        return ConfigError(f"{layer.where}: {key} {err['msg']}")
    if kind in _TYPE_WORDS:
        return ConfigError(f"{layer.where}: {key} must be {_TYPE_WORDS[kind]}{shown}")
    if kind in _LIST_TYPES:
        tp = _type_at(loc)
        args = typing.get_args(tp)
        item = _ITEM_WORDS.get(_unwrap(args[0]) if args else None, "values")
        return ConfigError(f"{layer.where}: {key} must be a list of {item}{shown}")
    return ConfigError(f"{layer.where}: {key} is not valid ({err['msg']})")


def _field_names(path: tuple) -> list[str]:
    tp = _type_at(path)
    return list(tp.model_fields) if _is_model(tp) else []
