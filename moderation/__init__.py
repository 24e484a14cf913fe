"""Screening prompts (term rules) and generated images (an NSFW classifier) before serving."""
from bot.core.models import Verdict
from moderation.image import (
    EXPOSED_LABELS,
    NUDENET_LABELS,
    ImageScreen,
    ImageScreenUnavailable,
    NoImageScreen,
    NudeNetScreen,
    judge_detections,
)
from moderation.prompt import (
    DEFAULT_PROMPT_RULES,
    LIKENESS_RULE,
    MINORS_RULE,
    PromptRule,
    PromptScreen,
)

__all__ = [
    "DEFAULT_PROMPT_RULES",
    "EXPOSED_LABELS",
    "LIKENESS_RULE",
    "MINORS_RULE",
    "NUDENET_LABELS",
    "ImageScreen",
    "ImageScreenUnavailable",
    "NoImageScreen",
    "NudeNetScreen",
    "PromptRule",
    "PromptScreen",
    "Verdict",
    "judge_detections",
]
