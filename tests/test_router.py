"""Routing: aliases, retries, fallbacks and the circuit breaker, with prepared generators."""
from __future__ import annotations

import asyncio

import pytest

from bot.core.models import GeneratorError, TransientGeneratorError
from bot.core.routing import CircuitBreaker, RetryPolicy, Router, UnknownModel
from tests.fakes.generators import PreparedGenerator
from tests.helpers import generation_request


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


async def no_sleep(_):
    return None


def request(model, **kw):
    return generation_request("imagine", model=model, prompt="a fox", seed=1, **kw)


def make_router(*gens, clock=None, **kw):
    return Router(list(gens), retry=RetryPolicy(attempts=2, base_delay_s=0), sleep=no_sleep,
                  clock=clock or Clock(), **kw)


def test_resolves_names_and_aliases_case_insensitively():
    router = make_router(PreparedGenerator(model="flux-schnell"))
    assert router.resolve("FLUX-schnell-alias").spec.name == "flux-schnell"
    with pytest.raises(UnknownModel, match="available: flux-schnell"):
        router.resolve("sdxl")


async def test_fallback_serves_while_primary_fails_and_says_which_model():
    primary = PreparedGenerator(provider="p1", model="primary",
                                script=[TransientGeneratorError("503")] * 2)
    backup = PreparedGenerator(provider="p2", model="backup")
    router = make_router(primary, backup, fallbacks={"primary": "backup"})
    result = await router.generate(router.resolve("primary"), request("primary"))
    assert result.model == "backup" and result.provider == "p2"
    assert len(primary.calls) == 2 and backup.calls[0].model == "backup"


async def test_non_transient_errors_do_not_fall_back():
    primary = PreparedGenerator(provider="p1", model="primary", script=[GeneratorError("400 bad size")])
    backup = PreparedGenerator(provider="p2", model="backup")
    router = make_router(primary, backup, fallbacks={"primary": "backup"})
    with pytest.raises(GeneratorError, match="bad size"):
        await router.generate(router.resolve("primary"), request("primary"))
    assert backup.calls == []


async def test_fallback_that_cannot_honour_the_request_is_skipped():
    primary = PreparedGenerator(provider="p1", model="primary", script=[TransientGeneratorError("x")] * 2)
    no_seed = PreparedGenerator(provider="p2", model="noseed", honours_seed=False)
    router = make_router(primary, no_seed, fallbacks={"primary": "noseed"})
    assert len(router.candidates(router.resolve("primary"), request("primary"))) == 1
    with pytest.raises(TransientGeneratorError):
        await router.generate(router.resolve("primary"), request("primary"))
    assert no_seed.calls == []


async def test_breaker_opens_after_repeated_failures_and_closes_again():
    clock = Clock()
    flaky = PreparedGenerator(provider="p1", model="flaky", script=[TransientGeneratorError("503")] * 6)
    backup = PreparedGenerator(provider="p2", model="backup")
    router = make_router(flaky, backup, clock=clock, fallbacks={"flaky": "backup"},
                         breaker_failures=3, breaker_cooldown_s=60)
    route = router.resolve("flaky")
    for _ in range(3):
        assert (await router.generate(route, request("flaky"))).model == "backup"
    assert router.breakers["p1"].state == "open" and len(flaky.calls) == 6
    assert "flaky" not in {s.name for s in router.healthy_models()}
    # Out of rotation: the fallback serves without the primary being tried.
    assert (await router.generate(route, request("flaky"))).model == "backup"
    assert len(flaky.calls) == 6
    clock.now = 61  # cooldown over: one trial goes through, and it succeeds
    assert router.breakers["p1"].state == "half-open"
    assert (await router.generate(route, request("flaky"))).model == "flaky"
    assert router.breakers["p1"].state == "closed"


def test_half_open_breaker_lets_one_trial_through_and_reopens_on_failure():
    clock = Clock()
    b = CircuitBreaker(failures=2, cooldown_s=10, clock=clock)
    b.record_failure()
    assert b.allow()
    b.record_failure()
    assert b.state == "open" and not b.allow()
    clock.now = 10
    assert b.allow() and not b.allow()  # a single trial
    b.record_failure()
    assert b.state == "open"
    clock.now = 15
    assert not b.allow()


