"""The core service on in-memory ports: no SQLite, no files, no images decoded."""
from __future__ import annotations

import asyncio

import pytest

from bot.core.accounts import Accounts
from bot.core.admission import Admission
from bot.core.billing import Billing
from bot.core.models import (
    ErrorCode,
    GeneratedImage,
    GeneratorError,
    JobStatus,
    Kind,
    ModelSpec,
    Requester,
    usd_to_micros,
)
from bot.core.planning import Planner
from bot.core.policy import Policy
from bot.core.recovery import recover
from bot.core.routing import RetryPolicy, Router
from bot.core.screening import Screening
from bot.core.service import EaselService
from tests.fakes.ports import (
    AllowImages,
    FakeCodec,
    FixedClock,
    MemoryBlobs,
    MemoryJobs,
    MemoryLedger,
    MemoryPreferences,
    MemoryUnitOfWork,
    TermScreen,
    fake_image,
)
from tests.helpers import job_request

PRICE = 0.01


class MemoryGenerator:
    provider = "mem"

    def __init__(self, *, delay_s: float = 0.0, fail: Exception | None = None):
        self.delay_s, self.fail, self.calls = delay_s, fail, []

    def models(self):
        return [ModelSpec(name="m", provider="mem", kinds=frozenset(Kind), options={"sampler": ("a", "b")},
                          family="sd1", default_guidance=7.0),
                ModelSpec(name="plain", provider="mem", kinds=frozenset(Kind), negative_prompt=False)]

    def unavailable_reason(self):
        return None

    def estimate_cost(self, request):
        return PRICE

    async def generate(self, request, progress=None):
        self.calls.append(request)
        await asyncio.sleep(self.delay_s)
        if self.fail:
            raise self.fail
        return GeneratedImage(fake_image(request.width, request.height, str(request.seed)),
                              request.width, request.height, "m", "mem", request.seed)

    async def close(self):
        pass


class Core:
    def __init__(self, generator, *, allowance=1.0, max_requests=2, negatives=None):
        self.policy = Policy(
            default_model="m", max_prompt_chars=100, default_strength=0.6, upscale_factor=2,
            job_timeout_s=5.0, max_upload_bytes=1000, max_upload_pixels=10**6,
            max_requests_per_user=max_requests, blocked_outputs_are_paid=False,
            daily_spend_cap_micros=0, budget_period="month", negative_prompts=negatives or {},
            tip_under_words=4)
        self.generator, self.clock = generator, FixedClock()
        self.jobs, self.ledger, self.blobs = MemoryJobs(), MemoryLedger(usd_to_micros(allowance)), MemoryBlobs()
        self.prefs, self.uow, codec = MemoryPreferences(), MemoryUnitOfWork(), FakeCodec()
        router = Router([generator], retry=RetryPolicy(attempts=1))
        self.screening = Screening(TermScreen(), AllowImages(), codec)
        self.service = EaselService(
            policy=self.policy, planner=Planner(self.policy, router, self.jobs, self.blobs, codec, self.prefs,
                                                random_seed=lambda: 1234),
            screening=self.screening,
            billing=Billing(self.policy, router, self.uow, self.ledger, self.jobs, self.prefs, self.clock),
            admission=Admission({"mem": 1}, max_requests), router=router, jobs=self.jobs,
            blobs=self.blobs, codec=codec, owner="test:1")
        self.accounts = Accounts(self.policy, self.prefs, router, self.clock)

    def available(self, user="u1"):
        return self.ledger.balance(user).available_micros


async def test_a_done_job_is_stored_and_charged_once():
    core = Core(MemoryGenerator())
    (out,) = await core.service.imagine(job_request("imagine", "u1", "a fox --seed 5"))
    assert out.ok and out.job.seed == 5 and out.job.sha256 in core.blobs.data
    assert core.available() == usd_to_micros(1.0 - PRICE) and not core.ledger.held


async def test_an_image_the_store_will_not_take_fails_the_job_and_refunds_it():
    from bot.core.models import StoreFailed

    core = Core(MemoryGenerator())

    def refuse(data, ext="png"):
        raise StoreFailed("bucket easel-images at minio.local: SlowDown, after 4 attempts")

    core.blobs.put = refuse
    (out,) = await core.service.imagine(job_request("imagine", "u1", "a fox --seed 5"))
    assert (out.status, out.error_code) == (JobStatus.FAILED, "failed")
    assert out.error == "the image could not be stored (bucket easel-images at minio.local: SlowDown, after 4 attempts)"
    assert out.job.sha256 is None and core.blobs.data == {}  # nothing points to a missing object
    assert core.available() == usd_to_micros(1.0) and not core.ledger.held


