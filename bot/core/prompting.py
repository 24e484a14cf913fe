"""Prompt normalisation: the inline flags of a prompt merged, once, with the request's own
parameters. A value given both ways must agree; the seed is bounded here and nowhere else."""

from __future__ import annotations

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


def normalise(request: JobRequest, max_prompt_chars: int) -> Normalised:
    if request.kind not in tuple(Kind):
        raise Refusal(ErrorCode.USAGE, f"unknown request kind {request.kind!r}")
    asked = request.params.but(negative_prompt=request.params.negative_prompt or None)
    if len(asked.prompt) > max_prompt_chars:
        raise Refusal(
            ErrorCode.USAGE,
            f"the prompt is {len(asked.prompt)} characters; the limit is {max_prompt_chars}",
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
    return Normalised(params, aspect)


def _pick(flag_value: Any, arg_value: Any, name: str) -> Any:
    if flag_value is not None and arg_value is not None and flag_value != arg_value:
        raise Refusal(ErrorCode.USAGE, f"{name} is given twice, with different values")
    return flag_value if flag_value is not None else arg_value
