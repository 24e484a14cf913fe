"""Prompt normalisation: the inline flags of a prompt merged, once, with the request's own
parameters. A value given both ways must agree; the seed is bounded here and nowhere else."""

from __future__ import annotations

import math
import unicodedata
from dataclasses import dataclass
from typing import Any

from .flags import FlagError, parse_aspect, parse_flags
from .models import MAX_SEED, ErrorCode, GenerationParams, JobRequest, Kind, Refusal

_TWICE = {
    "negative_prompt": "the negative prompt",
    "seed": "the seed",
    "model": "the model",
    "steps": "steps",
    "guidance": "guidance",
}


@dataclass(frozen=True)
class Normalised:
    params: GenerationParams  # the prompt without its flags; what was asked, merged
    aspect: tuple[int, int] | None
    enhance: bool = False  # expand the prompt with a chat model first


MAX_USER_ID_CHARS = 100


def usage(message: str) -> Refusal:
    return Refusal(ErrorCode.USAGE, message)


def clean_text(text: str, what: str, limit: int) -> str:
    """`text` without control characters (tabs and newlines become spaces), within `limit`;
    refused if it is not valid Unicode text (a lone surrogate, from undecodable bytes)."""
    if not isinstance(text, str):
        raise usage(f"the {what} must be text")
    if any("\ud800" <= c <= "\udfff" for c in text):
        raise usage(f"the {what} is not valid text (it has bytes that are not UTF-8)")
    if len(text) > limit:
        raise usage(f"the {what} is {len(text)} characters; the limit is {limit}")
    return "".join(
        " " if c in "\t\r\n" else c for c in text if c in "\t\r\n" or unicodedata.category(c) != "Cc"
    )


def visible(text: str) -> bool:
    """Whether `text` has something to see: not only spaces, NULs or zero-width characters."""
    return any(not c.isspace() and unicodedata.category(c) not in ("Cc", "Cf", "Zs") for c in text)


def check_user_id(user_id: str) -> None:
    if not isinstance(user_id, str) or not visible(user_id) or len(user_id) > MAX_USER_ID_CHARS:
        raise usage(f"a user id must be 1-{MAX_USER_ID_CHARS} visible characters")
    if any(unicodedata.category(c) in ("Cc", "Cf", "Cs") for c in user_id):
        raise usage("a user id cannot hold control characters")


def _check_numbers(params: GenerationParams) -> None:
    for name in ("seed", "steps"):
        value = getattr(params, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise usage(f"{name} must be a whole number")
    for name in ("guidance", "strength"):
        value = getattr(params, name)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
        ):
            raise usage(f"{name} must be a finite number")
    if params.steps is not None and not 1 <= params.steps <= 1000:
        raise usage("steps must be 1-1000")


def normalise(request: JobRequest, max_prompt_chars: int) -> Normalised:
    if request.kind not in tuple(Kind):
        raise Refusal(ErrorCode.USAGE, f"unknown request kind {request.kind!r}")
    check_user_id(request.user_id)
    _check_numbers(request.params)
    negative = clean_text(request.params.negative_prompt or "", "negative prompt", max_prompt_chars)
    asked = request.params.but(
        prompt=clean_text(request.params.prompt, "prompt", max_prompt_chars),
        negative_prompt=negative if visible(negative) else None,
    )
    try:
        parsed = parse_flags(asked.prompt)
    except FlagError as exc:
        raise Refusal(ErrorCode.USAGE, str(exc)) from None
    merged = {name: _pick(getattr(parsed, name), getattr(asked, name), what) for name, what in _TWICE.items()}
    seed = merged["seed"]
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise Refusal(ErrorCode.USAGE, f"the seed must be a whole number from 0 to {MAX_SEED}")
    for key in parsed.options.keys() & asked.options.keys():
        _pick(parsed.options[key], asked.options[key], key)
    aspect = _pick(parsed.aspect, request.aspect, "the aspect ratio")
    defaults = request.defaults
    if defaults is not None and request.kind in (Kind.IMAGINE, Kind.EDIT):
        merged["model"] = merged["model"] or defaults.model
    if defaults is not None and request.kind == Kind.IMAGINE and aspect is None and defaults.aspect:
        try:
            aspect = parse_aspect(defaults.aspect)
        except FlagError as exc:
            raise Refusal(ErrorCode.USAGE, f"your default aspect: {exc}") from None
    params = asked.but(
        prompt=parsed.prompt,
        options={**asked.options, **parsed.options},
        **merged,
    )
    enhance = bool(parsed.enhance or request.enhance)
    if (
        request.enhance is None
        and not parsed.enhance
        and defaults is not None
        and request.kind == Kind.IMAGINE
    ):
        enhance = defaults.enhance
    return Normalised(params, aspect, enhance)


def _pick(flag_value: Any, arg_value: Any, name: str) -> Any:
    if flag_value is not None and arg_value is not None and flag_value != arg_value:
        raise Refusal(ErrorCode.USAGE, f"{name} is given twice, with different values")
    return flag_value if flag_value is not None else arg_value
