"""Settings: one TOML file, validated at start-up into typed dataclasses.

Where the file comes from: `--config PATH`, else `$EASEL_CONFIG`, else `./easel.toml`, else the
built-in defaults. Relative paths in the file are relative to the file's folder (to the current
folder when there is no file). An unknown key, a wrong type or an impossible value raises
ConfigError with one line that names the key and the file.

Secrets are never in the file: it names the environment variable that holds each one.
"""
from __future__ import annotations

import difflib
import math
import os
import tomllib
import types
import typing
from dataclasses import MISSING, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any


class ConfigError(Exception):
    """A bad setting; the message is one line that names the key and the file."""


class _Invalid(ValueError):
    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


def _check(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise _Invalid(key, message)


@dataclass
class StorageSettings:
    database: str = "data/easel.db"
    images_dir: str = "data/images"
    # The address at which `easel serve` (or `easel run`) is reachable; image URLs are built on it.
    public_url: str = "http://127.0.0.1:8080"

    def validate(self) -> None:
        _check(self.public_url.startswith(("http://", "https://")), "public_url", "must start with http:// or https://")


@dataclass
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8080

    def validate(self) -> None:
        _check(0 < self.port < 65536, "port", "must be 1-65535")


@dataclass
class GenerationSettings:
    default_model: str = "tiny"
    max_prompt_chars: int = 2000
    default_strength: float = 0.6  # variations: how far from the source (0 keeps it, 1 ignores it)
    upscale_factor: int = 2
    job_timeout_s: float = 600.0
    max_upload_bytes: int = 20 * 1024 * 1024
    max_upload_pixels: int = 40_000_000

    def validate(self) -> None:
        _check(1 <= self.max_prompt_chars <= 100_000, "max_prompt_chars", "must be 1-100000")
        _check(0.0 < self.default_strength <= 1.0, "default_strength", "must be in (0, 1]")
        _check(self.upscale_factor in (2, 4), "upscale_factor", "must be 2 or 4")
        _check(self.job_timeout_s > 0, "job_timeout_s", "must be positive")
        _check(self.max_upload_bytes > 0 and self.max_upload_pixels > 0, "max_upload_bytes",
               "and max_upload_pixels must be positive")


@dataclass
class QueueSettings:
    max_jobs_per_user: int = 2  # queued or running; more are refused, not queued forever

    def validate(self) -> None:
        _check(self.max_jobs_per_user >= 1, "max_jobs_per_user", "must be at least 1")


@dataclass
class BudgetSettings:
    default_allowance_usd: float = 1.0  # what a new user's balance starts at
    # Stops all paid (cloud) generation once this much was spent today (UTC); 0 = no cap.
    daily_spend_cap_usd: float = 0.0
    # The period that spend reports and guild caps count over: day, week or month (UTC).
    period: str = "month"

    def validate(self) -> None:
        _check(self.default_allowance_usd >= 0, "default_allowance_usd", "cannot be negative")
        _check(self.daily_spend_cap_usd >= 0, "daily_spend_cap_usd", "cannot be negative")
        _check(self.period in ("day", "week", "month"), "period", "must be day, week or month")


@dataclass
class PromptRuleSettings:
    terms: list[str] = field(default_factory=list)
    allow_in_nsfw_channels: bool = False


@dataclass
class ModerationSettings:
    image_classifier: str = "nudenet"  # "nudenet", or "none" to turn image screening off
    nsfw_threshold: float = 0.5
    nsfw_channels: str = "allow"  # age-restricted channels: "allow" nudity there, or "block" everywhere
    blocked_outputs_are_paid: bool = False
    # None: the built-in rules (moderation.DEFAULT_PROMPT_RULES). A table replaces them.
    prompt_rules: dict[str, PromptRuleSettings] | None = None

    def validate(self) -> None:
        _check(self.image_classifier in ("nudenet", "none"), "image_classifier", 'must be "nudenet" or "none"')
        _check(0.0 < self.nsfw_threshold < 1.0, "nsfw_threshold", "must be between 0 and 1")
        _check(self.nsfw_channels in ("allow", "block"), "nsfw_channels", 'must be "allow" or "block"')


@dataclass
class LocalGeneratorSettings:
    enabled: bool = True
    # name -> source: "tiny" (a small random-weight model built offline), a folder, or a hub id.
    models: dict[str, str] = field(default_factory=lambda: {"tiny": "tiny"})
    device: str = "auto"  # auto, cuda, mps, cpu
    dtype: str = "auto"  # auto, float16, bfloat16, float32
    steps: int = 4
    guidance: float = 0.0
    max_concurrent: int = 1
    price_per_second_usd: float = 0.001  # what a second of this machine's time costs a user
    upscaler: str = ""  # a diffusers upscaler folder or id; empty: Lanczos resampling, labelled

    def validate(self) -> None:
        _check(bool(self.models), "models", "cannot be empty")
        _check(self.device in ("auto", "cuda", "mps", "cpu"), "device", "must be auto, cuda, mps or cpu")
        _check(self.dtype in ("auto", "float16", "bfloat16", "float32"), "dtype",
               "must be auto, float16, bfloat16 or float32")
        _check(1 <= self.steps <= 200, "steps", "must be 1-200")
        _check(self.max_concurrent >= 1, "max_concurrent", "must be at least 1")
        _check(self.price_per_second_usd >= 0, "price_per_second_usd", "cannot be negative")


def _cloud(api_key_env: str, timeout_s: float, max_concurrent: int):
    return lambda: CloudGeneratorSettings(api_key_env=api_key_env, timeout_s=timeout_s,
                                          max_concurrent=max_concurrent)


@dataclass
class CloudGeneratorSettings:
    # Used as soon as the environment variable `api_key_env` is set, unless enabled = false.
    enabled: bool = True
    api_key_env: str = ""
    # Empty: the SDK's own default, which honours OPENAI_BASE_URL / REPLICATE_BASE_URL.
    base_url: str = ""
    timeout_s: float = 120.0
    max_concurrent: int = 4
    # Empty: every model the provider offers here; else only these (names or aliases).
    models: list[str] = field(default_factory=list)
    # USD, overriding easel's built-in table of public prices (see `easel models`).
    prices: dict[str, float] = field(default_factory=dict)

    def validate(self) -> None:
        _check(bool(self.api_key_env.strip()), "api_key_env", "must name an environment variable")
        _check(not self.base_url or self.base_url.startswith(("http://", "https://")), "base_url",
               "must start with http:// or https://")
        _check(self.timeout_s > 0, "timeout_s", "must be positive")
        _check(self.max_concurrent >= 1, "max_concurrent", "must be at least 1")

    def api_key(self) -> str | None:
        return os.environ.get(self.api_key_env) or None


@dataclass
class GeneratorsSettings:
    local: LocalGeneratorSettings = field(default_factory=LocalGeneratorSettings)
    openai: CloudGeneratorSettings = field(default_factory=_cloud("OPENAI_API_KEY", 180.0, 4))
    replicate: CloudGeneratorSettings = field(default_factory=_cloud("REPLICATE_API_TOKEN", 120.0, 4))
    together: CloudGeneratorSettings = field(default_factory=_cloud("TOGETHER_API_KEY", 60.0, 4))


@dataclass
class RoutingSettings:
    # model -> the model that serves instead while it fails (same request kinds), e.g.
    # "flux-schnell" = "together/flux-schnell".
    fallbacks: dict[str, str] = field(default_factory=dict)
    # Attempts per model for transient failures (timeouts, 429, 5xx), with backoff and jitter.
    retry_attempts: int = 3
    retry_base_delay_s: float = 1.0
    # After this many failed jobs in a row a provider is taken out of rotation for cooldown_s.
    breaker_failures: int = 3
    breaker_cooldown_s: float = 60.0

    def validate(self) -> None:
        _check(1 <= self.retry_attempts <= 10, "retry_attempts", "must be 1-10")
        _check(self.retry_base_delay_s >= 0, "retry_base_delay_s", "cannot be negative")
        _check(self.breaker_failures >= 1, "breaker_failures", "must be at least 1")
        _check(self.breaker_cooldown_s > 0, "breaker_cooldown_s", "must be positive")


@dataclass
class DiscordSettings:
    # The environment variable that holds the bot token.
    token_env: str = "DISCORD_TOKEN"
    # Discord-compatible REST base and gateway (for REST/gateway proxies); the environment
    # variables DISCORD_API_BASE and DISCORD_GATEWAY_URL win over these. Empty: Discord itself.
    api_base: str = ""
    gateway_url: str = ""
    # Guild ids to sync commands to at once (handy while testing); empty: global commands.
    sync_guilds: list[str] = field(default_factory=list)
    # Role names or ids whose members may run /budget; empty: members with Manage Server.
    admin_roles: list[str] = field(default_factory=list)
    # Least seconds between two progress edits of one message (Discord rate limits).
    progress_interval_s: float = 2.0
    # Most images one /imagine may ask for.
    max_count: int = 4
    # On shutdown, how long running jobs get to finish before they are cancelled and refunded.
    shutdown_grace_s: float = 30.0

    def validate(self) -> None:
        _check(bool(self.token_env.strip()), "token_env", "must name an environment variable")
        for key in ("api_base", "gateway_url"):
            value = getattr(self, key)
            _check(not value or value.startswith(("http://", "https://", "ws://", "wss://")), key,
                   "must be a URL")
        _check(all(g.isdigit() for g in self.sync_guilds), "sync_guilds", "must be guild ids (digits)")
        _check(self.progress_interval_s >= 1.0, "progress_interval_s", "must be at least 1")
        _check(1 <= self.max_count <= 4, "max_count", "must be 1-4")
        _check(self.shutdown_grace_s >= 0, "shutdown_grace_s", "cannot be negative")

    def token(self) -> str | None:
        return os.environ.get(self.token_env) or None

    def resolved_api_base(self) -> str | None:
        return os.environ.get("DISCORD_API_BASE") or self.api_base or None

    def resolved_gateway_url(self) -> str | None:
        return os.environ.get("DISCORD_GATEWAY_URL") or self.gateway_url or None


@dataclass
class Settings:
    storage: StorageSettings = field(default_factory=StorageSettings)
    server: ServerSettings = field(default_factory=ServerSettings)
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    queue: QueueSettings = field(default_factory=QueueSettings)
    budget: BudgetSettings = field(default_factory=BudgetSettings)
    moderation: ModerationSettings = field(default_factory=ModerationSettings)
    generators: GeneratorsSettings = field(default_factory=GeneratorsSettings)
    routing: RoutingSettings = field(default_factory=RoutingSettings)
    discord: DiscordSettings = field(default_factory=DiscordSettings)
    # Where the settings came from (None: built-in defaults) and what relative paths resolve to.
    source: Path | None = field(default=None, metadata={"internal": True})
    base_dir: Path = field(default_factory=Path.cwd, metadata={"internal": True})

    def path(self, value: str) -> Path:
        p = Path(value).expanduser()
        return p if p.is_absolute() else self.base_dir / p


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
        return Settings()
    where = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{where}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{where}: cannot read config file ({exc.__class__.__name__})") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: not valid TOML ({exc})") from None
    settings = settings_from_dict(data, where=where)
    settings.source = path
    settings.base_dir = path.resolve().parent
    return settings


