"""Logs: one line per event, with the job's fields (job id, user, guild, model, provider,
duration) as fields. Human lines on a terminal, JSON lines with `logging.format = "json"` (or
"auto" when stderr is not a terminal). The standard library's logging: every library easel
uses logs through it already, so one handler and one formatter see everything, with no second
logging system to configure. Secret values (tokens, API keys) are masked in every record."""
from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterable
from datetime import UTC, datetime

FIELDS = ("job_id", "user_id", "guild_id", "kind", "model", "provider", "status", "cost_usd", "duration_ms")
MASK = "[secret]"


class Redact(logging.Filter):
    """Masks the given secret values wherever they appear in a record's message."""

    def __init__(self, secrets: Iterable[str]):
        super().__init__()
        self.secrets = sorted({s for s in secrets if s and len(s) >= 6}, key=len, reverse=True)

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets:
            text = record.getMessage()
            masked = text
            for secret in self.secrets:
                masked = masked.replace(secret, MASK)
            if record.exc_info and record.exc_info[1] is not None:
                trace = logging.Formatter().formatException(record.exc_info)
                for secret in self.secrets:
                    trace = trace.replace(secret, MASK)
                record.exc_text, record.exc_info = trace, None
            if masked != text:
                record.msg, record.args = masked, None
        return True


def _fields(record: logging.LogRecord) -> dict[str, object]:
    return {k: getattr(record, k) for k in FIELDS if getattr(record, k, None) is not None}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            **_fields(record),
        }
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["error"] = record.exc_text
        return json.dumps(line, default=str)


class HumanFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        extra = " ".join(f"{k}={v}" for k, v in _fields(record).items())
        return f"{text} {extra}" if extra else text


def setup(format: str, level: str, secrets: Iterable[str], stream=None) -> logging.Handler:
    """Send all logging to `stream` (stderr) in `format` ("human", "json", or "auto")."""
    stream = stream or sys.stderr
    if format == "auto":
        format = "human" if getattr(stream, "isatty", lambda: False)() else "json"
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if format == "json" else HumanFormatter())
    handler.addFilter(Redact(secrets))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    return handler


def secrets_of(settings) -> list[str]:
    """The values of every environment variable the settings name as a secret."""
    names = {settings.discord.token_env, settings.enhance.api_key_env}
    for name in type(settings.generators).model_fields:
        section = getattr(settings.generators, name)
        env = getattr(section, "api_key_env", None)
        if env:
            names.add(env)
    names |= {"OPENAI_API_KEY", "REPLICATE_API_TOKEN", "TOGETHER_API_KEY", "FIREWORKS_API_KEY",
              "GOOGLE_API_KEY", "GEMINI_API_KEY", "DISCORD_TOKEN", "EASEL_GALLERY_SECRET", "EASEL_ADMIN_TOKEN",
              "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"}
    return [os.environ[n] for n in names if os.environ.get(n)]
