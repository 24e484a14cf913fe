"""Midjourney-style inline flags in a prompt: `a cat --seed 42 --no blurry, text --ar 16:9`.

Anything that looks like a flag (`--word`) must be one we know, with a well-formed value: a typo
is a clear error, never silently left in the prompt. Phones often turn `--` into an em or en dash,
so those are read as `--` too.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from .models import LORA_OPTION, MAX_SEED, UnsupportedRequest, parse_loras


class FlagError(ValueError):
    """A malformed or unknown inline flag; the message is for the user."""


@dataclass(frozen=True)
class ParsedPrompt:
    prompt: str
    seed: int | None = None
    negative_prompt: str | None = None
    aspect: tuple[int, int] | None = None
    model: str | None = None
    steps: int | None = None
    guidance: float | None = None
    options: Mapping[str, str] = field(default_factory=dict)
    enhance: bool | None = None  # --enhance: a chat model expands the prompt first


# Model options that may be set inline (`--quality hd`); each model declares the values it takes.
OPTION_FLAGS = ("quality", "style", "sampler")
_FLAG = re.compile(r"(?:(?<=\s)|^)(?:--|\u2014|\u2013)([A-Za-z][\w-]*)(?=\s|$)")
_NAMES = {
    "seed": "seed",
    "no": "negative_prompt",
    "ar": "aspect",
    "aspect": "aspect",
    "model": "model",
    "steps": "steps",
    "guidance": "guidance",
    "cfg": "guidance",
    **{name: name for name in OPTION_FLAGS},
    "enhance": "enhance",
    "lora": LORA_OPTION,
}
_SWITCHES = ("enhance",)  # flags that take no value
_REPEATABLE = (LORA_OPTION,)  # `--lora a --lora b:0.5`: up to three LoRAs
FLAG_HELP = (
    "--seed N, --no TEXT, --ar W:H, --model NAME, --steps N, --guidance F, "
    + ", ".join(f"--{name} VALUE" for name in OPTION_FLAGS)
    + ", --enhance, --lora NAME[:WEIGHT]"
)


def parse_seed(text: str) -> int:
    if not re.fullmatch(r"\d{1,10}", text.strip()):
        raise FlagError(f"--seed takes a whole number from 0 to {MAX_SEED}, not {text!r}")
    seed = int(text)
    if seed > MAX_SEED:
        raise FlagError(f"--seed takes a whole number from 0 to {MAX_SEED}, not {text!r}")
    return seed


def parse_aspect(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d{1,3})\s*[:x/]\s*(\d{1,3})\s*", text)
    if not m or int(m.group(1)) == 0 or int(m.group(2)) == 0:
        raise FlagError(f"--ar takes a ratio like 16:9, not {text!r}")
    w, h = int(m.group(1)), int(m.group(2))
    if max(w / h, h / w) > 4:
        raise FlagError(f"--ar {w}:{h} is too extreme; ratios up to 4:1 are supported")
    return w, h


def _parse_value(name: str, text: str) -> object:
    if name == "seed":
        return parse_seed(text)
    if name == "aspect":
        return parse_aspect(text)
    if name == "steps":
        if not re.fullmatch(r"\d{1,3}", text) or not 1 <= int(text) <= 150:
            raise FlagError(f"--steps takes a whole number from 1 to 150, not {text!r}")
        return int(text)
    if name == "guidance":
        try:
            value = float(text)
        except ValueError:
            raise FlagError(f"--guidance takes a number from 0 to 30, not {text!r}") from None
        if not 0 <= value <= 30:
            raise FlagError(f"--guidance takes a number from 0 to 30, not {text!r}")
        return value
    if name == "model":
        if not re.fullmatch(r"[\w./:-]{1,100}", text):
            raise FlagError(f"--model takes a model name, not {text!r}")
        return text
    if name == LORA_OPTION:
        try:
            loras = parse_loras(text)
        except UnsupportedRequest as exc:
            raise FlagError(f"--lora: {exc}") from None
        return ",".join(n if w is None else f"{n}:{w:g}" for n, w in loras)
    if name in OPTION_FLAGS:
        if not re.fullmatch(r"[\w.-]{1,40}", text):
            raise FlagError(f"--{name} takes one word, not {text!r}")
        return text
    return text  # negative prompt: free text


def parse_flags(text: str) -> ParsedPrompt:
    """Split `text` into the prompt and its inline flags."""
    matches = list(_FLAG.finditer(text))
    prompt = text[: matches[0].start()] if matches else text
    values: dict[str, object] = {}
    for i, m in enumerate(matches):
        flag = m.group(1).lower()
        if flag not in _NAMES:
            raise FlagError(f"unknown flag --{flag}; flags are: {FLAG_HELP}")
        name = _NAMES[flag]
        if name in values and name not in _REPEATABLE:
            raise FlagError(f"--{flag} is given twice")
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        raw = text[m.end() : end].strip()
        if name in _SWITCHES:
            if raw:
                raise FlagError(f"--{flag} takes no value, but got {raw!r}; put flags after the prompt")
            values[name] = True
            continue
        if not raw:
            raise FlagError(f"--{flag} needs a value")
        if name != "negative_prompt" and len(raw.split()) > 1:
            # Text after a single-valued flag would otherwise vanish from the prompt.
            raise FlagError(f"--{flag} takes one value, but got {raw!r}; put flags after the prompt")
        value = _parse_value(name, raw)
        values[name] = _parse_value(name, f"{values[name]},{value}") if name in values else value
    options = {name: values.pop(name) for name in (*OPTION_FLAGS, *_REPEATABLE) if name in values}
    return ParsedPrompt(prompt=" ".join(prompt.split()), options=options, **values)  # type: ignore[arg-type]


def parse_size(text: str) -> tuple[int, int]:
    """'512x768' -> (512, 768)."""
    m = re.fullmatch(r"\s*(\d{1,5})\s*[x×]\s*(\d{1,5})\s*", text.lower())
    if not m or int(m.group(1)) == 0 or int(m.group(2)) == 0:
        raise FlagError(f"{text!r} is not a size like 512x512")
    return int(m.group(1)), int(m.group(2))


def size_for_aspect(aspect: tuple[int, int], area: int, step: int = 8) -> tuple[int, int]:
    """A size with this aspect ratio and about `area` pixels, each side a multiple of `step`:
    the ratio as exact as the step allows, then the area as close as it can be."""
    ratio = aspect[0] / aspect[1]
    base = round((area / ratio) ** 0.5 / step)
    candidates = []
    for k in range(max(1, base - 3), base + 4):
        h = k * step
        w = max(step, round(h * ratio / step) * step)
        candidates.append((round(abs(w / h - ratio) / ratio, 3), abs(w * h - area), w, h))
    _, _, w, h = min(candidates)
    return w, h