def settings_from_dict(data: dict[str, Any], *, where: str = "config") -> Settings:
    return _build(Settings, data, "", where)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    if origin is list:
        item = typing.get_args(tp)[0]
        return "a list of " + {int: "integers", float: "numbers", str: "strings"}.get(item, "values")
    if origin is dict:
        return "a table"
    if is_dataclass(tp):
        return "a table"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _convert(tp: Any, value: Any, key: str, where: str, default: Any = None) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        return _convert(options[0], value, key, where)
    if is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: '{key}' must be a table")
        return _build(tp, value, key + ".", where, base=default if is_dataclass(default) else None)
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: '{key}' must be {_type_name(tp)}")
        return [_convert(item, v, f"{key}[{i}]", where) for i, v in enumerate(value)]
    if origin is dict:
        _, item = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: '{key}' must be a table")
        return {k: _convert(item, v, f"{key}.{k}", where) for k, v in value.items()}
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ConfigError(f"{where}: '{key}' must be a finite number, not {value!r}")
        return float(value)
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: '{key}' must be {_type_name(tp)}, not {value!r}")
    return value


def _default(f) -> Any:
    return f.default_factory() if f.default_factory is not MISSING else f.default


def _build(cls: type, data: dict[str, Any], prefix: str, where: str, base: Any = None) -> Any:
    """`cls` from `data`; keys the table leaves out keep their defaults (those of `base`, the
    field's own default, where there is one: [generators.openai] keeps OPENAI_API_KEY)."""
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls) if not f.metadata.get("internal")}
    kwargs = {}
    for key, value in data.items():
        if key not in known:
            close = difflib.get_close_matches(key, list(known), n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ConfigError(f"{where}: unknown key '{prefix}{key}'{hint}")
        kwargs[key] = _convert(hints[key], value, prefix + key, where, _default(known[key]))
    obj = replace(base, **kwargs) if base is not None else cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        try:
            validate()
        except _Invalid as exc:
            raise ConfigError(f"{where}: '{prefix}{exc.key}' {exc}") from None
    return obj


# Keep dataclass defaults honest: every field must have one, so that an empty file is valid.
assert all(f.default is not MISSING or f.default_factory is not MISSING for f in fields(Settings))
