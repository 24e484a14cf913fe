"""Prompt screening time per prompt, term lists only (no classifier, no network).

A few thousand realistic prompts, 3 to 200 words: mostly innocent, some with evasions (spacing,
punctuation, leetspeak, look-alike letters, fullwidth, stretched letters, a minor next to a
suggestive term). Prints the median and p99 per prompt (target: median under 1 ms), in ordinary
and age-restricted channels; then the time for a 20,000-character prompt, clean and with one
evasion in the middle (the longest a prompt can be before it is refused; no pattern may take
time that grows faster than its length).

    python -m bench.moderation [--prompts 4000] [--seed 1]
"""
from __future__ import annotations

import argparse
import random
import statistics
import time

from moderation import DEFAULT_PROMPT_RULES, PromptScreen

SUBJECTS = [
    "a lighthouse at dusk", "an old fisherman", "a cat astronaut", "a castle on a hill",
    "a child flying a kite", "kids playing football", "a woman in a bikini on a beach",
    "a knight slaying a dragon", "a bowl of shiitake mushrooms", "the cockpit of a jet",
    "Essex countryside", "a cocktail party", "a teenager reading in a library",
    "a classic car in Sussex", "a portrait of a therapist", "Venus de Milo", "a bass guitar",
]
STYLES = [
    "oil painting", "digital art", "35mm photo", "4k", "8k", "highly detailed", "bokeh",
    "by a master", "trending on artstation", "cinematic lighting", "watercolour", "ultra-realistic",
    "soft focus", "golden hour", "wide angle", "studio lighting", "matte painting", "isometric",
]
FILLER = (
    "with a glass of water on a wooden table beside an open window where the light falls across "
    "the floor and a dog sleeps in the corner while rain begins outside over the distant hills"
).split()
EVASIONS = [
    "n u d e", "nu-de", "n.a.k.e.d", "nud3", "nаked", "ｎｕｄｅ", "nakkkked", "n00dz", "pr0n",
    "sexy schoolgirl", "a 12 year old in lingerie", "teen in a bikini, seductive", "g.o.r.e",
    "self-harm", "k k k", "na\u200bked", "𝐧𝐮𝐝𝐞", "s3xy t33n", "decapitated",
]


def make_prompt(rng: random.Random) -> str:
    words = rng.randint(3, 200)
    parts = [rng.choice(SUBJECTS)]
    while sum(len(p.split()) for p in parts) < words:
        parts.append(rng.choice(STYLES) if rng.random() < 0.4 else " ".join(
            rng.sample(FILLER, rng.randint(3, 12))
        ))
    if rng.random() < 0.3:  # three in ten try something
        parts.insert(rng.randint(0, len(parts)), rng.choice(EVASIONS))
    return ", ".join(parts)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    prompts = [make_prompt(rng) for _ in range(args.prompts)]
    screen = PromptScreen(DEFAULT_PROMPT_RULES)
    for prompt in prompts[:200]:  # warm up
        screen.screen_prompt(prompt)
    words = [len(p.split()) for p in prompts]
    print(f"{len(prompts)} prompts, {min(words)}-{max(words)} words (median "
          f"{statistics.median(words):.0f})")
    for nsfw in (False, True):
        times, blocked = [], 0
        for prompt in prompts:
            start = time.perf_counter()
            verdict = screen.screen_prompt(prompt, nsfw_channel=nsfw)
            times.append(time.perf_counter() - start)
            blocked += not verdict.allowed
        label = "age-restricted channel" if nsfw else "ordinary channel"
        print(f"{label:>22}: median {statistics.median(times) * 1e3:.3f} ms, "
              f"p99 {percentile(times, 0.99) * 1e3:.3f} ms, max {max(times) * 1e3:.3f} ms, "
              f"blocked {blocked}/{len(prompts)}")
    long_prompts(screen)


def long_prompts(screen: PromptScreen, length: int = 20_000) -> None:
    filler = "an oil painting of a lighthouse at dusk, 4k, 35mm, by a master, glass, class; "
    clean = (filler * (length // len(filler) + 1))[:length]
    dirty = clean[: length // 2] + " n u d e " + clean[length // 2:]
    for label, text in (("clean", clean), ("one evasion", dirty)):
        times = []
        for _ in range(5):
            start = time.perf_counter()
            verdict = screen.screen_prompt(text)
            times.append(time.perf_counter() - start)
        print(f"{length:,}-character prompt, {label}: best of 5 {min(times) * 1e3:.2f} ms "
              f"({'allowed' if verdict.allowed else 'blocked: ' + str(verdict.rule)})")


if __name__ == "__main__":
    main()
