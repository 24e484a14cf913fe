"""The outcome of screening a prompt or an image."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    rule: str | None = None  # the rule that blocked it; None when allowed
    # For the user: names the rule, never repeats the offending words.
    reason: str | None = None
    # Image screens: the highest classifier score among blocked labels, for tuning the threshold.
    score: float | None = None


ALLOWED = Verdict(allowed=True)