async def test_cancelling_one_image_of_several_lets_the_others_finish_and_be_charged():
    core = Core(MemoryGenerator(delay_s=0.3), max_requests=1)
    running = asyncio.ensure_future(core.service.imagine(job_request("imagine", "u1", "a fox --seed 1"), count=3))
    while len(core.jobs.rows) < 3:
        await asyncio.sleep(0.01)
    second = sorted(core.jobs.rows)[1]
    assert await core.service.cancel(second)
    outs = await running  # no exception: the other two are not lost
    assert [o.status for o in outs] == [JobStatus.DONE, JobStatus.CANCELLED, JobStatus.DONE]
    assert core.available() == usd_to_micros(1.0 - 2 * PRICE) and not core.ledger.held


async def test_inline_seed_in_any_case_gives_consecutive_seeds_for_count():
    core = Core(MemoryGenerator(), max_requests=1)
    outs = await core.service.imagine(job_request("imagine", "u1", "a castle --Seed 42"), count=2)
    assert [o.status for o in outs] == [JobStatus.DONE, JobStatus.DONE]
    assert sorted(o.job.seed for o in outs) == [42, 43]  # one group: the limit of 1 holds both


async def test_a_chosen_seed_is_recorded():
    core = Core(MemoryGenerator())
    out = await core.service.submit(job_request("imagine", "u1", "a fox"))
    assert out.job.seed == 1234 and core.generator.calls[0].seed == 1234


async def test_over_budget_is_refused_before_generating():
    gen = MemoryGenerator()
    core = Core(gen, allowance=0.001)
    out = await core.service.submit(job_request("imagine", "u1", "a fox"))
    assert out.error_code == ErrorCode.OVER_BUDGET and gen.calls == []
    assert core.available() == usd_to_micros(0.001)


async def test_blocked_prompt_reaches_no_generator_and_costs_nothing():
    gen = MemoryGenerator()
    core = Core(gen)
    out = await core.service.submit(job_request("imagine", "u1", "a forbidden thing"))
    assert out.status == JobStatus.BLOCKED and out.error == "the test rule" and gen.calls == []
    assert core.available() == usd_to_micros(1.0)


async def test_a_failing_generator_releases_the_reservation():
    core = Core(MemoryGenerator(fail=GeneratorError("boom")))
    out = await core.service.submit(job_request("imagine", "u1", "a fox"))
    assert out.status == JobStatus.FAILED and "boom" in out.error
    assert core.available() == usd_to_micros(1.0) and not core.ledger.held


async def test_cancelling_a_running_job_refunds_it():
    core = Core(MemoryGenerator(delay_s=5))
    task = asyncio.create_task(core.service.submit(job_request("imagine", "u1", "a fox")))
    await asyncio.sleep(0.05)
    (job_id,) = core.jobs.rows
    assert await core.service.cancel(job_id)
    out = await task  # cancelled through the service: an outcome that says so, not an exception
    assert (out.status, out.error_code) == (JobStatus.CANCELLED, ErrorCode.CANCELLED)
    assert core.jobs.get(job_id).status == JobStatus.CANCELLED and core.available() == usd_to_micros(1.0)
    task = asyncio.create_task(core.service.submit(job_request("imagine", "u1", "a cat")))
    await asyncio.sleep(0.05)
    task.cancel()  # the caller itself cancelled (Ctrl-C, shutdown): the exception goes on
    with pytest.raises(asyncio.CancelledError):
        await task
    assert core.available() == usd_to_micros(1.0)


async def test_an_option_the_model_lacks_is_refused_before_reserving():
    core = Core(MemoryGenerator())
    out = await core.service.submit(job_request("imagine", "u1", "a fox --quality hd"))
    assert out.error_code == ErrorCode.USAGE and "has no option 'quality'" in out.error
    assert core.jobs.rows == {}


async def test_reroll_repeats_the_request_with_a_new_seed_for_the_clicker():
    core = Core(MemoryGenerator())
    first = await core.service.submit(job_request("imagine", "u1", "a fox --seed 5 --sampler b", guild_id="g1"))
    core.jobs.update(first.job.id, message_id="m1", public=True)  # posted in the channel
    again = await core.service.reroll(first.job.id, Requester("u2", "g1"))
    assert again.ok and again.job.user_id == "u2" and again.job.prompt == "a fox"
    assert again.job.options == {"sampler": "b"} and again.job.seed == 1234
    assert core.available("u2") == usd_to_micros(1.0 - PRICE)


def _others(job_id):
    """Every way another member may try to reuse job `job_id`."""
    return [
        ("reroll", lambda core, who: core.service.reroll(job_id, who)),
        ("vary", lambda core, who: core.service.vary(job_id, who)),
        ("upscale", lambda core, who: core.service.upscale(job_id, who)),
        ("variation request", lambda core, who: core.service.submit(
            job_request("variation", who.user_id, guild_id=who.guild_id, source_job_id=job_id))),
    ]


