"""Image screens built on Hugging Face models: an image classifier, and diffusers' safety checker.

Both load lazily (on first use, once, under a lock), never at import, and need the 'local' extra
(torch and transformers; the safety checker also diffusers). Screens are synchronous and
CPU-bound: callers run them in a worker thread.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bot.core.models import ALLOWED, Verdict
from moderation.image import ImageScreenUnavailable, is_minors_rule

if TYPE_CHECKING:
    from PIL import Image

LOCAL_EXTRA_HINT = "the {what} needs the 'local' extra (torch, {packages}): pip install 'easel[local]'"
SAFETY_CHECKER_RULE = "nsfw"
# "owner/name": how a Hugging Face hub id looks (a path that exists on disk wins over this).
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_TRUTHY = {"1", "true", "yes", "on"}


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUTHY


def looks_like_hub_id(source: str) -> bool:
    """"owner/name", and neither an existing path nor one under an existing folder "owner"."""
    if not _HUB_ID.match(source):
        return False
    return not Path(source).exists() and not Path(source.split("/")[0]).is_dir()


def local_files_only(source: str) -> bool:
    """Only a hub id, with HF_HUB_OFFLINE unset, may reach the network; anything else stays local."""
    return not (looks_like_hub_id(source) and not hub_offline())


def _missing_modules(*names: str) -> list[str]:
    return [name for name in names if importlib.util.find_spec(name) is None]


def _source_problem(source: str, what: str) -> str | None:
    """Why `source` (a folder or a hub id) cannot be loaded from, as far as we can tell cheaply."""
    if looks_like_hub_id(source):
        if not hub_offline():
            return None  # downloaded on first use
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(source, "config.json"), str):
            return None
        return f"the {what} {source!r} is not in the Hugging Face cache and HF_HUB_OFFLINE is set"
    folder = Path(source).expanduser()
    if not folder.is_dir():
        return f"the {what} folder {str(folder)!r} does not exist"
    if not (folder / "config.json").is_file():
        return f"the {what} folder {str(folder)!r} has no config.json"
    return None


def judge_scores(
    scores: Mapping[str, float],
    *,
    blocked: Mapping[str, float],
    allowed_here: frozenset[str] = frozenset(),
) -> Verdict:
    """Decide on a classifier's label scores (label -> probability; labels lower-cased).

    Blocks on the highest-scoring label of `blocked` (label -> threshold) whose score is at or
    above its threshold, skipping the labels in `allowed_here`. An allowed verdict carries the
    highest score among the blocked labels, for tuning.
    """
    hits = [
        (score, label)
        for label, score in scores.items()
        if label in blocked and label not in allowed_here and score >= blocked[label]
    ]
    if not hits:
        watched = [score for label, score in scores.items() if label in blocked]
        return Verdict(allowed=True, score=max(watched, default=None))
    score, label = max(hits)
    return Verdict(
        allowed=False,
        rule=label,
        reason=f"the image was flagged by the image classifier as {label} (score {score:.2f})",
        score=score,
    )


class ClassifierScreen:
    """A transformers image-classification model (e.g. a ViT NSFW detector) as an image screen.

    `model` is a local folder (what `save_pretrained` writes) or a hub id ("owner/name"). Only a
    hub id may be downloaded, and only while HF_HUB_OFFLINE is unset; a folder is read with
    local_files_only. `blocked` maps the labels to block (as the model's config names them,
    case-insensitively) to their thresholds; a block's rule is the label, lower-cased. The labels
    in `nsfw_allowed` are allowed in age-restricted channels (never a minors label).
    """

    def __init__(
        self,
        model: str,
        *,
        blocked: Mapping[str, float],
        nsfw_allowed: frozenset[str] = frozenset(),
        device: str = "cpu",
    ):
        if not blocked:
            raise ValueError("at least one classifier label must be blocked")
        for label, threshold in blocked.items():
            if not 0.0 < threshold <= 1.0:
                raise ValueError(
                    f"the threshold for {label!r} must be above 0 and at most 1, not {threshold}"
                )
        minors = sorted(label for label in nsfw_allowed if is_minors_rule(label))
        if minors:
            raise ValueError(f"images of minors are blocked in every channel; cannot allow {minors}")
        self.model = str(model)
        self.blocked = {label.lower(): float(t) for label, t in blocked.items()}
        self.nsfw_allowed = frozenset(label.lower() for label in nsfw_allowed)
        self.device = device
        self._loaded: tuple[Any, Any, dict[int, str], bool] | None = None
        self._load_lock = threading.Lock()

    def _labels_problem(self, labels: set[str]) -> str | None:
        unknown = (set(self.blocked) | self.nsfw_allowed) - labels
        if not unknown:
            return None
        return (
            f"the image classifier {self.model!r} has no label {sorted(unknown)}; "
            f"its labels: {sorted(labels)}"
        )

    def unavailable_reason(self) -> str | None:
        missing = _missing_modules("torch", "transformers")
        if missing:
            return LOCAL_EXTRA_HINT.format(what="image classifier", packages="transformers")
        problem = _source_problem(self.model, "image classifier")
        if problem or looks_like_hub_id(self.model):
            return problem
        try:
            config = json.loads((Path(self.model).expanduser() / "config.json").read_text("utf-8"))
        except (OSError, ValueError) as exc:
            return f"the image classifier's config.json cannot be read: {exc}"
        labels = config.get("id2label")
        if not isinstance(labels, dict):
            return f"the model in {self.model!r} names no labels (no id2label): not a classifier?"
        return self._labels_problem({str(label).lower() for label in labels.values()})

    def _load(self) -> tuple[Any, Any, dict[int, str], bool]:
        if self._loaded is None:
            with self._load_lock:
                if self._loaded is None:  # another thread may have loaded it while we waited
                    self._loaded = self._load_now()
        return self._loaded

    def _load_now(self) -> tuple[Any, Any, dict[int, str], bool]:
        hint = LOCAL_EXTRA_HINT.format(what="image classifier", packages="transformers")
        try:
            from transformers import AutoImageProcessor, AutoModelForImageClassification
        except ImportError as exc:
            raise ImageScreenUnavailable(f"{hint} ({exc})") from None
        problem = _source_problem(self.model, "image classifier")
        if problem:
            raise ImageScreenUnavailable(problem)
        source = str(Path(self.model).expanduser()) if not looks_like_hub_id(self.model) else self.model
        local = local_files_only(self.model)
        try:
            processor = AutoImageProcessor.from_pretrained(source, local_files_only=local)
            model = AutoModelForImageClassification.from_pretrained(source, local_files_only=local)
        except (OSError, ValueError, KeyError) as exc:
            raise ImageScreenUnavailable(f"the image classifier {self.model!r} cannot be loaded: {exc}") from exc
        model.to(self.device).eval()
        id2label = {int(i): str(label).lower() for i, label in model.config.id2label.items()}
        problem = self._labels_problem(set(id2label.values()))
        if problem:
            raise ImageScreenUnavailable(problem)
        multi_label = getattr(model.config, "problem_type", None) == "multi_label_classification"
        return processor, model, id2label, multi_label

    def label_scores(self, image: Image.Image) -> dict[str, float]:
        """Every label's probability for the image (labels lower-cased)."""
        processor, model, id2label, multi_label = self._load()
        import torch

        inputs = processor(images=image.convert("RGB"), return_tensors="pt").to(self.device)
        with torch.inference_mode():
            logits = model(**inputs).logits[0].float()
        probs = torch.sigmoid(logits) if multi_label else torch.softmax(logits, dim=-1)
        return {id2label[i]: float(p) for i, p in enumerate(probs.tolist())}

    def screen_image(self, image: Image.Image, *, nsfw_channel: bool = False) -> Verdict:
        return judge_scores(
            self.label_scores(image),
            blocked=self.blocked,
            allowed_here=self.nsfw_allowed if nsfw_channel else frozenset(),
        )


