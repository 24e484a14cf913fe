"""What a cloud generator offers and charges: its price table with the operator's overrides merged
in, and the subset of its models the operator enabled. Both are checked when the generator is
built, so a typo in the configuration fails at start-up, not on a user's first request.
"""
from __future__ import annotations

import math
from typing import Mapping

from generators.base import ModelSpec, UnsupportedRequest


def merge_prices(
    provider: str, defaults: Mapping[str, float], overrides: Mapping[str, float] | None
) -> dict[str, float]:
    """`defaults` updated with `overrides`; unknown keys and negative prices raise ValueError."""
    prices = dict(defaults)
    for key, value in (overrides or {}).items():
        if key not in defaults:
            raise ValueError(
                f"unknown {provider} price {key!r}; known prices: {', '.join(sorted(defaults))}"
            )
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not is_number or not math.isfinite(value) or value < 0:
            raise ValueError(f"{provider} price {key!r} must be a number of USD >= 0, not {value!r}")
        prices[key] = float(value)
    return prices


def select_models(
    provider: str, specs: tuple[ModelSpec, ...], enabled: list[str] | None
) -> tuple[ModelSpec, ...]:
    """The specs named (by name or alias) in `enabled`, all of them when it is None."""
    if enabled is None:
        return specs
    names = {n: spec for spec in specs for n in (spec.name, *spec.aliases)}
    unknown = [name for name in enabled if name not in names]
    if unknown:
        known = ", ".join(s.name for s in specs)
        raise ValueError(f"unknown {provider} model(s) {', '.join(unknown)}; known: {known}")
    chosen = {names[name].name for name in enabled}
    return tuple(spec for spec in specs if spec.name in chosen)


def find_model(specs: tuple[ModelSpec, ...], name: str) -> ModelSpec:
    """The spec called `name` (or with that alias), or UnsupportedRequest."""
    for spec in specs:
        if name == spec.name or name in spec.aliases:
            return spec
    raise UnsupportedRequest(
        f"model {name!r} is not served here; models available: {', '.join(s.name for s in specs)}"
    )
