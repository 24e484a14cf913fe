"""The numbers the core runs by, taken from the settings once at start-up (no defaults here:
the settings are their one source)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from .money import Money


@dataclass(frozen=True)
class Policy:
    default_model: str
    max_prompt_chars: int
    default_strength: float  # variations: how far from the source (0 keeps it, 1 ignores it)
    upscale_factor: int
    job_timeout_s: float
    max_upload_bytes: int
    max_upload_pixels: int
    max_requests_per_user: int
    blocked_outputs_are_paid: bool
    daily_spend_cap_micros: int  # paid generation per UTC day; 0: no cap
    budget_period: str  # day, week or month: what guild caps and reports count over
    # Moderation: keep the prompt text in the moderation log; cool-downs after repeated blocks.
    log_prompts: bool = False
    cooldown_after: int = 0  # blocked requests within cooldown_window_s; 0: no cool-down
    cooldown_window_s: float = 600.0
    cooldown_s: float = 900.0
    tip_under_words: int = 0  # prompts of fewer words get a tip (core.advice); 0: never
    # Default negative prompts by model name or family (see core.negatives).
    negative_prompts: Mapping[str, str] = field(default_factory=dict)
    # Generators whose cost is not money spent with someone else (the daily cap does not apply).
    unpaid_providers: frozenset[str] = frozenset({"local", "comfyui", "a1111"})
    # Budgets: images per rolling hour (0: no limit); a guild's cap per period where the guild
    # set none (0: none); free local images counted per member and period instead of charged
    # (0: local images cost money like any other); how amounts are shown.
    user_images_per_hour: int = 0
    guild_images_per_hour: int = 0
    guild_cap_micros: int = 0
    free_images_per_period: int = 0
    money: Money = field(default_factory=Money)
