"""While a member waits, end to end against the fake Discord: ❌ Cancel on a queued and on a
running job (refunds checked in the ledger, and who may cancel), queue positions with an ETA
from recent generation times, /queue for members and admins, and /help."""
from __future__ import annotations

import re

import pytest

discord = pytest.importorskip("discord")

from tests.discord_helpers import (  # noqa: E402
    ALLOWANCE_MICROS,
    SteppingGenerator,
    button_ids,
    eventually,
    immediate_reply,
    original,
    result_of,
)
from tests.fakes.discord_server import FakeDiscord  # noqa: E402

CANCELLED = "\u274c Cancelled. Nothing was charged."


@pytest.fixture
def members(fake: FakeDiscord):
    """bob and carol, plain members besides alice (fake.user)."""
    out = []
    for name in ("bob", "carol"):
        user = fake.add_user(name)
        fake.add_member(fake.guild, user)
        out.append(user)
    return out


async def slow_bot(make_bot):
    """One generator slot; each job takes about 1.5 s in ten steps."""
    return await make_bot(generator=SteppingGenerator(steps=10, step_s=0.15), queue_limit=1)


def job_of(bot, user):
    """The member's one job, once it is recorded."""
    jobs = [j for j in bot.jobs() if j.user_id == str(user.id)]
    return jobs[0] if jobs else None


async def cancel_button(fake, interaction, job_id: int):
    """The progress message, once it carries the job's Cancel button."""
    return await eventually(lambda: f"easel:cancel:{job_id}" in button_ids(original(fake, interaction)),
                            what=f"a Cancel button for job {job_id}")


async def test_cancelling_a_queued_job_refunds_it_at_once(fake, make_bot, members):
    bob, _ = members
    bot = await slow_bot(make_bot)
    first = await fake.send_slash_command("imagine", {"prompt": "a red fox"})
    await eventually(lambda: bot.jobs() and bot.jobs()[0].status == "running", what="the first job to run")
    second = await fake.send_slash_command("imagine", {"prompt": "a blue fox"}, user=bob)
    job = await eventually(lambda: job_of(bot, bob), what="bob's job")
    await cancel_button(fake, second, job.id)
    assert original(fake, second).content.startswith("\u23f3 Queued \u2014 position 1")

    stranger = await fake.send_component_interaction(original(fake, second).id, f"easel:cancel:{job.id}")
    assert "only the person who asked for this job, or an admin" in (await immediate_reply(fake, stranger)).content
    click = await fake.send_component_interaction(original(fake, second).id, f"easel:cancel:{job.id}", user=bob)
    assert (await immediate_reply(fake, click)).content == f"{CANCELLED} (job {job.id})"
    await eventually(lambda: original(fake, second).content == CANCELLED, what="the message to say so")
    assert original(fake, second).components == []
    assert bot.app.jobs.get(job.id).status == "cancelled"
    assert bot.charges(bob.id) == [] and bot.available(bob.id) == ALLOWANCE_MICROS
    assert job.id not in bot.held()
    await result_of(fake, first, bot=bot)  # the other member's job is untouched
    assert len(bot.generator.calls) == 1


async def test_cancelling_a_running_job_interrupts_and_refunds_it(fake, make_bot):
    bot = await slow_bot(make_bot)
    interaction = await fake.send_slash_command("imagine", {"prompt": "a slow river"})
    job = await eventually(lambda: bot.jobs() and bot.jobs()[0].status == "running" and bot.jobs()[0])
    await cancel_button(fake, interaction, job.id)
    click = await fake.send_component_interaction(original(fake, interaction).id, f"easel:cancel:{job.id}")
    await immediate_reply(fake, click)
    await eventually(lambda: original(fake, interaction).content == CANCELLED, what="the message to say so")
    assert bot.app.jobs.get(job.id).status == "cancelled"
    assert bot.charges(fake.user.id) == [] and bot.held() == []
    assert bot.available(fake.user.id) == ALLOWANCE_MICROS


