"""Screening prompts against term rules.

People dodge word filters with case, spacing, punctuation, accents, invisible characters and digits
("N u D e", "nu-de", "n.u.d.e", "nüde", "nud3"), while a substring search over the squashed text
would flag innocent words ("class" contains "ass"). So the text is split into alphanumeric tokens,
and a term matches a run of whole consecutive tokens that spells it, provided the run looks like one
word broken up rather than separate words that happen to line up ("lol i" is not "loli"):
tokens joined by punctuation without whitespace ("nu-de"), single characters between spaces
("n u d e"), or a space where the term itself has one ("blood bath" also matches "bloodbath").
"""
from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field

from bot.core.models import ALLOWED, Verdict

# Format characters that render as nothing: "nu\u200bde" must read as "nude".
_INVISIBLE = re.compile(
    "[\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180b-\u180f\u200b-\u200f\u202a-\u202e"
    "\u2060-\u206f\u3164\ufe00-\ufe0f\ufeff\uffa0]"
)
# Only the generic combining-accent blocks: stripping every mark would mangle scripts such as
# Devanagari, where marks are vowels.
_ACCENTS = re.compile("[\u0300-\u036f\u1ab0-\u1aff\u1dc0-\u1dff\u20d0-\u20ff\ufe20-\ufe2f]")
# Capturing, so that split() returns separators and tokens interleaved in one C-level pass.
_TOKEN_SPLIT = re.compile(r"([^\W_]+)")
_WHITESPACE = re.compile(r"\s")
# The second reading of a prompt: leetspeak digits and symbols, and Cyrillic/Greek letters that look
# like Latin ones ("nudе" with a Cyrillic е).
_LOOKALIKES = str.maketrans(
    {
        "0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "@": "a", "$": "s",
        "а": "a", "в": "b", "е": "e", "к": "k", "м": "m", "н": "h", "о": "o", "р": "p", "с": "c",
        "т": "t", "у": "y", "х": "x", "і": "i", "ј": "j", "ѕ": "s", "ԁ": "d", "һ": "h", "ӏ": "l",
        "α": "a", "β": "b", "ε": "e", "ι": "i", "κ": "k", "ν": "v", "ο": "o", "ρ": "p", "τ": "t",
        "υ": "u", "χ": "x",
    }
)


def _normalise(text: str) -> str:
    if text.isascii():  # the common case, and NFKC/casefold are no-ops on ASCII beyond lower()
        return text.lower()
    text = _INVISIBLE.sub("", unicodedata.normalize("NFKC", text).casefold())
    return _ACCENTS.sub("", unicodedata.normalize("NFD", text))


@dataclass(frozen=True)
class PromptRule:
    """Terms that block a prompt. A trailing "*" matches any ending ("nude*": nude, nudes);
    spaces inside a term are optional in prompts ("blood bath": bloodbath, blood-bath)."""

    name: str
    terms: tuple[str, ...]
    allow_in_nsfw_channels: bool = False  # exempt in age-restricted channels


DEFAULT_PROMPT_RULES: tuple[PromptRule, ...] = (
    # Exact "loli"/"shota" forms rather than prefixes: "lolita" is also a fashion style and a novel.
    PromptRule(
        "csam",
        (
            "loli", "lolis", "lolicon", "shota", "shotas", "shotacon", "child porn*",
            "underage", "jailbait",
        ),
    ),
    PromptRule(
        "explicit",
        (
            "nude*", "nudity", "naked", "nsfw", "porn*", "hentai", "sex", "sexual", "genital*",
            "penis", "vagina", "nipple*", "erotic*", "xxx", "orgasm*", "masturbat*", "blowjob",
        ),
        allow_in_nsfw_channels=True,
    ),
)


@dataclass(frozen=True)
class _Term:
    rule_index: int
    # Offsets in the squashed term where the term has a space: a prompt may break words only there.
    word_breaks: frozenset[int]