@pytest.mark.parametrize("public, asker, guild", [
    (False, "u2", "g1"),  # private (or never delivered), same guild
    (True, "u2", "g2"),  # public, but in another guild
    (True, "u2", None),  # public, asked from a DM
])
async def test_another_members_job_is_refused_as_missing_unless_posted_in_their_guild(public, asker, guild):
    core = Core(MemoryGenerator())
    first = await core.service.submit(job_request("imagine", "u1", "alice's secret card", guild_id="g1"))
    core.jobs.update(first.job.id, message_id="m1", public=public)
    missing = await core.service.reroll(999, Requester(asker, guild))
    for what, call in _others(first.job.id):
        out = await call(core, Requester(asker, guild))
        assert out.error_code == ErrorCode.NOT_FOUND, what
        assert out.error == f"there is no job {first.job.id}", what  # the same as a missing one
        assert missing.error == "there is no job 999"
    assert [j.user_id for j in core.jobs.rows.values()] == ["u1"]  # nothing was made or shown
    assert core.available(asker) == usd_to_micros(1.0)


async def test_a_public_result_may_be_reused_in_its_guild_and_ones_own_anywhere():
    core = Core(MemoryGenerator())
    first = await core.service.submit(job_request("imagine", "u1", "a lighthouse", guild_id="g1"))
    own = [await call(core, Requester("u1", "g9")) for _, call in _others(first.job.id)]
    assert all(o.ok for o in own)  # one's own job, private or not, from anywhere
    core.jobs.update(first.job.id, message_id="m1", public=True)
    theirs = [await call(core, Requester("u2", "g1")) for _, call in _others(first.job.id)]
    assert all(o.ok for o in theirs) and {o.job.user_id for o in theirs} == {"u2"}


async def test_variation_takes_the_default_strength_from_the_policy():
    gen = MemoryGenerator()
    core = Core(gen)
    first = await core.service.submit(job_request("imagine", "u1", "a fox"))
    var = await core.service.submit(job_request("variation", "u1", source_job_id=first.job.id))
    assert var.ok and gen.calls[1].strength == 0.6 and gen.calls[1].prompt == "a fox"


async def test_recovery_refunds_jobs_of_a_dead_owner_only():
    core = Core(MemoryGenerator())
    now = core.clock.time()
    dead = core.jobs.create(kind=Kind.IMAGINE, status=JobStatus.RUNNING, user_id="u1", owner="gone:1",
                            created_at=now, started_at=now)
    alive = core.jobs.create(kind=Kind.IMAGINE, status=JobStatus.RUNNING, user_id="u1", owner="here:2",
                             created_at=now, started_at=now)
    core.ledger.reserve("u1", dead.id, 100, None)
    core.ledger.reserve("u1", alive.id, 100, None)
    recovered = recover(core.jobs, core.ledger, core.uow, core.clock, owner="me:3", job_timeout_s=600,
                        alive=lambda owner: owner == "here:2")
    assert recovered == [dead.id] and core.jobs.get(dead.id).error_code == ErrorCode.INTERRUPTED
    assert list(core.ledger.held) == [alive.id]


@pytest.mark.parametrize("status, started_ago, created_ago, swept", [
    (JobStatus.RUNNING, 600 + 61, 700, True),  # running past the job timeout: no live easel does
    (JobStatus.RUNNING, 600 + 59, 700, False),
    (JobStatus.QUEUED, None, 6 * 3600 + 1, True),
    (JobStatus.QUEUED, None, 3600, False),  # a long queue on a busy GPU is not stale
])
async def test_recovery_sweeps_stale_jobs_even_of_a_live_owner(status, started_ago, created_ago, swept):
    core = Core(MemoryGenerator())
    now = core.clock.time()
    job = core.jobs.create(kind=Kind.IMAGINE, status=status, user_id="u1", owner="other-host:7",
                           created_at=now - created_ago,
                           started_at=None if started_ago is None else now - started_ago)
    core.ledger.reserve("u1", job.id, 100, None)
    recovered = recover(core.jobs, core.ledger, core.uow, core.clock, owner="me:3", job_timeout_s=600,
                        alive=lambda owner: True)
    assert recovered == ([job.id] if swept else [])
    assert bool(core.ledger.held) is not swept


def test_an_owner_whose_pid_now_belongs_to_another_process_is_dead():
    import os
    import socket

    from bot.core.recovery import owner_alive, process_start, this_process

    me = this_process()
    host, pid = socket.gethostname(), os.getpid()
    assert me == f"{host}:{pid}:{process_start(pid)}" and owner_alive(me)
    assert not owner_alive(f"{host}:{pid}:1")  # our pid, but a process started at another time
    assert owner_alive(f"{host}:{pid}")  # an owner recorded before start times: the pid decides
    assert not owner_alive(f"{host}:{2**22 + 12345}")  # beyond pid_max: no such process
    assert not owner_alive(f"{host}:{10**30}") and not owner_alive(f"{host}:x")
    assert owner_alive(f"another-host:{pid}:1")  # not ours to judge


