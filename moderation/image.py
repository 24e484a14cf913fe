"""Screening generated images for nudity before they are posted.

Screens are synchronous and CPU-bound: callers run them in a worker thread.
"""
from __future__ import annotations

import importlib.util
import threading
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Literal, Protocol

from bot.core.models import ALLOWED, Verdict

if TYPE_CHECKING:
    from PIL import Image

# Every label nudenet 3.4's detector can emit, so that a misspelt label in the configuration fails
# loudly instead of never matching.
NUDENET_LABELS = frozenset(
    {
        "FEMALE_GENITALIA_COVERED", "FACE_FEMALE", "BUTTOCKS_EXPOSED", "FEMALE_BREAST_EXPOSED",
        "FEMALE_GENITALIA_EXPOSED", "MALE_BREAST_EXPOSED", "ANUS_EXPOSED", "FEET_EXPOSED",
        "BELLY_COVERED", "FEET_COVERED", "ARMPITS_COVERED", "ARMPITS_EXPOSED", "FACE_MALE",
        "BELLY_EXPOSED", "MALE_GENITALIA_EXPOSED", "ANUS_COVERED", "FEMALE_BREAST_COVERED",
        "BUTTOCKS_COVERED",
    }
)
EXPOSED_LABELS = frozenset(
    {
        "FEMALE_BREAST_EXPOSED",
        "FEMALE_GENITALIA_EXPOSED",
        "MALE_GENITALIA_EXPOSED",
        "ANUS_EXPOSED",
        "BUTTOCKS_EXPOSED",
    }
)
NUDITY_RULE = "nudity"
NSFW_EXTRA_HINT = "the NSFW image classifier needs the 'nsfw' extra: pip install 'easel[nsfw]'"


class ImageScreenUnavailable(RuntimeError):
    """The classifier cannot run here (its package is missing or broken); the message says why."""


class ImageScreen(Protocol):
    def screen_image(self, image: Image.Image, *, nsfw_channel: bool = False) -> Verdict: ...

    def unavailable_reason(self) -> str | None:
        """Why this screen cannot run here, for the operator; None when it can."""
        ...


def judge_detections(
    detections: Iterable[Mapping[str, Any]], *, threshold: float, blocked_labels: frozenset[str]
) -> Verdict:
    """Decide on nudenet detections ({"class": label, "score": float, "box": [x, y, w, h]})."""
    scores = [float(d["score"]) for d in detections if d["class"] in blocked_labels]
    top = max(scores, default=None)
    if top is None or top < threshold:
        return Verdict(allowed=True, score=top)
    return Verdict(
        allowed=False,
        rule=NUDITY_RULE,
        reason=f"the image was flagged as explicit (exposed nudity, score {top:.2f})",
        score=top,
    )


class NudeNetScreen:
    """nudenet's NudeDetector (a small ONNX model shipped in its wheel, so it works offline)."""

    def __init__(
        self,
        threshold: float = 0.5,
        blocked_labels: frozenset[str] = EXPOSED_LABELS,
        nsfw_channel_policy: Literal["allow", "block"] = "allow",
    ):
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"the nudity threshold must be between 0 and 1, not {threshold}")
        unknown = set(blocked_labels) - NUDENET_LABELS
        if unknown:
            raise ValueError(
                f"unknown nudenet labels {sorted(unknown)}; known labels: {sorted(NUDENET_LABELS)}"
            )
        if not blocked_labels:
            raise ValueError("at least one nudenet label must be blocked")
        if nsfw_channel_policy not in ("allow", "block"):
            raise ValueError(
                f'nsfw_channel_policy must be "allow" or "block", not {nsfw_channel_policy!r}'
            )
        self.threshold = threshold
        self.blocked_labels = frozenset(blocked_labels)
        self.nsfw_channel_policy = nsfw_channel_policy
        self.detector: Any = None  # nudenet.NudeDetector, loaded on first use
        self._load_lock = threading.Lock()

    def unavailable_reason(self) -> str | None:
        modules = ("nudenet", "onnxruntime", "cv2")
        if all(importlib.util.find_spec(name) is not None for name in modules):
            return None
        return NSFW_EXTRA_HINT

    def _loaded_detector(self) -> Any:
        if self.detector is None:
            with self._load_lock:
                if self.detector is None:  # another thread may have loaded it while we waited
                    try:
                        from nudenet import NudeDetector
                    except ImportError as exc:
                        raise ImageScreenUnavailable(f"{NSFW_EXTRA_HINT} ({exc})") from None
                    self.detector = NudeDetector()
        return self.detector

    def screen_image(self, image: Image.Image, *, nsfw_channel: bool = False) -> Verdict:
        if nsfw_channel and self.nsfw_channel_policy == "allow":
            return ALLOWED
        detector = self._loaded_detector()
        import numpy as np

        # nudenet takes a path, encoded bytes or an OpenCV-style BGR array; the array skips an
        # encode/decode round trip. Alpha is dropped: the colour channels underneath are screened.
        bgr = np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])
        detections = detector.detect(bgr)
        return judge_detections(
            detections, threshold=self.threshold, blocked_labels=self.blocked_labels
        )