@dataclass
class _TermIndex:
    """Every term of some rules, squashed and looked up by the concatenation of a token run."""

    exact: dict[str, list[_Term]] = field(default_factory=dict)
    prefixes: dict[str, list[_Term]] = field(default_factory=dict)
    prefix_lengths: tuple[int, ...] = ()
    # The first prefix_lengths[0] characters of every prefix term: one lookup rules most tokens out.
    prefix_heads: set[str] = field(default_factory=set)
    # Proper beginnings of terms: a run is only worth extending while it spells one of these.
    stems: set[str] = field(default_factory=set)
    # Beginnings that end at a term's word break: a run may cross a space between words here.
    break_stems: set[str] = field(default_factory=set)
    has_lookalike_terms: bool = False  # a term spelt with digits or lookalikes, such as "r34"

    @classmethod
    def build(cls, rules: Sequence[tuple[int, PromptRule]]) -> _TermIndex:
        index = cls()
        for rule_index, rule in rules:
            for term in rule.terms:
                is_prefix = term.endswith("*")
                tokens = _TOKEN_SPLIT.split(_normalise(term.removesuffix("*")))[1::2]
                key = "".join(tokens)
                breaks, offset = set(), 0
                for token in tokens[:-1]:
                    offset += len(token)
                    breaks.add(offset)
                    index.break_stems.add(key[:offset])
                table = index.prefixes if is_prefix else index.exact
                table.setdefault(key, []).append(_Term(rule_index, frozenset(breaks)))
                index.stems.update(key[:n] for n in range(1, len(key)))
        index.prefix_lengths = tuple(sorted({len(key) for key in index.prefixes}))
        if index.prefix_lengths:
            index.prefix_heads = {key[: index.prefix_lengths[0]] for key in index.prefixes}
        index.has_lookalike_terms = any(
            key != key.translate(_LOOKALIKES) for key in (*index.exact, *index.prefixes)
        )
        return index

    def _terms_at(self, run: str, previous_length: int) -> list[_Term]:
        """Terms spelt by `run`, whose last token starts at `previous_length`."""
        found = list(self.exact.get(run, ()))
        for length in self.prefix_lengths:
            if length > len(run):
                break
            # A prefix must end inside the last token, or a shorter run would have matched it.
            if length > previous_length:
                found.extend(self.prefixes.get(run[:length], ()))
        return found

    def matches(self, text: str) -> list[int]:
        """Rule indexes of the terms found in normalised `text`, in text order."""
        parts = _TOKEN_SPLIT.split(text)
        separators, tokens = parts[0::2], parts[1::2]  # separators[j] comes before tokens[j]
        exact, stems, heads = self.exact, self.stems, self.prefix_heads
        head_length = self.prefix_lengths[0] if self.prefix_lengths else 0
        found: list[int] = []
        for start, run in enumerate(tokens):
            if run not in stems and run not in exact and run[:head_length] not in heads:
                continue  # the common case: nothing starts here
            end, previous_length, breaks_used = start, 0, frozenset()
            while True:
                for term in self._terms_at(run, previous_length):
                    if breaks_used <= term.word_breaks:
                        found.append(term.rule_index)
                if run not in stems or end + 1 == len(tokens):
                    break
                end += 1
                if _WHITESPACE.search(separators[end]) and not (
                    len(tokens[end - 1]) == 1 and len(tokens[end]) == 1
                ):
                    if run not in self.break_stems:
                        break
                    breaks_used = breaks_used | {len(run)}
                previous_length = len(run)
                run += tokens[end]
        return found


class PromptScreen:
    def __init__(self, rules: Sequence[PromptRule]):
        names = [rule.name for rule in rules]
        for rule in rules:
            if not rule.name.strip():
                raise ValueError("a prompt rule needs a name")
            if names.count(rule.name) > 1:
                raise ValueError(f"prompt rule '{rule.name}' is defined twice")
            if isinstance(rule.terms, str) or not rule.terms:
                raise ValueError(f"prompt rule '{rule.name}' needs a list of terms")
            for term in rule.terms:
                if "*" in term.removesuffix("*"):
                    raise ValueError(
                        f"prompt rule '{rule.name}': '*' is only allowed at the end of a term"
                    )
                if not _TOKEN_SPLIT.search(_normalise(term)):
                    raise ValueError(
                        f"prompt rule '{rule.name}' has a term with no letters or digits: {term!r}"
                    )
        self._rules = tuple(rules)
        numbered = list(enumerate(self._rules))
        self._everywhere = _TermIndex.build(numbered)
        self._in_nsfw_channels = _TermIndex.build(
            [(i, rule) for i, rule in numbered if not rule.allow_in_nsfw_channels]
        )

    def screen_prompt(self, text: str, *, nsfw_channel: bool = False) -> Verdict:
        """Block `text` if any applicable rule matches; the earliest such rule listed is named."""
        index = self._in_nsfw_channels if nsfw_channel else self._everywhere
        plain = _normalise(text)
        lookalike = plain.translate(_LOOKALIKES)
        if lookalike == plain:
            readings = [plain]
        elif index.has_lookalike_terms or "@" in plain or "$" in plain:
            readings = [plain, lookalike]
        else:
            # Both readings split into the same tokens, and no term contains a character that the
            # lookalike reading rewrites, so every plain match is also a lookalike match.
            readings = [lookalike]
        found = [rule_index for reading in readings for rule_index in index.matches(reading)]
        if not found:
            return ALLOWED
        rule = self._rules[min(found)]
        if rule.allow_in_nsfw_channels:
            reason = (
                f"the prompt matches the content rule '{rule.name}', "
                "which is allowed only in age-restricted channels"
            )
        else:
            reason = f"the prompt matches the blocked-content rule '{rule.name}'"
        return Verdict(allowed=False, rule=rule.name, reason=reason)