class SafetyCheckerScreen:
    """diffusers' StableDiffusionSafetyChecker, read from a local folder, as an image screen.

    `path` is either a Stable Diffusion pipeline folder (with safety_checker/ and
    feature_extractor/ in it) or a folder holding the checker's config.json and weights beside
    its preprocessor_config.json. A flagged image is blocked with rule "nsfw" (the checker gives
    no score). It blocks in every channel unless `allow_in_nsfw_channels`; wrap it in
    ChannelPolicy for a per-category choice.
    """

    def __init__(self, path: str | Path, *, allow_in_nsfw_channels: bool = False, device: str = "cpu"):
        self.path = Path(path).expanduser()
        self.allow_in_nsfw_channels = allow_in_nsfw_channels
        self.device = device
        self._loaded: tuple[Any, Any] | None = None
        self._load_lock = threading.Lock()

    def _folders(self) -> tuple[Path, Path]:
        """The checker's folder and its image processor's folder."""
        if (self.path / "safety_checker").is_dir():
            return self.path / "safety_checker", self.path / "feature_extractor"
        return self.path, self.path

    def unavailable_reason(self) -> str | None:
        if _missing_modules("torch", "transformers", "diffusers"):
            return LOCAL_EXTRA_HINT.format(what="safety checker", packages="transformers, diffusers")
        checker, processor = self._folders()
        problem = _source_problem(str(checker), "safety checker")
        if problem:
            return problem
        if not (processor / "preprocessor_config.json").is_file():
            return f"the safety checker's image processor {str(processor)!r} has no preprocessor_config.json"
        return None

    def _load(self) -> tuple[Any, Any]:
        if self._loaded is None:
            with self._load_lock:
                if self._loaded is None:
                    self._loaded = self._load_now()
        return self._loaded

    def _load_now(self) -> tuple[Any, Any]:
        reason = self.unavailable_reason()
        if reason:
            raise ImageScreenUnavailable(reason)
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
        from transformers import CLIPImageProcessor

        checker_dir, processor_dir = self._folders()
        try:
            processor = CLIPImageProcessor.from_pretrained(processor_dir, local_files_only=True)
            checker = StableDiffusionSafetyChecker.from_pretrained(checker_dir, local_files_only=True)
        except (OSError, ValueError, KeyError) as exc:
            raise ImageScreenUnavailable(f"the safety checker in {str(self.path)!r} cannot be loaded: {exc}") from exc
        checker.to(self.device).eval()
        return processor, checker

    def flagged(self, image: Image.Image) -> bool:
        processor, checker = self._load()
        import numpy as np

        rgb = image.convert("RGB")
        clip_input = processor(images=rgb, return_tensors="pt").pixel_values.to(self.device, checker.dtype)
        # The checker blacks out flagged images in place; it is handed a throwaway copy.
        pixels = np.asarray(rgb, dtype=np.float32)[None] / 255.0
        _, has_nsfw = checker(clip_input=clip_input, images=pixels)
        return bool(has_nsfw[0])

    def screen_image(self, image: Image.Image, *, nsfw_channel: bool = False) -> Verdict:
        if nsfw_channel and self.allow_in_nsfw_channels:
            return ALLOWED
        if not self.flagged(image):
            return ALLOWED
        return Verdict(
            allowed=False,
            rule=SAFETY_CHECKER_RULE,
            reason="the image was flagged as NSFW by the Stable Diffusion safety checker",
        )
