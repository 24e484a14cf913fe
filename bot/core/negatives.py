"""Default negative prompts: what a model that takes a negative prompt gets when the request
gives none. A member's own negative prompt replaces the default, or extends it when it starts
with `+` (`--no +watermark`). The default that was used is recorded on the job like any other
parameter, so the image can be made again.

Defaults are looked up by model name, then by the model's family (sd1, sd2, sdxl...). They are
left out where they would do nothing: at a guidance scale of 1 or less (Turbo models at 0), and
for models that take no negative prompt (DALL-E, Flux)."""

from __future__ import annotations

from collections.abc import Mapping

from .models import ModelSpec

_COMMON = "lowres, blurry, jpeg artifacts, watermark, signature, text, cropped, worst quality"
BUILTIN: Mapping[str, str] = {
    "sd1": f"{_COMMON}, deformed, bad anatomy, extra fingers, mutated hands, disfigured",
    "sd2": f"{_COMMON}, deformed, bad anatomy, extra limbs, disfigured",
    "sdxl": f"{_COMMON}, deformed, bad anatomy, extra limbs",
}


def default_for(spec: ModelSpec, table: Mapping[str, str]) -> str | None:
    """The configured (or built-in) default for this model; "" in the table switches one off."""
    for key in (spec.name, spec.family):
        if key and key in table:
            return table[key] or None
    return None


def negative_for(
    asked: str | None, spec: ModelSpec, guidance: float | None, table: Mapping[str, str]
) -> str | None:
    """The negative prompt this model gets for what was asked (None: none given)."""
    extend = asked is not None and asked.startswith("+")
    if asked is not None and not extend:
        return asked
    own = asked[1:].strip(" ,") if asked is not None else ""
    effective = guidance if guidance is not None else spec.default_guidance
    default = default_for(spec, table)
    if not spec.negative_prompt or default is None or (effective is not None and effective <= 1):
        return own or None
    return f"{default}, {own}" if own else default
