"""Midjourney-style results end to end against the fake Discord: a count=4 grid with U/V buttons
per image and reroll all, Vary (Subtle/Strong), 📋 Details (button and context menu), the remix
modal, message context menus, and grid buttons after a restart."""
from __future__ import annotations

import pytest

discord = pytest.importorskip("discord")

from tests.discord_helpers import (  # noqa: E402
    PRICE_MICROS,
    RunningBot,
    decoded,
    eventually,
    immediate_reply,
    labels,
    result_of,
)
from tests.fakes.discord_server import EPHEMERAL  # noqa: E402
from tests.fakes.generators import png_bytes  # noqa: E402
from tests.helpers import pixels  # noqa: E402


async def grid_of_four(bot: RunningBot):
    interaction = await bot.fake.send_slash_command("imagine", {"prompt": "a kite --seed 7", "count": 4})
    grid = await result_of(bot.fake, interaction, bot=bot)
    jobs = await eventually(lambda: sorted(bot.jobs(), key=lambda j: j.seed) if all(
        j.message_id == str(grid.id) for j in bot.jobs()) else None, what="all four recorded")
    return grid, jobs


async def test_a_grid_of_four_has_u_and_v_buttons_that_act_on_the_right_image(fake, make_bot, bob):
    bot = await make_bot()
    grid, jobs = await grid_of_four(bot)
    assert [j.seed for j in jobs] == [7, 8, 9, 10] and len(bot.charges(fake.user.id)) == 4
    assert decoded(grid.attachments[0].data).size == (2 * 512 + 4, 2 * 512 + 4)
    buttons = labels(grid)
    assert [buttons[f"U{i}"] for i in range(1, 5)] == [f"easel:upscale:{j.id}" for j in jobs]
    assert [buttons[f"V{i}"] for i in range(1, 5)] == [f"easel:variation:{j.id}" for j in jobs]
    assert buttons["Reroll all"] == "easel:rerollall:" + ".".join(str(j.id) for j in jobs)

    u2 = await fake.send_component_interaction(grid.id, buttons["U2"], user=bob)
    upscaled = await result_of(fake, u2, bot=bot)
    v3 = await fake.send_component_interaction(grid.id, buttons["V3"], user=bob)
    varied = await result_of(fake, v3, bot=bot)
    up, var = bot.app.jobs.by_message(str(upscaled.id)), bot.app.jobs.by_message(str(varied.id))
    assert (up.kind, up.source_job_id, var.kind, var.source_job_id) == ("upscale", jobs[1].id, "variation", jobs[2].id)
    upscale_call, variation_call = bot.generator.calls[4:]
    assert pixels(upscale_call.source_image) == pixels(bot.app.blobs.get(jobs[1].sha256))
    assert pixels(variation_call.source_image) == pixels(bot.app.blobs.get(jobs[2].sha256))
    # Each posts that image alone, with a single result's buttons.
    assert f"easel:subtle:{var.id}" in labels(varied).values() and len(varied.attachments) == 1
    assert bot.charges(bob.id) == [(str(bob.id), up.id, PRICE_MICROS), (str(bob.id), var.id, PRICE_MICROS)]


async def test_reroll_all_makes_a_new_grid_with_new_seeds(fake, make_bot, bob):
    bot = await make_bot()
    grid, jobs = await grid_of_four(bot)
    click = await fake.send_component_interaction(grid.id, labels(grid)["Reroll all"], user=bob)
    again = await result_of(fake, click, bot=bot)
    new = await eventually(lambda: [j for j in bot.jobs() if j.message_id == str(again.id)] if len(
        [j for j in bot.jobs() if j.message_id == str(again.id)]) == 4 else None, what="a new grid of four")
    assert all(j.user_id == str(bob.id) and j.prompt == "a kite" for j in new)
    assert {j.seed for j in new}.isdisjoint({7, 8, 9, 10}) or len({j.seed for j in new}) == 4
    assert len(bot.charges(bob.id)) == 4


async def test_grid_buttons_still_work_after_a_restart(fake, make_bot, bob):
    bot = await make_bot()
    grid, jobs = await grid_of_four(bot)
    bot = await make_bot.restart(bot)
    click = await fake.send_component_interaction(grid.id, labels(grid)["U4"], user=bob)
    message = await result_of(fake, click, bot=bot)
    job = bot.app.jobs.by_message(str(message.id))
    assert (job.kind, job.source_job_id) == ("upscale", jobs[3].id)


async def test_details_shows_the_parameters_and_the_lines_that_make_it_again(fake, make_bot, bob):
    bot = await make_bot()
    interaction = await fake.send_slash_command("imagine", {"prompt": "a red boat --seed 5 --no fog"})
    result = await result_of(fake, interaction, bot=bot)
    [job] = bot.jobs()
    click = await fake.send_component_interaction(result.id, f"easel:details:{job.id}", user=bob)
    text = (await immediate_reply(fake, click)).content
    assert f"**Job {job.id}**" in text and "a red boat" in text and "**Seed** 5" in text and "fog" in text
    assert "```\n/imagine prompt:a red boat negative:fog seed:5 model:fake-model\n```" in text
    assert "```\neasel imagine 'a red boat' --seed 5 --negative fog --model fake-model --size 512x512" in text
    menu = await fake.send_message_command("Details", result.id, user=bob)
    assert (await immediate_reply(fake, menu)).content == text
    assert bot.charges(bob.id) == []


