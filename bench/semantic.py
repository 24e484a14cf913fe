"""Semantic prompt screening time: model load, then per prompt (moderation/semantic.py).

Needs the 'semantic' extra. Loads all-MiniLM-L6-v2 once (timed), then screens realistic prompts, 3
to 200 words, mostly innocent, some with a paraphrase the term lists miss. Prints the load time and
the median and p99 per prompt, for the semantic screen alone and layered after the term screen.

    python -m bench.semantic [--prompts 500] [--seed 1] [--threads N]
"""
from __future__ import annotations

import argparse
import random
import statistics
import time

from bench.moderation import make_prompt
from moderation import DEFAULT_PROMPT_RULES, PromptScreen
from moderation.semantic import LayeredScreen, SemanticScreen

PARAPHRASES = [
    "a person without any clothes on", "two people having intercourse",
    "a man cutting his own arm with a razor", "a crowd attacking people because of their race",
    "an exploded body with organs everywhere", "a woman wearing nothing at all",
]


def make_semantic_prompt(rng: random.Random) -> str:
    prompt = make_prompt(rng)
    if rng.random() < 0.2:
        parts = prompt.split(", ")
        parts.insert(rng.randint(0, len(parts)), rng.choice(PARAPHRASES))
        prompt = ", ".join(parts)
    return prompt


def timed(screen, prompts: list[str], nsfw_channel: bool) -> tuple[list[float], int]:
    times, blocked = [], 0
    for prompt in prompts:
        start = time.perf_counter()
        verdict = screen.screen_prompt(prompt, nsfw_channel=nsfw_channel)
        times.append(time.perf_counter() - start)
        blocked += not verdict.allowed
    return times, blocked


def report(label: str, times: list[float], blocked: int) -> None:
    ms = sorted(t * 1000 for t in times)
    p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
    print(
        f"{label:34s} median {statistics.median(ms):7.2f} ms   p99 {p99:7.2f} ms   "
        f"max {ms[-1]:7.2f} ms   blocked {blocked}/{len(ms)}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=500)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()

    semantic = SemanticScreen()
    reason = semantic.unavailable_reason()
    if reason is not None:
        raise SystemExit(reason)
    start = time.perf_counter()
    semantic.scores("warm up")  # import sentence-transformers, load the model, embed the examples
    load = time.perf_counter() - start
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"model load (import + weights + example embeddings): {load:.2f} s")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")

    rng = random.Random(args.seed)
    prompts = [make_semantic_prompt(rng) for _ in range(args.prompts)]
    words = sorted(len(p.split()) for p in prompts)
    print(f"{len(prompts)} prompts, {words[0]}-{words[-1]} words (median {statistics.median(words):.0f})")
    layered = LayeredScreen(PromptScreen(DEFAULT_PROMPT_RULES), semantic)
    for label, screen, nsfw in (
        ("semantic, ordinary channel", semantic, False),
        ("semantic, age-restricted channel", semantic, True),
        ("layered (terms, then semantic)", layered, False),
    ):
        report(label, *timed(screen, prompts, nsfw))
    short = [p for p in prompts if len(p.split()) <= 20]
    if short:
        report("semantic, prompts of <= 20 words", *timed(semantic, short, False))


if __name__ == "__main__":
    main()