class NoImageScreen:
    """Allows every image: only for deployments that turn image screening off explicitly."""

    def screen_image(self, image: Image.Image, *, nsfw_channel: bool = False) -> Verdict:
        return ALLOWED

    def unavailable_reason(self) -> str | None:
        return None


# A verdict that is allowed and whose reason is SPOILER means "post it, but as a spoiler": the
# image was flagged under the verdict's rule, and the channel's policy lets it through hidden.
SPOILER = "spoiler"
ChannelAction = Literal["allow", "spoiler", "block"]
CHANNEL_ACTIONS = ("allow", "spoiler", "block")


def is_minors_rule(rule: str | None) -> bool:
    """Whether a rule (a screen's category) is about minors: such images are never allowed."""
    name = (rule or "").lower()
    return "minor" in name or "csam" in name


def is_spoiler(verdict: Verdict) -> bool:
    """Whether the verdict says "post it as a spoiler" (see ChannelPolicy)."""
    return verdict.allowed and verdict.reason == SPOILER


class ChannelPolicy:
    """What an age-restricted (NSFW) channel does with each category a screen blocks.

    The wrapped screen is always asked as for an ordinary channel (nsfw_channel=False), so its
    own leniency for NSFW channels does not apply: this wrapper owns the channel decision. In an
    ordinary channel every block stays a block. In an NSFW channel a block under rule R (its
    category, matched case-insensitively) becomes, by `policy[R]` (or `default` for categories
    the policy does not name, and for blocks that name no rule):

    - "allow": allowed, `Verdict(allowed=True, score=...)`;
    - "spoiler": allowed but to be posted as a spoiler, with the convention
      `Verdict(allowed=True, rule=R, reason="spoiler", score=...)`: allowed with reason
      "spoiler" (the SPOILER constant; test it with `is_spoiler`) means "post it as a spoiler";
    - "block": the block, unchanged.

    A minors category (a rule containing "minor" or "csam") is blocked everywhere, whatever the
    policy; naming one in the policy as "allow" or "spoiler" is rejected as a configuration error.
    """

    def __init__(
        self,
        screen: ImageScreen,
        policy: Mapping[str, ChannelAction],
        default: ChannelAction = "block",
    ):
        for category, action in {**policy, "default": default}.items():
            if action not in CHANNEL_ACTIONS:
                raise ValueError(
                    f'the NSFW-channel policy for {category!r} must be "allow", "spoiler" or '
                    f'"block", not {action!r}'
                )
        lenient = sorted(c for c, action in policy.items() if is_minors_rule(c) and action != "block")
        if lenient:
            raise ValueError(
                f"images of minors are blocked in every channel; the policy cannot "
                f"{'/'.join(sorted({policy[c] for c in lenient}))} {lenient}"
            )
        self.screen = screen
        self.policy = {category.lower(): action for category, action in policy.items()}
        self.default = default

    def action_for(self, rule: str | None) -> ChannelAction:
        if is_minors_rule(rule):
            return "block"
        if rule is None:
            return self.default
        return self.policy.get(rule.lower(), self.default)

    def screen_image(self, image: Image.Image, *, nsfw_channel: bool = False) -> Verdict:
        verdict = self.screen.screen_image(image, nsfw_channel=False)
        if verdict.allowed or not nsfw_channel:
            return verdict
        action = self.action_for(verdict.rule)
        if action == "allow":
            return Verdict(allowed=True, score=verdict.score)
        if action == "spoiler":
            return Verdict(allowed=True, rule=verdict.rule, reason=SPOILER, score=verdict.score)
        return verdict

    def unavailable_reason(self) -> str | None:
        return self.screen.unavailable_reason()


class AllScreens:
    """Several screens, run in order: the first block wins and the later screens are not run.

    When none blocks, the first spoiler verdict (see ChannelPolicy) is returned if there is one,
    else an allowed verdict carrying the highest score any screen reported.
    """

    def __init__(self, screens: Iterable[ImageScreen]):
        self.screens = tuple(screens)
        if not self.screens:
            raise ValueError("AllScreens needs at least one screen")

    def screen_image(self, image: Image.Image, *, nsfw_channel: bool = False) -> Verdict:
        spoiler: Verdict | None = None
        scores: list[float] = []
        for screen in self.screens:
            verdict = screen.screen_image(image, nsfw_channel=nsfw_channel)
            if not verdict.allowed:
                return verdict
            if spoiler is None and is_spoiler(verdict):
                spoiler = verdict
            if verdict.score is not None:
                scores.append(verdict.score)
        if spoiler is not None:
            return spoiler
        return Verdict(allowed=True, score=max(scores, default=None))

    def unavailable_reason(self) -> str | None:
        for screen in self.screens:
            reason = screen.unavailable_reason()
            if reason is not None:
                return reason
        return None
