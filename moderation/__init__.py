"""Screening prompts (term rules) and generated images (an NSFW classifier) before serving."""
from bot.core.models import Verdict
from moderation.classifier import ClassifierScreen, SafetyCheckerScreen, judge_scores
from moderation.image import (
    EXPOSED_LABELS,
    NUDENET_LABELS,
    SPOILER,
    AllScreens,
    ChannelPolicy,
    ImageScreen,
    ImageScreenUnavailable,
    NoImageScreen,
    NudeNetScreen,
    is_minors_rule,
    is_spoiler,
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
    "SPOILER",
    "AllScreens",
    "ChannelPolicy",
    "ClassifierScreen",
    "ImageScreen",
    "ImageScreenUnavailable",
    "NoImageScreen",
    "NudeNetScreen",
    "PromptRule",
    "PromptScreen",
    "SafetyCheckerScreen",
    "Verdict",
    "is_minors_rule",
    "is_spoiler",
    "judge_detections",
    "judge_scores",
]