async def test_settings_refuse_an_unknown_model():
    core = Core(MemoryGenerator())
    with pytest.raises(Exception, match="unknown model"):
        await core.accounts.change_settings("u1", model="nope")
    assert (await core.accounts.change_settings("u1", model="m")).model == "m"


@pytest.mark.parametrize("fields, message", [
    ({"steps": 2.5}, "steps must be a whole number"),
    ({"steps": True}, "steps must be a whole number"),
    ({"seed": 4.0}, "seed must be a whole number"),
    ({"guidance": float("nan")}, "guidance must be a finite number"),
    ({"strength": float("inf")}, "strength must be a finite number"),
    ({"steps": 10**6}, "steps must be 1-1000"),
])
async def test_numbers_through_the_api_are_checked_before_anything_is_made(fields, message):
    core = Core(MemoryGenerator())
    out = await core.service.submit(job_request("imagine", "u1", "a fox", **fields))
    assert out.error_code == ErrorCode.USAGE and out.error == message
    assert core.jobs.rows == {} and core.generator.calls == []


@pytest.mark.parametrize("prompt, user, message", [
    ("a \udcff fox", "u1", "the prompt is not valid text"),
    ("\x00\x00\u200b", "u1", "the prompt is empty"),
    ("a fox", "", "a user id must be 1-100 visible characters"),
    ("a fox", "x" * 101, "a user id must be 1-100 visible characters"),
    ("a fox", "eve\x1b[2J", "a user id cannot hold control characters"),
])
async def test_text_through_the_api_is_checked(prompt, user, message):
    core = Core(MemoryGenerator())
    out = await core.service.submit(job_request("imagine", user, prompt))
    assert out.error_code == ErrorCode.USAGE and out.error.startswith(message)
    assert core.generator.calls == []


async def test_control_characters_are_taken_out_of_a_prompt():
    core = Core(MemoryGenerator())
    out = await core.service.submit(job_request("imagine", "u1", "a \x1b[31mred\x07 fox\nat night"))
    assert out.ok and out.job.prompt == "a [31mred fox at night"


NEGATIVES = {"sd1": "blurry, watermark"}


@pytest.mark.parametrize("prompt, fields, negative", [
    ("a fox", {}, "blurry, watermark"),  # none given: the family's default
    ("a fox --no +text, logo", {}, "blurry, watermark, text, logo"),  # + extends it
    ("a fox --no grain", {}, "grain"),  # a member's own replaces it
    ("a fox", {"guidance": 1.0}, None),  # no effect at guidance 1 or less: left out
    ("a fox", {"model": "plain"}, None),  # a model that takes no negative prompt
])
async def test_default_negative_prompts(prompt, fields, negative):
    gen = MemoryGenerator()
    core = Core(gen, negatives=NEGATIVES)
    out = await core.service.submit(job_request("imagine", "u1", prompt, **fields))
    assert out.ok, out.error
    assert out.job.negative_prompt == negative and gen.calls[0].negative_prompt == negative


async def test_a_default_negative_by_model_name_wins_and_empty_switches_it_off():
    gen = MemoryGenerator()
    core = Core(gen, negatives={**NEGATIVES, "m": ""})
    out = await core.service.submit(job_request("imagine", "u1", "a fox"))
    assert out.ok and out.job.negative_prompt is None


async def test_a_reroll_keeps_the_recorded_default_negative():
    gen = MemoryGenerator()
    core = Core(gen, negatives=NEGATIVES)
    first = await core.service.submit(job_request("imagine", "u1", "a fox --no +text"))
    again = await core.service.reroll(first.job.id, Requester("u1"))
    assert again.job.negative_prompt == first.job.negative_prompt == "blurry, watermark, text"


async def test_a_short_prompt_gets_one_tip_a_day_unless_the_guild_switched_tips_off():
    core = Core(MemoryGenerator())
    accounts = core.accounts
    assert await accounts.take_tip("u1", "g1", "a long and detailed prompt", can_enhance=False) is None
    tip = await accounts.take_tip("u1", "g1", "a fox", can_enhance=True)
    assert tip is not None and tip.startswith("\U0001f4a1 Tip") and "--enhance" in tip
    assert await accounts.take_tip("u1", "g1", "a cat", can_enhance=True) is None  # once a day
    core.clock.t += 24 * 3600 + 1
    assert "--enhance" not in await accounts.take_tip("u1", None, "a cat", can_enhance=False)
    await accounts.set_guild_tips("g2", False)
    assert await accounts.take_tip("u2", "g2", "a cat", can_enhance=False) is None
    assert core.prefs.user("u2").tipped_at == 0.0  # no tip given, none recorded
