"""Screening prompts against term rules.

People dodge word filters with case, spacing, punctuation, accents, invisible characters, digits,
look-alike letters and stretched letters ("N u D e", "nu-de", "n.u.d.e", "nüde", "nud3", "ｎｕｄｅ",
"nuuuude"), while a substring search over the squashed text would flag innocent words ("class"
contains "ass"). So the text is split into alphanumeric tokens, and a term matches a run of whole
consecutive tokens that spells it, provided the run looks like one word broken up rather than
separate words that happen to line up ("lol i" is not "loli"): tokens joined by punctuation without
whitespace ("nu-de"), single characters between spaces ("n u d e"), or a space where the term itself
has one ("blood bath" also matches "bloodbath").

Repeated letters: a run spells a term when it is the term with some of its letters repeated
("nakkkked", "nakked" and "naked" all spell "naked"), never with letters dropped ("bobs" does not
spell "boobs"). A prefix term's word goes on past it ("nude*": nudes), and English words double
letters, so inside a prefix a letter counts as stretched only when the prompt writes it three times
or more ("nuuudes", but not "poorness" for "porn*"); its last letter may double ("disembowelled").

Two checks are built in and cannot be configured away: the CSAM terms, and the combination of a
term for a minor ("child", "teen", "12 year old", …) with a sexual or suggestive term ("bikini",
"sexy", "nude", …) anywhere in the prompt. Both block in every channel, age-restricted ones included.
Terms for minors or suggestive ones alone are fine ("a child flying a kite", "a woman in a bikini").
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
# A run of one repeated character. Runs never cross a token's edge (a token is letters and digits,
# a separator has none), so collapsing them keeps the tokens and which separators hold whitespace.
# Deleting every character that the same one follows, so that the replacement is no template (which
# Python 3.11 expands per match, in Python).
_REPEATED = re.compile(r"(.)(?=\1)", re.DOTALL)
_RUNS = re.compile(r"(.)\1*", re.DOTALL)
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


# Emoji used as words in prompts that dodge word lists: read as the word they stand for. Only
# the unambiguous ones (a peach or a droplet is usually just that).
_EMOJI_WORDS = str.maketrans({"\U0001f346": " penis ", "\U0001f51e": " nsfw "})


def _normalise(text: str) -> str:
    if text.isascii():  # the common case, and NFKC/casefold are no-ops on ASCII beyond lower()
        return text.lower()
    text = text.translate(_EMOJI_WORDS)
    text = _INVISIBLE.sub("", unicodedata.normalize("NFKC", text).casefold())
    return _ACCENTS.sub("", unicodedata.normalize("NFD", text))


def _collapse(text: str) -> str:
    return _REPEATED.sub("", text)


def _run_lengths(text: str) -> tuple[int, ...]:
    return tuple(len(m.group()) for m in _RUNS.finditer(text))


@dataclass(frozen=True)
class PromptRule:
    """Terms that block a prompt. A trailing "*" matches any ending ("nude*": nude, nudes);
    spaces inside a term are optional in prompts ("blood bath": bloodbath, blood-bath)."""

    name: str
    terms: tuple[str, ...]
    allow_in_nsfw_channels: bool = False  # exempt in age-restricted channels


# --- the built-in term lists ---------------------------------------------------------------------
# Every list avoids words with innocent senses that a filter would trip over: "cock" (rooster,
# cockpit), "ass" (donkey), "dick" (Moby Dick), "pussy" (willow), "cum" (summa cum laude), "tits"
# (blue tits, great tits: birds), "booby" (a seabird), "breast" (chicken, cancer), "erection"
# (of a building), "stockings" (Christmas), "girl" and "young" alone (said of adults all the time).

# Always blocked, in every channel, whatever is configured. Exact "loli"/"shota" forms rather than
# prefixes: "lolita" is also a fashion style and a novel.
CSAM_TERMS: tuple[str, ...] = (
    "loli", "lolis", "lolicon", "shota", "shotas", "shotacon", "child porn*", "underage",
    "jailbait", "pedo", "pedophil*", "paedophil*",
)

SEXUAL_TERMS: tuple[str, ...] = (
    "nude*", "nudity", "naked", "nsfw", "porn*", "hentai", "sex", "sexual", "sexually",
    "genital*", "penis", "vagina", "nipple*", "erotic*", "xxx", "orgasm*", "masturbat*", "blowjob",
    # misspellings and phonetic spellings ("n00d" reads as "nood")
    "nood", "noods", "noodz", "nudez", "nudz", "nekkid", "nakid", "nakd", "nakey", "pron", "secks",
    "seks", "sexx",
    # more of the same, none with an innocent sense
    "topless", "boobs", "boobies", "titties", "titty", "tiddies", "lewd", "lewds", "ecchi", "r34",
    "rule 34", "onlyfans", "milf", "bdsm", "bondage", "fetish*", "dildo*", "cumshot", "creampie",
    "deepthroat*", "handjob", "threesome", "orgy", "orgies", "upskirt", "areola*", "clitoris",
    "labia", "vulva", "anus", "anal", "testicle*", "scrotum", "horny", "intercourse", "fellatio",
    "cunnilingus", "ejaculat*", "semen", "striptease", "stripper*", "nudist*", "nudism",
    "unclothed", "undressed", "bare breasts", "bare breasted", "spread legs", "legs spread",
    "skinny dipping",
)

SEXUAL_VIOLENCE_TERMS: tuple[str, ...] = (
    # Exact forms: "rapeseed" is a crop, "therapist" and "grape" are single tokens anyway.
    "rape", "raped", "raping", "rapist", "rapists", "non consensual", "non consent",
    "sexual assault*", "molest*",
)

GORE_TERMS: tuple[str, ...] = (
    # The line: violence is fine ("a knight slaying a dragon", "a battle scene", "blood moon",
    # "a bloody knife"); graphic injury is gore, allowed only in age-restricted channels.
    "gore", "gory", "gorey", "dismember*", "decapitat*", "disembowel*", "eviscerat*",
    "mutilat*", "behead*", "torture*", "bloodbath", "entrails", "severed head*", "severed limb*",
    "spilled guts", "guts spilling", "mangled corpse*", "mangled body", "snuff film*",
)

HATE_TERMS: tuple[str, ...] = (
    # Phrases that promote hate, not slurs; history stays possible ("a WWII soldier").
    "nazi propaganda", "white power", "kkk", "ku klux klan", "ethnic cleansing", "genocide of",
    "heil hitler", "sieg heil", "white supremac*", "race war", "master race",
)

SELF_HARM_TERMS: tuple[str, ...] = (
    "self harm*", "self mutilat*", "suicide*", "suicidal", "kill myself", "killing myself",
    "cutting myself", "cut myself", "slit wrists", "slit my wrists", "slitting wrists",
    "slitting my wrists", "hang myself", "hanging myself", "pro ana", "thinspo*",
)

# For the combination rule only: these pass on their own ("a child flying a kite").
MINOR_TERMS: tuple[str, ...] = (
    "child", "children", "childs", "childlike", "kid", "kids", "kiddo", "kiddie*", "kiddy", "boy",
    "boys", "little boy*", "young boy*", "school boy*", "little girl*", "young girl*",
    "school girl*", "toddler*", "infant*", "baby", "babies", "newborn*", "teen", "teens",
    "teenage", "teenaged", "teenager*", "pre teen*", "tween", "tweens", "minor", "minors",
    "juvenile*", "adolescen*", "pubescent", "prepubescent", "kindergarten*", "grade schooler*",
    "middle schooler*", "high schooler*", "elementary school*", "middle school*", "junior high",
    "high school girl*", "high school boy*", "barely legal", "underage*", "jailbait",
)

# Suggestive, not explicit: fine on their own ("a woman in a bikini on a beach"), blocked next to a
# term for a minor.
SUGGESTIVE_TERMS: tuple[str, ...] = (
    "lingerie", "bikini*", "seduc*", "sexy", "sexi", "provocative*", "swimsuit*", "swimwear",
    "bathing suit*", "underwear", "panties", "panty", "thong*", "bra", "bras", "bedroom eyes",
    "sensual*", "suggestive*", "cleavage", "busty", "skimpy", "revealing outfit*",
    "revealing clothes", "see through", "pin up*", "boudoir", "wet t shirt", "flirty",
    "flirtatious", "alluring", "sultry", "undressing", "lap dance*", "twerk*", "garter*",
)

DEFAULT_PROMPT_RULES: tuple[PromptRule, ...] = (
    # Listed first, the rules blocked everywhere are the ones named when several match.
    PromptRule("csam", CSAM_TERMS),
    PromptRule("hate", HATE_TERMS),
    PromptRule("self-harm", SELF_HARM_TERMS),
    PromptRule("sexual-violence", SEXUAL_VIOLENCE_TERMS),
    PromptRule("explicit", SEXUAL_TERMS, allow_in_nsfw_channels=True),  # the sexual category
    PromptRule("gore", GORE_TERMS, allow_in_nsfw_channels=True),
)

# Real people's likeness: no names by default; PromptScreen(..., real_people=[...]) adds the rule.
LIKENESS_RULE = "likeness"
MINORS_RULE = "minors"
CSAM_RULE = "csam"

# "12 year old", "12-year-old", "12yo", "12 y/o", "aged 12", "age: 12", "under 18", "under the age
# of 18": an age that makes the combination rule apply when it is under 18 (18 or under for "under").
_NUMBER_WORDS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen twenty"
).split()
_NUMBER = r"(\d{1,3}|" + "|".join(_NUMBER_WORDS) + ")"
_AGE = re.compile(
    rf"(?<![^\W_]){_NUMBER}[\s_-]*(?:years?|yrs?|y)[\s_./-]*(?:old|o(?![^\W_]))"
    rf"|(?<![^\W_])aged?[\s:_-]*(?:of[\s_-]*)?{_NUMBER}(?![^\W_])"
    rf"|(?<![^\W_])(under)[\s_-]*(?:the[\s_-]*age[\s_-]*of[\s_-]*)?{_NUMBER}(?![^\W_])"
)


def _age_of(number: str) -> int:
    return int(number) if number.isdigit() else _NUMBER_WORDS.index(number)


# Cheap to scan for (it starts with a letter): most prompts have none of these, and skip _AGE.
_AGE_HINT = re.compile(r"y(?:ears?|rs?)?[\s_./-]*o(?:ld)?(?![^\W_])|age|under")


def _mentions_a_minor_by_age(text: str) -> bool:
    if not _AGE_HINT.search(text):
        return False
    for match in _AGE.finditer(text):
        first, second, under, third = match.groups()
        if first is not None and _age_of(first) < 18:
            return True
        if second is not None and _age_of(second) < 18:
            return True
        if under is not None and _age_of(third) <= 18:
            return True
    return False


@dataclass(frozen=True)
class _Term:
    rule_index: int
    # Offsets in the collapsed term where the term has a space: a prompt may break words only there.
    word_breaks: frozenset[int]
    # The lengths of the runs of repeated letters in the squashed term ("naked": 1,1,1,1,1).
    run_lengths: tuple[int, ...]
    is_prefix: bool

    def spelt_by(self, squashed: str) -> bool:
        """Whether `squashed` (prompt tokens, joined, whose collapsed form spells this term) is the
        term with letters repeated and none dropped."""
        found = _run_lengths(squashed)
        mine = self.run_lengths
        if len(found) < len(mine) or (not self.is_prefix and len(found) != len(mine)):
            return False
        last = len(mine) - 1
        for i, (have, need) in enumerate(zip(found, mine, strict=False)):
            # English doubles letters, and a prefix term's word goes on ("poorness" starts "poor",
            # not "porn"): inside a prefix only a letter written three times reads as stretched,
            # though its last letter may double ("disembowelled").
            if have < need or (self.is_prefix and i < last and have != need and have < 3):
                return False
        return True


@dataclass
class _TermIndex:
    """Every term of some rules, squashed and collapsed ("bloodbath": "blodbath"), looked up by the
    collapsed concatenation of a token run."""

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
                squashed = "".join(tokens)
                key, breaks = "", set()
                for i, token in enumerate(tokens):
                    if i:
                        breaks.add(len(key))
                        index.break_stems.add(key)
                    key = _join(key, _collapse(token))
                table = index.prefixes if is_prefix else index.exact
                entry = _Term(rule_index, frozenset(breaks), _run_lengths(squashed), is_prefix)
                table.setdefault(key, []).append(entry)
                index.stems.update(key[:n] for n in range(1, len(key)))
                index.has_lookalike_terms |= squashed != squashed.translate(_LOOKALIKES)
        index.prefix_lengths = tuple(sorted({len(key) for key in index.prefixes}))
        if index.prefix_lengths:
            index.prefix_heads = {key[: index.prefix_lengths[0]] for key in index.prefixes}
        return index

    def _terms_at(self, run: str, previous_length: int) -> list[_Term]:
        """Terms spelt by collapsed `run`, whose last token starts at `previous_length`."""
        found = list(self.exact.get(run, ()))
        if run[: self.prefix_lengths[0] if self.prefix_lengths else 0] not in self.prefix_heads:
            return found
        for length in self.prefix_lengths:
            if length > len(run):
                break
            # A prefix must end inside the last token, or a shorter run would have matched it.
            if length > previous_length:
                found.extend(self.prefixes.get(run[:length], ()))
        return found

    def matches(self, text: str) -> set[int]:
        """Rule indexes of the terms found in normalised `text`."""
        collapsed = _collapse(text)
        parts = _TOKEN_SPLIT.split(collapsed)
        separators, tokens = parts[0::2], parts[1::2]  # separators[j] comes before tokens[j]
        raw_tokens: list[str] | None = None if collapsed != text else tokens
        exact, stems, heads = self.exact, self.stems, self.prefix_heads
        head_length = self.prefix_lengths[0] if self.prefix_lengths else 0
        found: set[int] = set()
        for start, run in enumerate(tokens):
            if run not in stems and run not in exact and run[:head_length] not in heads:
                continue  # the common case: nothing starts here
            end, previous_length, breaks_used = start, 0, frozenset()
            while True:
                for term in self._terms_at(run, previous_length):
                    if term.rule_index in found or not breaks_used <= term.word_breaks:
                        continue
                    if raw_tokens is None:
                        raw_tokens = _TOKEN_SPLIT.split(text)[1::2]
                    if term.spelt_by("".join(raw_tokens[start : end + 1])):
                        found.add(term.rule_index)
                if end + 1 == len(tokens) or (
                    # A token that only repeats the run's last letter keeps spelling the same
                    # term: "t o p l e s s" collapses to "toples" before its last "s".
                    run not in stems and tokens[end + 1] != run[-1]
                ):
                    break
                end += 1
                if _WHITESPACE.search(separators[end]) and not (
                    len(tokens[end - 1]) == 1 and len(tokens[end]) == 1
                ):
                    if run not in self.break_stems:
                        break
                    breaks_used = breaks_used | {len(run)}
                previous_length = len(run)
                run = _join(run, tokens[end])
        return found


def _join(run: str, token: str) -> str:
    """Collapsed `run` followed by collapsed `token`, collapsed: "blo" + "od" is "blod"."""
    return run + token[1:] if run and token[0] == run[-1] else run + token


# Rule indexes of the built-in checks in every _TermIndex; the configured rules follow them.
_CSAM, _MINOR, _SEXUAL_OR_SUGGESTIVE = 0, 1, 2
_BUILT_IN = (
    (_CSAM, PromptRule(CSAM_RULE, CSAM_TERMS)),
    (_MINOR, PromptRule(MINORS_RULE, MINOR_TERMS)),
    (
        _SEXUAL_OR_SUGGESTIVE,
        PromptRule("sexual-or-suggestive", SEXUAL_TERMS + SEXUAL_VIOLENCE_TERMS + SUGGESTIVE_TERMS),
    ),
)
_FIRST_CONFIGURED = len(_BUILT_IN)


def _blocked(name: str, *, allowed_in_nsfw_channels: bool = False) -> Verdict:
    if allowed_in_nsfw_channels:
        reason = (
            f"the prompt matches the content rule '{name}', "
            "which is allowed only in age-restricted channels"
        )
    else:
        reason = f"the prompt matches the blocked-content rule '{name}'"
    return Verdict(allowed=False, rule=name, reason=reason)


_CSAM_VERDICT = _blocked(CSAM_RULE)
_MINORS_VERDICT = Verdict(
    allowed=False,
    rule=MINORS_RULE,
    reason=f"the prompt matches the blocked-content rule '{MINORS_RULE}', in every channel",
)


class PromptScreen:
    """Screens prompts against configured rules (DEFAULT_PROMPT_RULES, or a table that replaces
    them) plus two built-in checks no configuration removes: CSAM terms, and a term for a minor
    together with a sexual or suggestive one. `real_people` adds a "likeness" rule of names."""

    def __init__(self, rules: Sequence[PromptRule], *, real_people: Sequence[str] = ()):
        rules = list(rules)
        if isinstance(real_people, str):
            raise ValueError("real_people needs a list of names")
        if real_people:
            rules.append(PromptRule(LIKENESS_RULE, tuple(real_people)))
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
        numbered = [(_FIRST_CONFIGURED + i, rule) for i, rule in enumerate(self._rules)]
        self._everywhere = _TermIndex.build([*_BUILT_IN, *numbered])
        self._in_nsfw_channels = _TermIndex.build(
            [*_BUILT_IN, *((i, rule) for i, rule in numbered if not rule.allow_in_nsfw_channels)]
        )

    @property
    def rules(self) -> tuple[PromptRule, ...]:
        return self._rules

    def screen_prompt(self, text: str, *, nsfw_channel: bool = False) -> Verdict:
        """Block `text` if a built-in check or any applicable rule matches. The built-in checks are
        named first, then the earliest matching rule listed."""
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
        found = set().union(*(index.matches(reading) for reading in readings))
        if not found:
            return ALLOWED
        if _CSAM in found:
            return _CSAM_VERDICT
        if _SEXUAL_OR_SUGGESTIVE in found and (
            _MINOR in found or _mentions_a_minor_by_age(plain)
        ):
            return _MINORS_VERDICT
        configured = [i for i in found if i >= _FIRST_CONFIGURED]
        if not configured:
            return ALLOWED
        rule = self._rules[min(configured) - _FIRST_CONFIGURED]
        return _blocked(rule.name, allowed_in_nsfw_channels=rule.allow_in_nsfw_channels)
