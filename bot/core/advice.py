"""Advice for short prompts: three words give ordinary pictures. A prompt of fewer than
`tip_under_words` words gets one line of advice, privately, at most once a day per member, and
not in a guild that switched tips off."""

from __future__ import annotations

TIP_INTERVAL_S = 24 * 3600
TIP = (
    "\U0001f4a1 Tip: short prompts give ordinary pictures. Say more: the subject and what it does, a "
    "style or medium (oil painting, 35mm photo), the lighting and the composition"
)


def tip_for(prompt: str, under_words: int, *, can_enhance: bool) -> str | None:
    """The advice for `prompt` (the prompt as typed), or None when it is long enough."""
    if under_words <= 0 or len(prompt.split()) >= under_words:
        return None
    return TIP + (", or add --enhance to have it done for you." if can_enhance else ".")