async def test_retry_after_is_honoured():
    waits = []

    async def sleep(s):
        waits.append(s)

    gen = PreparedGenerator(script=[TransientGeneratorError("429", retry_after=7.5)])
    router = Router([gen], retry=RetryPolicy(attempts=3, base_delay_s=0.01), sleep=sleep)
    await router.generate(router.resolve("fake-model"), request("fake-model"))
    assert waits and waits[0] >= 7.5


class Sleeps:
    """A sleep that records what it was asked to wait, and does not wait."""

    def __init__(self):
        self.waits = []

    async def __call__(self, seconds):
        self.waits.append(seconds)


async def test_a_retry_after_over_the_cap_gives_up_on_the_route_at_once_and_falls_back():
    sleep = Sleeps()
    primary = PreparedGenerator(provider="p1", model="primary",
                                script=[TransientGeneratorError("429", retry_after=86400)])
    backup = PreparedGenerator(provider="p2", model="backup")
    router = Router([primary, backup], retry=RetryPolicy(attempts=3, max_retry_after_s=60), sleep=sleep,
                    fallbacks={"primary": "backup"})
    result = await router.generate(router.resolve("primary"), request("primary"))
    assert result.model == "backup"
    assert len(primary.calls) == 1 and sleep.waits == []


async def test_a_retry_after_over_the_cap_without_a_fallback_fails_plainly():
    sleep = Sleeps()
    gen = PreparedGenerator(provider="openai", script=[TransientGeneratorError("429", retry_after=86400.0)])
    router = Router([gen], retry=RetryPolicy(attempts=3), sleep=sleep)
    with pytest.raises(TransientGeneratorError, match=r"^openai asked to wait 86400 s; easel gives up after 60 s$"):
        await router.generate(router.resolve("fake-model"), request("fake-model"))
    assert len(gen.calls) == 1 and sleep.waits == []


async def test_a_retry_after_past_the_jobs_deadline_gives_up_at_once():
    sleep = Sleeps()
    gen = PreparedGenerator(script=[TransientGeneratorError("429", retry_after=30)])
    router = Router([gen], retry=RetryPolicy(attempts=3), sleep=sleep)
    deadline = asyncio.get_running_loop().time() + 10
    with pytest.raises(TransientGeneratorError, match=r"fake asked to wait 30 s; the job has (10|9.9) s left"):
        await router.generate(router.resolve("fake-model"), request("fake-model"), deadline=deadline)
    assert len(gen.calls) == 1 and sleep.waits == []


async def test_a_retry_after_within_the_cap_and_the_deadline_is_waited_for():
    sleep = Sleeps()
    gen = PreparedGenerator(script=[TransientGeneratorError("429", retry_after=7.5)])
    router = Router([gen], retry=RetryPolicy(attempts=3, base_delay_s=0.001), sleep=sleep)
    deadline = asyncio.get_running_loop().time() + 30
    result = await router.generate(router.resolve("fake-model"), request("fake-model"), deadline=deadline)
    assert result.model == "fake-model" and sleep.waits == [7.5]


async def test_no_backoff_sleep_outlasts_the_time_left():
    sleep = Sleeps()
    gen = PreparedGenerator(script=[TransientGeneratorError("503 try later")] * 3)
    router = Router([gen], retry=RetryPolicy(attempts=3, base_delay_s=30, max_delay_s=30), sleep=sleep)
    deadline = asyncio.get_running_loop().time()  # the job's time is up
    with pytest.raises(TransientGeneratorError, match="503 try later"):
        await router.generate(router.resolve("fake-model"), request("fake-model"), deadline=deadline)
    assert len(gen.calls) == 1 and sleep.waits == []


def test_retry_policy_caps_the_wait_a_provider_may_ask_for_at_60_s_by_default():
    assert RetryPolicy().max_retry_after_s == 60.0