async def test_details_of_a_private_result_is_refused_to_others_as_if_missing(fake, make_bot, bob):
    bot = await make_bot()
    await bot.app.accounts.change_settings(str(fake.user.id), private=True)
    interaction = await fake.send_slash_command("imagine", {"prompt": "a secret"})
    result = await result_of(fake, interaction, bot=bot)
    [job] = bot.jobs()
    click = await fake.send_component_interaction(result.id, f"easel:details:{job.id}", user=bob)
    assert (await immediate_reply(fake, click)).content == f"\u2753 there is no job {job.id}."


async def test_remix_opens_a_modal_with_the_prompt_and_varies_with_the_edited_one(fake, make_bot, bob):
    bot = await make_bot()
    setting = await fake.send_slash_command("settings", {"remix": True}, user=bob)
    assert "remix **on**" in (await immediate_reply(fake, setting)).content
    interaction = await fake.send_slash_command("imagine", {"prompt": "a quiet harbour"})
    result = await result_of(fake, interaction, bot=bot)
    [source] = bot.jobs()

    click = await fake.send_component_interaction(result.id, f"easel:strong:{source.id}", user=bob)
    ack = await fake.wait_for_ack(click)
    assert ack.json["type"] == 9 and bot.charges(bob.id) == []
    [[text_input]] = [row["components"] for row in click.modal["components"]]
    assert text_input["value"] == "a quiet harbour"
    submit = await fake.send_modal_submit(click, {text_input["custom_id"]: "a stormy harbour"})
    message = await result_of(fake, submit, bot=bot)
    job = bot.app.jobs.by_message(str(message.id))
    assert (job.kind, job.source_job_id, job.prompt, job.strength) == ("variation", source.id, "a stormy harbour", 0.8)
    assert bot.charges(bob.id) == [(str(bob.id), job.id, PRICE_MICROS)]

    # Remix survives a restart, and a reroll remixes too.
    bot = await make_bot.restart(bot)
    assert (await bot.app.accounts.user_settings(str(bob.id))).remix
    click = await fake.send_component_interaction(result.id, f"easel:reroll:{source.id}", user=bob)
    await fake.wait_for_ack(click)
    [[text_input]] = [row["components"] for row in click.modal["components"]]
    submit = await fake.send_modal_submit(click, {text_input["custom_id"]: "a harbour at dawn"})
    rerolled = bot.app.jobs.by_message(str((await result_of(fake, submit, bot=bot)).id))
    assert (rerolled.kind, rerolled.prompt) == ("imagine", "a harbour at dawn")


async def test_context_menus_vary_and_upscale_a_result(fake, make_bot, bob):
    bot = await make_bot()
    interaction = await fake.send_slash_command("imagine", {"prompt": "a lantern"})
    result = await result_of(fake, interaction, bot=bot)
    [source] = bot.jobs()
    for name, kind in (("Vary", "variation"), ("Upscale", "upscale")):
        menu = await fake.send_message_command(name, result.id, user=bob)
        message = await result_of(fake, menu, bot=bot)
        job = bot.app.jobs.by_message(str(message.id))
        assert (job.kind, job.source_job_id, job.user_id) == (kind, source.id, str(bob.id))


async def test_a_context_menu_on_a_message_that_is_no_result_is_refused(fake, make_bot):
    bot = await make_bot()
    plain = await fake.add_message(fake.channel, author=fake.user, content="hello")
    menu = await fake.send_message_command("Vary", plain.id)
    assert (await immediate_reply(fake, menu)).content == "\u2753 that message is not an easel result."
    assert bot.jobs() == []


async def test_use_as_image_for_edit_asks_for_a_prompt_and_edits_that_image(fake, make_bot, bob):
    bot = await make_bot()
    photo = png_bytes(256, 256, seed=9)
    posted = await fake.add_message(fake.channel, author=fake.user, content="my cat",
                                    files=[("cat.png", photo, "image/png")])
    menu = await fake.send_message_command("Use as image for /edit", posted.id, user=bob)
    ack = await fake.wait_for_ack(menu)
    assert ack.json["type"] == 9
    [[text_input]] = [row["components"] for row in menu.modal["components"]]
    submit = await fake.send_modal_submit(menu, {text_input["custom_id"]: "give it a hat"})
    message = await result_of(fake, submit, bot=bot)
    job = bot.app.jobs.by_message(str(message.id))
    assert (job.kind, job.prompt, job.user_id) == ("edit", "give it a hat", str(bob.id))
    assert pixels(bot.generator.calls[-1].source_image) == pixels(photo)
    assert not message.flags & EPHEMERAL


async def test_use_as_image_on_a_message_without_an_image_is_refused(fake, make_bot):
    bot = await make_bot()
    plain = await fake.add_message(fake.channel, author=fake.user, content="no picture")
    menu = await fake.send_message_command("Use as image for /edit", plain.id)
    assert (await immediate_reply(fake, menu)).content == "\u2753 that message has no image."
    assert bot.jobs() == []