async def test_an_admin_may_cancel_anyones_job(fake, make_bot, members):
    bob, _ = members
    bot = await slow_bot(make_bot)
    interaction = await fake.send_slash_command("imagine", {"prompt": "a slow river"}, user=bob)
    job = await eventually(lambda: bot.jobs() and bot.jobs()[0])
    await cancel_button(fake, interaction, job.id)
    click = await fake.send_component_interaction(original(fake, interaction).id, f"easel:cancel:{job.id}",
                                                  user=fake.owner)
    await immediate_reply(fake, click)
    await eventually(lambda: bot.app.jobs.get(job.id).status == "cancelled", what="the job cancelled")
    assert bot.charges(bob.id) == []


async def test_queue_shows_positions_and_etas_for_three_members_and_admins_see_all(fake, make_bot, members):
    bob, carol = members
    bot = await slow_bot(make_bot)
    warm = await fake.send_slash_command("imagine", {"prompt": "a first image"})
    await result_of(fake, warm, bot=bot)  # one generation time for the ETA

    await fake.send_slash_command("imagine", {"prompt": "alice's"})
    await eventually(lambda: [j for j in bot.jobs() if j.status == "running"], what="alice's job to run")
    bobs = await fake.send_slash_command("imagine", {"prompt": "bob's"}, user=bob)
    await eventually(lambda: len(bot.jobs()) == 3 and bot.app.service.queue_position(bot.jobs()[2].id) == 1)
    await fake.send_slash_command("imagine", {"prompt": "carol's"}, user=carol)
    await eventually(lambda: len(bot.app.service.queue()) == 3, what="three jobs in the queue")
    alice_job, bob_job, carol_job = bot.jobs()[1:]

    await cancel_button(fake, bobs, bob_job.id)
    assert re.fullmatch(r"\u23f3 Queued \u2014 position 1, about \d+ s", original(fake, bobs).content)

    for user, job, where in ((fake.user, alice_job, "running"), (bob, bob_job, "position 1"),
                             (carol, carol_job, "position 2")):
        ask = await fake.send_slash_command("queue", {}, user=user)
        reply = await immediate_reply(fake, ask)
        [line] = [line for line in reply.content.splitlines() if line.startswith("`")]
        assert line.startswith(f"`{job.id}` fake-model \u00b7 {where}"), line
        if where != "running":
            assert re.search(r"about \d+ s$", line), line
        assert button_ids(reply) == [f"easel:cancel:{job.id}"]

    admin = await immediate_reply(fake, await fake.send_slash_command("queue", {}, user=fake.owner))
    assert "**The queue** (3 jobs)" in admin.content
    for user in (fake.user, bob, carol):
        assert f"<@{user.id}>" in admin.content
    assert button_ids(admin) == [f"easel:cancel:{j.id}" for j in (alice_job, bob_job, carol_job)]
    click = await fake.send_component_interaction(admin.id, f"easel:cancel:{carol_job.id}", user=fake.owner)
    await immediate_reply(fake, click)
    await eventually(lambda: bot.app.jobs.get(carol_job.id).status == "cancelled")
    assert bot.charges(carol.id) == []


async def test_queue_with_nothing_waiting(fake, make_bot):
    await make_bot()
    reply = await immediate_reply(fake, await fake.send_slash_command("queue", {}))
    assert reply.content == "You have no jobs waiting or running." and reply.components == []


async def test_help_lists_commands_buttons_flags_and_the_budget_left(fake, make_bot):
    await make_bot()
    text = (await immediate_reply(fake, await fake.send_slash_command("help", {}))).content
    for words in ("/imagine", "/queue", "U1\u2013U4", "Vary (Subtle)", "Details", "--seed 42", "--ar 16:9",
                  "remix", "**You have** $1.0000 left"):
        assert words in text, words
