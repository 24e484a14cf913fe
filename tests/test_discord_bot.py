"""The easel Discord bot end to end: the real EaselClient (discord.py) against the fake Discord in
tests/fakes/discord_server.py, with a prepared generator, a real database and blob store. Each test
checks what a member sees (messages, ephemerality, attachments, buttons, reactions) and what easel
recorded (jobs, ledger). The last tests run the real `easel run` process."""
from __future__ import annotations

import asyncio
import hashlib
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image as PILImage

discord = pytest.importorskip("discord")

from tests.discord_helpers import (  # noqa: E402
    ACTIONS,
    ALLOWANCE_MICROS,
    PRICE_MICROS,
    RESULT_REACTIONS,
    FixedSizeGenerator,
    NsfwChannelsOnlyScreen,
    RunningBot,
    SteppingGenerator,
    bot_reactions,
    button_ids,
    decoded,
    embed_fields,
    eventually,
    immediate_reply,
    is_deleted,
    message_link,
    original,
    refusal_of,
    result_of,
)
from tests.fakes.discord_server import EPHEMERAL, FakeDiscord  # noqa: E402
from tests.fakes.generators import GeneratorError, PreparedGenerator, png_bytes  # noqa: E402
from tests.fakes.providers import FakeOpenAI  # noqa: E402
from tests.helpers import pixels, write_workspace_config  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


async def imagine_like(bot: RunningBot, command: str, options: dict, **kwargs):
    """Run a command that makes an image; the interaction and its result message."""
    interaction = await bot.fake.send_slash_command(command, options, **kwargs)
    return interaction, await result_of(bot.fake, interaction, bot=bot)


async def imagine_result(bot: RunningBot, options: dict, **kwargs):
    return await imagine_like(bot, "imagine", options, **kwargs)


def png_of(image: PILImage.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# ---- commands ----------------------------------------------------------------------------------


async def test_sync_registers_the_commands_with_their_options(fake, make_bot):
    bot = await make_bot()
    commands = {c["name"]: c for c in fake.commands() if c["type"] == 1}
    assert sorted(commands) == ["budget", "edit", "gallery", "help", "imagine", "moderation", "queue", "settings", "tips",
                                "upscale", "usage", "variation"]
    menus = sorted(c["name"] for c in fake.commands() if c["type"] == 3)  # message context menus
    assert menus == ["Details", "Upscale", "Use as image for /edit", "Vary"]
    assert fake.commands(fake.guild) == []  # no sync_guilds: global commands only
    assert fake.unmatched_requests == []

    imagine = {o["name"]: o for o in commands["imagine"]["options"]}
    assert list(imagine) == ["prompt", "negative", "seed", "model", "aspect", "quality", "sampler", "count",
                             "enhance", "lora", "control", "control_image", "control_scale", "control_job"]
    assert imagine["lora"].get("autocomplete") is True and imagine["control"].get("autocomplete") is True
    assert imagine["control_image"]["type"] == 11  # an attachment
    assert imagine["enhance"]["type"] == 5  # a boolean
    assert imagine["sampler"].get("autocomplete") is True
    assert imagine["prompt"]["required"] is True
    assert not any(o.get("required") for name, o in imagine.items() if name != "prompt")
    assert [c["value"] for c in imagine["aspect"]["choices"]] == [
        "1:1", "16:9", "9:16", "3:2", "2:3", "4:3", "3:4", "21:9"]
    assert [c["value"] for c in imagine["quality"]["choices"]] == ["standard", "hd", "low", "medium", "high"]
    assert imagine["model"].get("autocomplete") is True
    assert (imagine["count"]["type"], imagine["count"]["min_value"], imagine["count"]["max_value"]) == (4, 1, 4)
    assert (imagine["seed"]["min_value"], imagine["seed"]["max_value"]) == (0, 2**32 - 1)

    edit = {o["name"]: (o["type"], o.get("required", False)) for o in commands["edit"]["options"]}
    assert edit == {"image": (11, True), "prompt": (3, True), "mask": (11, False), "model": (3, False)}
    assert {o["name"] for o in commands["variation"]["options"]} == {"job", "image", "seed", "strength"}
    assert commands["settings"]["options"][2]["type"] == 5  # private: a boolean

    budget = commands["budget"]
    assert str(budget["default_member_permissions"]) == str(1 << 5)  # Manage Server
    # Guild-only: no DMs (dm_permission), or contexts limited to guilds (0).
    assert budget["dm_permission"] is False or budget["contexts"] == [0]
    subcommands = {o["name"]: o for o in budget["options"]}
    assert sorted(subcommands) == ["allowance", "block", "exempt", "grant", "guild-cap", "history", "report",
                                   "reset", "set", "show", "unblock"]
    assert all(o["type"] == (2 if name == "allowance" else 1) for name, o in subcommands.items())
    assert sorted(o["name"] for o in subcommands["allowance"]["options"]) == ["set", "show"]
    assert [(o["name"], o["type"]) for o in subcommands["set"]["options"]] == [("user", 6), ("amount", 10)]
    assert str(commands["tips"]["default_member_permissions"]) == str(1 << 5)
    for name, command in commands.items():
        if name not in ("budget", "tips", "moderation"):
            assert command["default_member_permissions"] is None, name
    assert bot.client.user.id == fake.bot_user.id


async def test_a_slow_job_is_deferred_at_once_and_edited_with_the_result(fake, make_bot):
    bot = await make_bot(generator=PreparedGenerator(delay_s=4.0))
    interaction = await fake.send_slash_command("imagine", {"prompt": "a lighthouse at dusk"})

    ack = await fake.wait_for_ack(interaction)
    assert (ack.status, ack.json) == (200, {"type": 5})
    assert interaction.ack_latency < 1.0
    assert original(fake, interaction).loading  # "easel is thinking..."

    message = await result_of(fake, interaction, timeout=15, bot=bot)
    [edit] = [r for r in interaction.requests if r.files]
    assert edit.received_at - interaction.sent_at > 3.5  # long after the acknowledgement window
    [job] = bot.jobs()
    assert (job.status, job.user_id, job.prompt) == ("done", str(fake.user.id), "a lighthouse at dusk")
    assert job.message_id == str(message.id)

    [attachment] = message.attachments
    assert attachment.filename == f"easel-{job.id}.png"
    assert attachment.data == bot.app.blobs.get(job.sha256)
    assert decoded(attachment.data).size == (512, 512)
    assert not message.flags & EPHEMERAL and not message.loading
    [embed] = message.embeds
    assert embed["image"]["url"] == attachment.url
    assert embed["description"] == "a lighthouse at dusk"
    assert embed_fields(message) == {"Seed": str(job.seed), "Model": "fake-model (fake)",
                                     "Size": "512\u00d7512", "Cost": "$0.01", "Balance": "$0.9900"}
    assert button_ids(message) == [f"easel:{action}:{job.id}" for action in ACTIONS]
    await eventually(lambda: bot_reactions(fake, fake.message(message.id)) == RESULT_REACTIONS,
                     what="the four reactions")
    assert bot.charges() == [(str(fake.user.id), job.id, PRICE_MICROS)]
    assert bot.held() == []


async def test_a_queued_job_shows_its_position_and_progress_edits_are_throttled(fake, make_bot, bob):
    # One generator slot; each job reports progress ten times in 1.5 s.
    bot = await make_bot(generator=SteppingGenerator(steps=10, step_s=0.15), queue_limit=1)
    first = await fake.send_slash_command("imagine", {"prompt": "a red fox"})
    await eventually(lambda: bot.jobs()[0].status == "running", what="the first job to start")
    second = await fake.send_slash_command("imagine", {"prompt": "a blue fox"}, user=bob)

    await result_of(fake, first, bot=bot)
    queued = await eventually(lambda: [r for r in second.requests if r.method == "PATCH"],
                              what="an edit of the second response")
    assert queued[0].json["content"] == "\u23f3 Queued \u2014 position 1"
    assert not queued[0].files
    await result_of(fake, second, bot=bot)

    for interaction in (first, second):
        edits = [r for r in interaction.requests if r.method == "PATCH"]
        progress, result = edits[:-1], edits[-1]
        assert result.files and result.json["content"] is None
        assert progress and all(not r.files for r in progress)
        assert all(r.json["content"].startswith(("\u23f3", "\U0001f3a8")) for r in progress)
        # Ten progress reports, but at most one edit per progress_interval_s (1 s); the bot
        # measures when it sends, the fake when it receives: allow for some jitter.
        gaps = [b.received_at - a.received_at for a, b in zip(progress, progress[1:])]
        assert all(gap >= 0.85 for gap in gaps), gaps
        assert len(progress) <= 3
    later = [r.json["content"] for r in second.requests if r.method == "PATCH"][1:-1]
    assert any("Generating" in text for text in later), later
    jobs = bot.jobs()
    assert [(j.user_id, j.status) for j in jobs] == [(str(fake.user.id), "done"), (str(bob.id), "done")]
    assert jobs[1].started_at >= jobs[0].finished_at - 0.05  # one slot: one after the other


# ---- refusals: ephemeral, and free --------------------------------------------------------------


def assert_nothing_charged(bot: RunningBot, *users) -> None:
    assert bot.charges() == []
    assert bot.held() == []
    for user in users:
        assert bot.app.ledger.balance(str(user.id)).reserved_micros == 0


async def test_over_budget_is_refused_ephemerally(fake, make_bot):
    bot = await make_bot({"budget": {"default_allowance_usd": 0.0}})
    interaction = await fake.send_slash_command("imagine", {"prompt": "a castle"})
    text = await refusal_of(fake, interaction)
    assert text.startswith("\U0001f4b8 over budget") and "Ask an admin" in text
    [job] = bot.jobs()
    assert (job.status, job.error_code, job.cost_micros) == ("refused", "over_budget", 0)
    assert bot.generator.calls == []
    assert_nothing_charged(bot, fake.user)
    assert bot.available(fake.user.id) == 0


async def test_a_blocked_prompt_is_refused_except_in_an_age_restricted_channel(fake, make_bot):
    bot = await make_bot()
    interaction = await fake.send_slash_command("imagine", {"prompt": "an nsfw portrait"})
    text = await refusal_of(fake, interaction)
    assert text.startswith("\U0001f6ab Not allowed") and "Nothing was charged" in text
    assert "age-restricted channels" in text and "nsfw" not in text  # names the rule, not the words
    [job] = bot.jobs()
    assert (job.status, job.error_code) == ("blocked", "blocked")
    assert bot.generator.calls == []
    assert_nothing_charged(bot, fake.user)

    allowed = await fake.send_slash_command("imagine", {"prompt": "an nsfw portrait"},
                                            channel=fake.nsfw_channel)
    message = await result_of(fake, allowed, bot=bot)
    assert message.channel_id == fake.nsfw_channel.id
    assert bot.jobs()[-1].status == "done" and bot.jobs()[-1].nsfw_channel is True
    assert [c[2] for c in bot.charges()] == [PRICE_MICROS]


@pytest.mark.parametrize("case", ["unknown model", "no such size", "no seeds"])
async def test_a_request_the_model_cannot_serve_is_refused(fake, make_bot, case):
    generator, options, expected = {
        "unknown model": (PreparedGenerator(), {"prompt": "a cat", "model": "nope-9000"}, "nope-9000"),
        "no such size": (FixedSizeGenerator(), {"prompt": "a cat", "aspect": "21:9"}, "no size near 21:9"),
        "no seeds": (PreparedGenerator(honours_seed=False), {"prompt": "a cat --seed 5"}, "does not take a seed"),
    }[case]
    bot = await make_bot(generator=generator)
    interaction = await fake.send_slash_command("imagine", options)
    text = await refusal_of(fake, interaction)
    assert text.startswith("\u2753") and expected in text, text
    assert bot.jobs() == []  # refused before a job was made
    assert bot.generator.calls == []
    assert_nothing_charged(bot, fake.user)


async def test_a_failed_generation_is_reported_ephemerally_and_refunded(fake, make_bot):
    bot = await make_bot(generator=PreparedGenerator(script=[GeneratorError("out of memory")]))
    interaction = await fake.send_slash_command("imagine", {"prompt": "a cathedral"})
    text = await refusal_of(fake, interaction)
    assert text == "\u26a0\ufe0f That failed: fake-model failed: out of memory. Nothing was charged."
    [job] = bot.jobs()
    assert (job.status, job.error_code) == ("failed", "failed")
    assert [tuple(r) for r in bot.app.db.query("SELECT state, charged_micros FROM reservations")] == [("released", 0)]
    assert_nothing_charged(bot, fake.user)


async def test_a_sampler_the_model_does_not_take_is_refused(fake, make_bot):
    bot = await make_bot()
    interaction = await fake.send_slash_command("imagine", {"prompt": "a kite", "sampler": "euler_a"})
    text = await refusal_of(fake, interaction)
    assert text.startswith("\u2753 fake-model has no option 'sampler'"), text
    assert bot.generator.calls == []
    assert_nothing_charged(bot, fake.user)


async def test_more_images_than_max_count_is_refused(fake, make_bot):
    bot = await make_bot({"discord": {"max_count": 2}})
    interaction = await fake.send_slash_command("imagine", {"prompt": "a flock", "count": 3})
    assert await refusal_of(fake, interaction) == "\u2753 at most 2 images at once."
    assert bot.jobs() == [] and bot.generator.calls == []


async def test_too_many_jobs_in_flight_is_refused(fake, make_bot):
    bot = await make_bot({"queue": {"max_jobs_per_user": 1}}, generator=PreparedGenerator(delay_s=1.0))
    first = await fake.send_slash_command("imagine", {"prompt": "a slow one"})
    await eventually(lambda: bot.jobs() and bot.jobs()[0].status == "running", what="the first job to run")
    second = await fake.send_slash_command("imagine", {"prompt": "an impatient one"})

    text = await refusal_of(fake, second)
    assert text.startswith("\u23f3 you already have 1 request in flight"), text
    assert bot.jobs()[1].status == "refused" and bot.jobs()[1].error_code == "busy"
    assert bot.held() == [bot.jobs()[0].id]  # only the first job's money is held
    await result_of(fake, first, bot=bot)
    assert bot.charges() == [(str(fake.user.id), bot.jobs()[0].id, PRICE_MICROS)]
    assert len(bot.generator.calls) == 1


# ---- what the commands make -----------------------------------------------------------------------


async def test_inline_flags_set_seed_negative_prompt_and_aspect(fake, make_bot):
    bot = await make_bot()
    _, message = await imagine_result(bot, {"prompt": "a harbour at night --seed 42 --no blur --ar 16:9"})
    [job] = bot.jobs()
    assert (job.prompt, job.seed, job.negative_prompt) == ("a harbour at night", 42, "blur")
    assert (job.width, job.height) == (640, 360)  # 16:9 at about the model's 512x512 area
    assert decoded(message.attachments[0].data).size == (640, 360)
    fields = embed_fields(message)
    assert (fields["Seed"], fields["Negative"], fields["Size"]) == ("42", "blur", "640\u00d7360")
    [call] = bot.generator.calls
    assert (call.prompt, call.seed, call.negative_prompt) == ("a harbour at night", 42, "blur")


async def test_count_two_gives_one_grid_of_two_images_with_consecutive_seeds(fake, make_bot):
    bot = await make_bot()
    interaction = await fake.send_slash_command("imagine", {"prompt": "a kite --seed 7", "count": 2})
    grid = await result_of(fake, interaction, bot=bot)
    jobs = bot.jobs()
    assert sorted(j.seed for j in jobs) == [7, 8]
    assert all(j.prompt == "a kite" and j.status == "done" for j in jobs)
    await eventually(lambda: {j.message_id for j in bot.jobs()} == {str(grid.id)}, what="all recorded")
    assert interaction.followup_message_ids == []
    assert decoded(grid.attachments[0].data).size == (2 * 512 + 4, 512)  # two across
    assert not grid.flags & EPHEMERAL
    assert sorted(c[2] for c in bot.charges(fake.user.id)) == [PRICE_MICROS, PRICE_MICROS]


async def test_an_inline_seed_in_any_case_with_count_two_gives_consecutive_seeds(fake, make_bot):
    """Regression: the front end once stripped `--seed` itself, case-sensitively, and refused the
    second image of `--Seed 42` with "the seed is given twice"."""
    bot = await make_bot()
    interaction = await fake.send_slash_command("imagine", {"prompt": "a castle --Seed 42", "count": 2})
    await result_of(fake, interaction, bot=bot)
    jobs = await eventually(lambda: [j for j in bot.jobs() if j.status == "done"] if len(
        [j for j in bot.jobs() if j.status == "done"]) == 2 else None, what="both images")
    assert sorted(j.seed for j in jobs) == [42, 43]


async def test_an_unexpected_error_after_defer_ends_with_a_private_message(fake, make_bot, monkeypatch):
    """Regression: an exception escaping a command after `defer` left "thinking..." for good."""
    bot = await make_bot()

    async def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(bot.app.service, "imagine", broken)
    interaction = await fake.send_slash_command("imagine", {"prompt": "a castle"})
    text = await refusal_of(fake, interaction)
    assert text.startswith("\u26a0\ufe0f Something went wrong on easel's side. Nothing was charged")
    assert_nothing_charged(bot, fake.user)


async def test_count_four_gives_four_results_within_the_default_job_limit(fake, make_bot):
    """The default max_count (4) is above the default max_jobs_per_user (2): one /imagine must not
    trip the member's own in-flight limit."""
    bot = await make_bot(generator=PreparedGenerator(delay_s=0.3))
    interaction = await fake.send_slash_command("imagine", {"prompt": "a kite --seed 7", "count": 4})
    grid = await result_of(fake, interaction, bot=bot)
    assert sorted((j.seed, j.status) for j in bot.jobs()) == [(7, "done"), (8, "done"), (9, "done"), (10, "done")]
    await eventually(lambda: {j.message_id for j in bot.jobs()} == {str(grid.id)}, what="all recorded")
    assert len(bot.charges(fake.user.id)) == 4


async def test_edit_repaints_an_uploaded_image_under_a_mask(fake, make_bot):
    bot = await make_bot()
    photo = fake.add_attachment("photo.png", png_bytes(384, 256, seed=3), "image/png")
    mask_image = PILImage.new("L", (384, 256), 0)
    mask_image.paste(255, (96, 64, 288, 192))
    mask = fake.add_attachment("mask.png", png_of(mask_image), "image/png")
    _, message = await imagine_like(bot, "edit", {"image": photo, "prompt": "a red door", "mask": mask})

    [job] = bot.jobs()
    # The upload's 3:2 shape at about the model's 512x512 area.
    assert (job.kind, job.status, job.prompt, job.width, job.height) == ("edit", "done", "a red door", 624, 416)
    assert job.source_sha256 and job.mask_sha256
    assert decoded(bot.app.blobs.get(job.mask_sha256)).getpixel((0, 0)) == 0
    [call] = bot.generator.calls
    assert call.kind == "edit" and call.source_image and call.mask_image
    assert decoded(call.mask_image).getpixel((200, 100)) == 255
    assert message.embeds[0]["title"] == f"Edit \u00b7 job {job.id}"
    assert bot.charges() == [(str(fake.user.id), job.id, PRICE_MICROS)]


async def test_edit_with_a_file_that_is_not_an_image_is_refused_before_anything_is_spent(fake, make_bot):
    bot = await make_bot()
    notes = fake.add_attachment("notes.txt", b"not a picture", "text/plain")
    interaction = await fake.send_slash_command("edit", {"image": notes, "prompt": "a red door"})
    text = await refusal_of(fake, interaction)
    assert "must be an image" in text and "text/plain" in text, text
    assert bot.jobs() == [] and bot.generator.calls == []
    assert_nothing_charged(bot, fake.user)


async def test_variation_by_job_number_and_by_message_link_and_upscale_of_the_last(fake, make_bot, bob):
    bot = await make_bot()
    _, source = await imagine_result(bot, {"prompt": "a tall ship --seed 11"})
    [source_job] = bot.jobs()

    _, by_number = await imagine_like(bot, "variation", {"job": str(source_job.id), "seed": 12}, user=bob)
    _, by_link = await imagine_like(bot, "variation", {"job": message_link(source)})
    _, upscaled = await imagine_like(bot, "upscale", {})  # alice's last job: the variation by link

    jobs = bot.jobs()
    assert [(j.kind, j.user_id, j.status) for j in jobs[1:]] == [
        ("variation", str(bob.id), "done"), ("variation", str(fake.user.id), "done"),
        ("upscale", str(fake.user.id), "done")]
    assert jobs[1].source_job_id == jobs[2].source_job_id == source_job.id
    assert jobs[1].seed == 12 and jobs[1].prompt == "a tall ship"
    assert bot.generator.calls[1].source_image == bot.app.blobs.get(source_job.sha256)
    assert bot.generator.calls[3].source_image == bot.app.blobs.get(jobs[2].sha256)
    assert (jobs[3].width, jobs[3].height) == (1024, 1024)
    assert decoded(upscaled.attachments[0].data).size == (1024, 1024)
    assert embed_fields(upscaled)["Size"] == "1024\u00d71024"
    assert button_ids(upscaled) == [f"easel:{a}:{jobs[3].id}" for a in ("subtle", "strong", "reroll", "details",
                                                                         "delete")]
    assert by_link.embeds[0]["title"] == f"Variation \u00b7 job {jobs[2].id}"
    assert [c[:2] for c in bot.charges()] == [(str(fake.user.id), 1), (str(bob.id), 2),
                                              (str(fake.user.id), 3), (str(fake.user.id), 4)]


async def test_variation_of_a_message_that_is_no_result_is_refused(fake, make_bot):
    bot = await make_bot()
    chatter = await fake.add_message(fake.channel, author=fake.user, content="hello")
    interaction = await fake.send_slash_command("variation", {"job": message_link(chatter)})
    assert "not an easel result" in await refusal_of(fake, interaction)
    assert bot.jobs() == []


async def test_usage_shows_balance_and_recent_jobs_ephemerally(fake, make_bot):
    bot = await make_bot()
    await imagine_result(bot, {"prompt": "a quiet pond"})
    interaction = await fake.send_slash_command("usage")
    message = await immediate_reply(fake, interaction)
    [job] = bot.jobs()
    assert "**Available** $0.9900" in message.content
    assert "**Allowance** $1.0000 per month, refills <t:" in message.content
    assert "**Spent this month** $0.0100" in message.content
    assert f"`{job.id}` done \u00b7 imagine \u00b7 fake-model \u00b7 $0.0100 \u00b7 a quiet pond" in message.content


async def test_private_setting_makes_results_ephemeral_without_reactions(fake, make_bot):
    bot = await make_bot()
    reply = await immediate_reply(fake, await fake.send_slash_command("settings", {"private": True}))
    assert "results **private**" in reply.content
    assert bot.app.preferences.user(str(fake.user.id)).private is True

    interaction = await fake.send_slash_command("imagine", {"prompt": "a secret garden"})
    ack = await fake.wait_for_ack(interaction)
    assert ack.json == {"type": 5, "data": {"flags": EPHEMERAL}}
    message = await result_of(fake, interaction, bot=bot)
    assert message.flags & EPHEMERAL
    [job] = bot.jobs()
    assert job.message_id == str(message.id)
    assert not [r for r in fake.requests if "/reactions/" in r.path]
    assert message.reactions == {}


async def test_another_members_private_result_is_refused_as_if_missing(fake, make_bot, bob):
    bot = await make_bot()
    await immediate_reply(fake, await fake.send_slash_command("settings", {"private": True}))
    await imagine_result(bot, {"prompt": "alice's secret card"})
    [secret] = bot.jobs()
    assert secret.public is False
    for command in ("variation", "upscale"):
        interaction = await fake.send_slash_command(command, {"job": str(secret.id)}, user=bob)
        assert await refusal_of(fake, interaction) == f"\u2753 there is no job {secret.id}."
        missing = await fake.send_slash_command(command, {"job": "999"}, user=bob)
        assert await refusal_of(fake, missing) == "\u2753 there is no job 999."
    assert [j.id for j in bot.jobs()] == [secret.id] and bot.charges(bob.id) == []


async def test_a_public_result_is_recorded_as_public(fake, make_bot):
    bot = await make_bot()
    await imagine_result(bot, {"prompt": "a lighthouse"})
    [job] = bot.jobs()
    assert job.public is True and job.message_id


async def test_settings_store_a_default_model_and_aspect_that_inline_flags_override(fake, make_bot):
    bot = await make_bot()
    reply = await immediate_reply(fake, await fake.send_slash_command(
        "settings", {"model": "fake-model-alias", "aspect": "16:9"}))
    assert "model **fake-model**, aspect **16:9**, results **public**" in reply.content
    refused = await immediate_reply(fake, await fake.send_slash_command("settings", {"aspect": "sideways"}))
    assert refused.content.startswith("\u2753 --ar takes a ratio like 16:9")
    prefs = bot.app.preferences.user(str(fake.user.id))
    assert (prefs.model, prefs.aspect, prefs.private) == ("fake-model", "16:9", False)

    await imagine_result(bot, {"prompt": "a wide valley"})
    await imagine_result(bot, {"prompt": "a square tile --ar 1:1"})
    assert [(j.model, j.width, j.height) for j in bot.jobs()] == [("fake-model", 640, 360), ("fake-model", 512, 512)]


async def test_a_private_result_varied_with_its_button_stays_private(fake, make_bot):
    """A click answers as the clicker's /settings private says."""
    bot = await make_bot()
    await immediate_reply(fake, await fake.send_slash_command("settings", {"private": True}))
    _, result = await imagine_result(bot, {"prompt": "a diary page"})
    [job] = bot.jobs()
    click = await fake.send_component_interaction(result.id, f"easel:subtle:{job.id}")
    message = await result_of(fake, click, bot=bot)
    assert bot.jobs()[-1].kind == "variation"
    assert message.flags & EPHEMERAL, "a member with private results got a public one"
    assert message.reactions == {}


async def test_the_delete_button_removes_a_private_result(fake, make_bot):
    """The channel endpoint cannot reach an ephemeral message (404); the interaction's webhook can."""
    bot = await make_bot()
    await immediate_reply(fake, await fake.send_slash_command("settings", {"private": True}))
    _, result = await imagine_result(bot, {"prompt": "a diary page"})
    [job] = bot.jobs()
    click = await fake.send_component_interaction(result.id, f"easel:delete:{job.id}")
    await fake.wait_for_ack(click)
    await eventually(lambda: is_deleted(fake, result.id), timeout=2, what="the private result to be deleted")
    await eventually(lambda: bot.app.jobs.get(job.id).message_id is None, what="the message forgotten")


# ---- /budget -------------------------------------------------------------------------------------


async def budget(fake: FakeDiscord, sub: str, options: dict | None = None, *, user=None) -> str:
    interaction = await fake.send_slash_command(f"budget {sub}", options or {}, user=user or fake.owner)
    return (await immediate_reply(fake, interaction)).content


def ledger_kinds(bot: RunningBot, user) -> list[tuple[str, int, str | None]]:
    rows = bot.app.db.query("SELECT kind, amount_micros, actor FROM ledger_entries WHERE user_id = ?"
                            " ORDER BY id", (str(user.id),))
    return [tuple(r) for r in rows]


async def test_budget_is_refused_to_a_plain_member(fake, make_bot, bob):
    bot = await make_bot()
    for sub, options in (("set", {"user": bob, "amount": 50.0}), ("grant", {"user": fake.user, "amount": 5.0}),
                         ("report", {}), ("guild-cap", {"amount": 0.5}), ("show", {"user": bob}),
                         ("block", {"user": bob}), ("history", {"user": bob}), ("exempt", {"on": True, "user": bob}),
                         ("allowance set", {"amount": 9.0})):
        text = await budget(fake, sub, options, user=fake.user)
        assert text == "\U0001f512 only admins can manage budgets", (sub, text)
    assert bot.app.db.query("SELECT * FROM ledger_entries") == []
    assert bot.available(bob.id) == ALLOWANCE_MICROS
    assert bot.app.preferences.guild(str(fake.guild.id)).spend_cap_micros is None


async def test_the_guild_owner_manages_budgets(fake, make_bot, bob):
    bot = await make_bot()
    await imagine_result(bot, {"prompt": "a windmill"})
    await imagine_result(bot, {"prompt": "a mill pond"})
    await imagine_result(bot, {"prompt": "a barn"}, user=bob)

    text = await budget(fake, "set", {"user": bob, "amount": 5.0})
    assert text.startswith(f"Set the balance to $5.0000.\n<@{bob.id}>: balance $5.0000, available $5.0000, "
                           "spent this month $0.0100\nAllowance $1.0000 per month, refills <t:"), text
    assert bot.available(bob.id) == 5_000_000
    assert "available $7.5000" in await budget(fake, "grant", {"user": bob, "amount": 2.5, "reason": "won a contest"})
    assert "balance $0.9800" in await budget(fake, "show", {"user": fake.user})
    assert "spent this month $0.0200" in await budget(fake, "show", {"user": fake.user})
    # A reset lapses what is left of the allowance ($0.99) and gives a full one; credit stays.
    assert "available $7.5100" in await budget(fake, "reset", {"user": bob})
    took = await budget(fake, "grant", {"user": bob, "amount": -999999.0})
    assert took.startswith("Took away $7.5100 of the $999999.0000 asked: only that much was available") and "available $0.0000" in took
    assert "available $1.0000" in await budget(fake, "reset", {"user": bob})
    actor = f"discord:{fake.owner.id}"
    assert [k for k in ledger_kinds(bot, bob) if k[0] not in ("reserve", "settle", "release")] == [
        ("refill", ALLOWANCE_MICROS, None), ("adjust", 5_000_000 - 990_000, actor),
        ("grant", 2_500_000, actor), ("lapse", -990_000, actor), ("refill", 1_000_000, actor),
        ("grant", -7_510_000, actor), ("refill", 1_000_000, actor)]
    history = await budget(fake, "history", {"user": bob, "limit": 3})
    assert history.splitlines()[0] == f"**<@{bob.id}>'s ledger** (newest first)"
    assert "`grant` $7.5100" not in history and "won a contest" not in history  # only the last 3
    assert "`refill` $1.0000" in history and f"by <@{fake.owner.id}>" in history

    reply = await immediate_reply(fake, await fake.send_slash_command("budget report", {}, user=fake.owner))
    assert reply.content.splitlines() == ["**Spend this month** $0.0300", f"1. <@{fake.user.id}> $0.0200",
                                          f"2. <@{bob.id}> $0.0100", "**By provider** fake: $0.0300",
                                          "**By model** fake-model: $0.0300"]
    [chart] = reply.attachments  # daily spend against the caps
    assert chart.filename == "spend.png" and chart.data.startswith(b"\x89PNG")
    assert "cap is now $0.0400 per month" in await budget(fake, "guild-cap", {"amount": 0.04})
    assert bot.app.preferences.guild(str(fake.guild.id)).spend_cap_micros == 40_000
    assert "**Server cap** $0.0400 per month" in await budget(fake, "report", {})
    await imagine_result(bot, {"prompt": "a fourth picture"})  # $0.04 spent: the cap is reached
    over = await fake.send_slash_command("imagine", {"prompt": "a fifth picture"}, user=bob)
    text = await refusal_of(fake, over)
    assert text.startswith("\u23f8\ufe0f") and "cap" in text, text
    assert re.search(r"It lifts <t:\d+:R>\.$", text), text  # the next period
    assert bot.jobs()[-1].error_code == "spend_cap"
    assert len(bot.charges()) == 4 and bot.held() == []
    assert "no spending cap" in await budget(fake, "guild-cap", {"amount": 0.0})
    await imagine_result(bot, {"prompt": "a fifth picture"}, user=bob)


async def test_with_admin_roles_only_those_roles_manage_budgets(fake, make_bot):
    bot = await make_bot({"discord": {"admin_roles": ["Moderator"]}})
    text = await budget(fake, "set", {"user": fake.user, "amount": 3.0}, user=fake.moderator)
    assert text.startswith(f"Set the balance to $3.0000.\n<@{fake.user.id}>: balance $3.0000")
    # The roles replace the Manage Server rule: the owner holds no Moderator role.
    text = await budget(fake, "set", {"user": fake.user, "amount": 9.0}, user=fake.owner)
    assert text == "\U0001f512 only admins can manage budgets"
    assert bot.available(fake.user.id) == 3_000_000


# ---- reactions and buttons on a result ---------------------------------------------------------------


async def reaction_result(fake: FakeDiscord, bot: RunningBot, message_id: int, emoji: str, user):
    """React, and return the new result message the bot posts in reply (and its job)."""
    before = {m.id for m in fake.messages(fake.channel)}
    await fake.add_reaction(message_id, emoji, user=user)

    def posted():
        new = [m for m in fake.messages(fake.channel) if m.id not in before]
        return new[0] if new and new[0].attachments else None

    message = await eventually(posted, what=f"a result for {emoji}")
    # The bot records the message, then adds its reactions.
    await eventually(lambda: bot_reactions(fake, fake.message(message.id)) == RESULT_REACTIONS)
    job = bot.app.jobs.by_message(str(message.id))
    assert job is not None and job.user_id == str(user.id)
    assert message.content == f"<@{user.id}>"
    [status] = [r for r in fake.requests if r.method == "POST" and (r.response_json or {}).get("id") == str(message.id)]
    assert str(status.json["message_reference"]["message_id"]) == str(message_id)  # a reply to the result
    assert status.json["content"] == f"<@{user.id}> \u23f3 working on it\u2026"
    return message, job


async def test_reactions_vary_reroll_upscale_and_delete(fake, make_bot, bob):
    bot = await make_bot()
    _, result = await imagine_result(bot, {"prompt": "a paper boat --seed 5"})
    await eventually(lambda: bot_reactions(fake, fake.message(result.id)) == RESULT_REACTIONS)
    [source] = bot.jobs()

    varied, variation = await reaction_result(fake, bot, result.id, "\U0001f501", bob)
    assert (variation.kind, variation.source_job_id, variation.prompt) == ("variation", source.id, "a paper boat")
    assert bot.generator.calls[-1].source_image == bot.app.blobs.get(source.sha256)
    assert bot.charges(bob.id) == [(str(bob.id), variation.id, PRICE_MICROS)]  # the reactor pays
    assert bot.charges(fake.user.id) == [(str(fake.user.id), source.id, PRICE_MICROS)]
    assert varied.attachments[0].data == bot.app.blobs.get(variation.sha256)

    _, reroll = await reaction_result(fake, bot, result.id, "\U0001f3b2", fake.user)
    assert (reroll.kind, reroll.prompt, reroll.width, reroll.height) == ("imagine", "a paper boat", 512, 512)
    assert reroll.seed != source.seed

    upscaled_message, upscale = await reaction_result(fake, bot, result.id, "\u2b06\ufe0f", fake.user)
    assert (upscale.kind, upscale.source_job_id, upscale.width, upscale.height) == ("upscale", source.id, 1024, 1024)
    assert decoded(upscaled_message.attachments[0].data).size == (1024, 1024)

    await fake.add_reaction(result.id, "\U0001f5d1\ufe0f", user=bob)  # not bob's image: nothing happens
    await fake.add_reaction(varied.id, "\U0001f5d1\ufe0f", user=bob)  # bob's own: deleted
    await eventually(lambda: is_deleted(fake, varied.id), what="bob's variation to be deleted")
    await eventually(lambda: bot.app.jobs.get(variation.id).message_id is None, what="the message forgotten")
    assert not is_deleted(fake, result.id)
    await fake.add_reaction(result.id, "\U0001f5d1\ufe0f", user=fake.user)
    await eventually(lambda: is_deleted(fake, result.id), what="alice's result to be deleted")
    await eventually(lambda: bot.app.jobs.get(source.id).message_id is None, what="the message forgotten")

    # The bot's own twelve reactions on its four results started nothing.
    assert [j.kind for j in bot.jobs()] == ["imagine", "variation", "imagine", "upscale"]
    assert len(bot.generator.calls) == 4 and bot.held() == []


@pytest.mark.parametrize("action", ["subtle", "strong", "reroll", "upscale"])
async def test_a_button_runs_its_action_charged_to_whoever_clicks(fake, make_bot, bob, action):
    bot = await make_bot()
    _, result = await imagine_result(bot, {"prompt": "a glass city"})
    [source] = bot.jobs()

    click = await fake.send_component_interaction(result.id, f"easel:{action}:{source.id}", user=bob)
    ack = await fake.wait_for_ack(click)
    assert (ack.status, ack.json) == (200, {"type": 5})
    message = await result_of(fake, click, bot=bot)
    assert message.id != result.id and not message.flags & EPHEMERAL
    job = bot.jobs()[-1]
    assert job.user_id == str(bob.id) and job.message_id == str(message.id)
    assert bot.charges(bob.id) == [(str(bob.id), job.id, PRICE_MICROS)]
    assert job.kind == {"subtle": "variation", "strong": "variation", "reroll": "imagine", "upscale": "upscale"}[action]
    if action in ("subtle", "strong"):
        assert job.strength == {"subtle": 0.35, "strong": 0.8}[action]  # the two strengths from config
    if action != "reroll":
        assert job.source_job_id == source.id
    else:
        assert (job.prompt, job.width) == (source.prompt, source.width) and job.seed != source.seed
    assert embed_fields(message)["Size"] == ("1024\u00d71024" if action == "upscale" else "512\u00d7512")
    await eventually(lambda: bot_reactions(fake, fake.message(message.id)) == RESULT_REACTIONS)


async def test_the_delete_button_works_for_the_requester_and_admins_only(fake, make_bot, bob):
    bot = await make_bot()
    _, result = await imagine_result(bot, {"prompt": "a glass city"})
    _, second = await imagine_result(bot, {"prompt": "a glass town"})
    job, second_job = bot.jobs()

    stranger = await fake.send_component_interaction(result.id, f"easel:delete:{job.id}", user=bob)
    refusal = await immediate_reply(fake, stranger)
    assert "only the person who asked for this image, or an admin" in refusal.content
    assert not is_deleted(fake, result.id)

    requester = await fake.send_component_interaction(result.id, f"easel:delete:{job.id}", user=fake.user)
    ack = await fake.wait_for_ack(requester)
    assert (ack.status, ack.json["type"]) == (200, 6)  # acknowledged without a new message
    await eventually(lambda: is_deleted(fake, result.id), what="the result to be deleted")
    await eventually(lambda: bot.app.jobs.get(job.id).message_id is None, what="the message forgotten")

    admin = await fake.send_component_interaction(second.id, f"easel:delete:{second_job.id}", user=fake.owner)
    await fake.wait_for_ack(admin)  # the guild owner has Manage Server
    await eventually(lambda: is_deleted(fake, second.id), what="the admin's delete")
    assert len(bot.jobs()) == 2 and not any(m.attachments for m in fake.messages(fake.channel))


async def test_reactions_and_buttons_on_a_result_still_work_after_a_restart(fake, make_bot, bob):
    bot = await make_bot()
    _, result = await imagine_result(bot, {"prompt": "an old map"})
    [source] = bot.jobs()
    await eventually(lambda: bot_reactions(fake, fake.message(result.id)) == RESULT_REACTIONS)

    before = bot
    bot = await make_bot.restart(bot)  # a new App and client on the same database file
    assert before.client.is_closed() and bot.client is not before.client
    _, variation = await reaction_result(fake, bot, result.id, "\U0001f501", bob)
    assert (variation.kind, variation.source_job_id) == ("variation", source.id)

    click = await fake.send_component_interaction(result.id, f"easel:upscale:{source.id}", user=bob)
    message = await result_of(fake, click, bot=bot)
    upscale = bot.app.jobs.by_message(str(message.id))
    assert (upscale.kind, upscale.source_job_id, upscale.user_id) == ("upscale", source.id, str(bob.id))
    assert [c[:2] for c in bot.charges()] == [(str(fake.user.id), source.id), (str(bob.id), variation.id),
                                              (str(bob.id), upscale.id)]


async def test_a_result_after_the_token_expired_is_posted_in_the_channel(fake, make_bot):
    bot = await make_bot(generator=PreparedGenerator(delay_s=0.5))
    interaction = await fake.send_slash_command("imagine", {"prompt": "a sundial"})
    await fake.wait_for_ack(interaction)
    fake.expire_interaction(interaction)  # as if the job had taken more than 15 minutes

    def posted():
        return [m for m in fake.messages(fake.channel) if m.attachments]

    [message] = await eventually(posted, what="the result in the channel")
    await eventually(lambda: bot.app.jobs.by_message(str(message.id)), what="the result recorded")
    assert f"<@{fake.user.id}>" in message.content
    assert not message.flags & EPHEMERAL and message.interaction_id is None
    [job] = bot.jobs()
    assert job.status == "done" and job.message_id == str(message.id)
    assert message.attachments[0].data == bot.app.blobs.get(job.sha256)
    assert embed_fields(message)["Seed"] == str(job.seed)
    await eventually(lambda: bot_reactions(fake, fake.message(message.id)) == RESULT_REACTIONS)
    assert bot.charges() == [(str(fake.user.id), job.id, PRICE_MICROS)]
    assert original(fake, interaction).loading  # the expired response could not be touched


async def test_a_private_result_after_the_token_expired_is_not_posted_in_the_channel(fake, make_bot):
    bot = await make_bot(generator=PreparedGenerator(delay_s=0.5))
    await immediate_reply(fake, await fake.send_slash_command("settings", {"private": True}))
    interaction = await fake.send_slash_command("imagine", {"prompt": "a sundial"})
    await fake.wait_for_ack(interaction)
    fake.expire_interaction(interaction)

    def told():  # the fake has no direct messages, so the fallback speaks in the channel
        return [m for m in fake.messages(fake.channel) if "private result" in m.content]

    [message] = await eventually(told, what="a word in the channel")
    [job] = bot.jobs()
    assert message.content.startswith(f"<@{fake.user.id}> your private result (job {job.id}) is ready")
    assert not any(m.attachments for m in fake.messages(fake.channel))
    assert job.status == "done" and bot.charges() == [(str(fake.user.id), job.id, PRICE_MICROS)]


async def test_a_failure_after_the_token_expired_is_told_in_the_channel(fake, make_bot):
    bot = await make_bot(generator=SteppingGenerator(steps=3, step_s=0.2, script=[GeneratorError("out of memory")]))
    interaction = await fake.send_slash_command("imagine", {"prompt": "a sundial"})
    await fake.wait_for_ack(interaction)
    fake.expire_interaction(interaction)

    def told():
        return [m for m in fake.messages(fake.channel) if "That failed" in m.content]

    [message] = await eventually(told, what="the failure in the channel")
    assert message.content == (f"<@{fake.user.id}> \u26a0\ufe0f That failed: fake-model failed: out of memory."
                               " Nothing was charged.")
    assert not message.flags & EPHEMERAL
    assert bot.jobs()[0].status == "failed"
    assert_nothing_charged(bot, fake.user)


async def test_an_image_over_the_upload_limit_is_sent_as_a_jpeg_with_a_link(fake, make_bot):
    noise = PILImage.frombytes("RGB", (512, 512), hashlib.shake_256(b"noise").digest(512 * 512 * 3))
    bot = await make_bot(generator=PreparedGenerator(script=[png_of(noise)]))
    fake.attachment_size_limit = 500_000  # the PNG is about 790 kB
    _, message = await imagine_result(bot, {"prompt": "static"})
    [job] = bot.jobs()
    assert len(bot.app.blobs.get(job.sha256)) > fake.attachment_size_limit
    [attachment] = message.attachments
    assert attachment.filename == f"easel-{job.id}.jpg" and len(attachment.data) <= 500_000
    assert decoded(attachment.data).format == "JPEG"
    [embed] = message.embeds
    assert embed["image"]["url"] == attachment.url
    assert embed_fields(message)["Full size"] == f"[512\u00d7512 PNG]({job.image_url})"
    assert job.image_url.endswith(f"/images/{job.sha256}.png")


async def test_variation_of_an_uploaded_image(fake, make_bot):
    bot = await make_bot()
    upload = fake.add_attachment("mine.png", png_bytes(256, 256, seed=9), "image/png")
    _, message = await imagine_like(bot, "variation", {"image": upload, "strength": 0.3})
    [job] = bot.jobs()
    assert (job.kind, job.source_job_id, job.strength, job.width, job.height) == ("variation", None, 0.3, 512, 512)
    assert decoded(bot.app.blobs.get(job.source_sha256)).size == (256, 256)
    assert bot.generator.calls[0].strength == 0.3
    assert message.embeds[0]["title"] == f"Variation \u00b7 job {job.id}"


async def test_progress_previews_of_an_image_unfit_for_the_channel_are_never_posted(fake, make_bot):
    """The image screen judges the finished image; previews of it must not reach a channel where
    the screen would block it."""
    preview = png_bytes(64, 64, seed=1)
    bot = await make_bot(generator=SteppingGenerator(steps=4, step_s=0.4, preview=preview),
                         image_screen=NsfwChannelsOnlyScreen())
    interaction = await fake.send_slash_command("imagine", {"prompt": "a marble statue"})
    await refusal_of(fake, interaction)
    assert bot.jobs()[0].status == "blocked"
    assert [r.path for r in fake.requests if r.files] == []

    allowed = await fake.send_slash_command("imagine", {"prompt": "a marble statue"}, channel=fake.nsfw_channel)
    await result_of(fake, allowed, bot=bot)
    previews = [f for r in allowed.requests for f in r.files if f.filename == "preview.png"]
    assert previews and previews[0].data == preview  # where the image may be shown, so may its previews


async def test_an_image_unfit_for_the_channel_is_never_posted(fake, make_bot):
    bot = await make_bot(image_screen=NsfwChannelsOnlyScreen())
    interaction = await fake.send_slash_command("imagine", {"prompt": "a marble statue"})
    text = await refusal_of(fake, interaction)
    assert text.startswith("\U0001f6ab Not allowed: the result was blocked: nudity"), text
    assert "Nothing was charged" in text
    [job] = bot.jobs()
    assert (job.status, job.sha256, job.message_id) == ("blocked", None, None)
    assert not any(m.attachments for m in fake.messages(fake.channel))
    assert not any(r.files for r in fake.requests)
    assert list((bot.app.blobs.root).rglob("*.png")) == []  # not even stored
    assert_nothing_charged(bot, fake.user)

    allowed = await fake.send_slash_command("imagine", {"prompt": "a marble statue"}, channel=fake.nsfw_channel)
    message = await result_of(fake, allowed, bot=bot)
    assert message.channel_id == fake.nsfw_channel.id
    assert bot.jobs()[-1].status == "done" and len(bot.charges()) == 1


async def test_rerolling_an_upscale_of_the_last_job_upscales_the_same_image(fake, make_bot, bob):
    """A job made from "your last" image records which job that was: 🎲 on its result must not
    resolve "the last job" again (of whoever clicks)."""
    bot = await make_bot()
    await imagine_result(bot, {"prompt": "a first picture"})
    _, upscaled = await imagine_like(bot, "upscale", {})  # of the first picture
    await imagine_result(bot, {"prompt": "a second picture"})
    first, upscale, _ = bot.jobs()
    assert upscale.source_job_id == first.id

    click = await fake.send_component_interaction(upscaled.id, f"easel:reroll:{upscale.id}", user=bob)
    await result_of(fake, click, bot=bot)
    reroll = bot.jobs()[-1]
    assert (reroll.kind, reroll.source_job_id, reroll.user_id) == ("upscale", first.id, str(bob.id))
    assert bot.generator.calls[-1].source_image == bot.app.blobs.get(first.sha256)


# ---- shutdown ------------------------------------------------------------------------------------


async def test_shutdown_lets_a_running_job_finish_within_the_grace(fake, make_bot):
    bot = await make_bot(generator=PreparedGenerator(delay_s=1.0))
    interaction = await fake.send_slash_command("imagine", {"prompt": "a last light"})
    await eventually(lambda: bot.jobs() and bot.jobs()[0].status == "running", what="the job to run")

    started = time.monotonic()
    await bot.client.delivery.shutdown(grace_s=30)
    assert time.monotonic() - started < 5
    message = original(fake, interaction)
    assert message.attachments, "the result was posted before shutdown returned"
    [job] = bot.jobs()
    assert job.status == "done" and bot.charges() == [(str(fake.user.id), job.id, PRICE_MICROS)]

    late = await fake.send_slash_command("imagine", {"prompt": "one more"})
    reply = await immediate_reply(fake, late)
    assert "restarting" in reply.content
    assert len(bot.jobs()) == 1


async def test_shutdown_cancels_and_refunds_a_job_past_the_grace(fake, make_bot):
    bot = await make_bot(generator=PreparedGenerator(delay_s=5.0))
    await fake.send_slash_command("imagine", {"prompt": "an endless night"})
    await eventually(lambda: bot.jobs() and bot.jobs()[0].status == "running", what="the job to run")

    started = time.monotonic()
    await bot.client.delivery.shutdown(grace_s=0.1)
    assert time.monotonic() - started < 2
    [job] = bot.jobs()
    assert (job.status, job.error_code, job.cost_micros) == ("cancelled", "cancelled", 0)
    [(state, charged)] = bot.app.db.query("SELECT state, charged_micros FROM reservations")
    assert (state, charged) == ("released", 0)
    assert_nothing_charged(bot, fake.user)
    assert bot.available(fake.user.id) == ALLOWANCE_MICROS


async def test_a_member_whose_job_shutdown_cancelled_is_told(fake, make_bot):
    """Not left at "Generating..." forever."""
    bot = await make_bot(generator=PreparedGenerator(delay_s=5.0))
    interaction = await fake.send_slash_command("imagine", {"prompt": "an endless night"})
    await eventually(lambda: bot.jobs() and bot.jobs()[0].status == "running", what="the job to run")
    await bot.client.delivery.shutdown(grace_s=0.1)

    def told() -> bool:
        texts = [fake.message(i).content for i in interaction.followup_message_ids]
        if not is_deleted(fake, interaction.original_message_id):
            texts.append(original(fake, interaction).content)
        return any("Nothing was charged" in t for t in texts)

    await eventually(told, timeout=2, what="a word that the job was cancelled")
    assert bot.jobs()[0].status == "cancelled"


# ---- the real `easel run` process -------------------------------------------------------------------

_SCRIPT = Path(sys.executable).with_name("easel")
EASEL = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "bot.cli"]
INTENTS = 1 | 1 << 10  # guilds and guild reactions


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """The local tiny model, built once (seconds) and copied into each data folder that needs it."""
    folder = tmp_path_factory.mktemp("tiny") / "tiny"
    build = "import sys, pathlib; from generators.tiny import build_tiny_pipeline; " \
            "build_tiny_pipeline(pathlib.Path(sys.argv[1]))"
    result = subprocess.run([sys.executable, "-c", build, str(folder)], cwd=ROOT, env=process_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return folder


def process_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("EASEL_CONFIG", "DISCORD_API_BASE", "DISCORD_GATEWAY_URL", "DISCORD_TOKEN")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", **extra)
    return env


class EaselProcess:
    """`easel run` in a subprocess, its stderr in a file for failure messages."""

    def __init__(self, root: Path, env: dict[str, str]):
        self.root, self.env = root, env
        self.log = root / "stderr.log"
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        with self.log.open("wb") as log:
            self.proc = await asyncio.create_subprocess_exec(
                *EASEL, "--config", str(self.root / "easel.toml"), "run", cwd=self.root,
                env=self.env, stdout=asyncio.subprocess.DEVNULL, stderr=log)

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    async def stop(self, timeout: float) -> int:
        """SIGTERM; the exit status, or AssertionError (after a kill) if it takes longer."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
            raise AssertionError(f"easel run did not exit within {timeout}s of SIGTERM\n{self.stderr()}")

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


@pytest.fixture
async def easel_process(fake: FakeDiscord, tmp_path):
    started: list[EaselProcess] = []

    async def start(root: Path, **env: str) -> EaselProcess:
        process = EaselProcess(root, process_env(DISCORD_TOKEN=fake.token, **env))
        started.append(process)
        await process.start()
        return process

    yield start
    for process in started:
        await process.kill()


def write_workspace(root: Path) -> Path:
    write_workspace_config(root, discord={"progress_interval_s": 1.0})
    return root


async def test_easel_run_serves_an_imagine_and_stops_on_sigterm(fake, easel_process, tmp_path, tiny_model):
    root = write_workspace(tmp_path / "ws")
    shutil.copytree(tiny_model, root / "data" / "models" / "tiny")
    easel = await easel_process(root, DISCORD_API_BASE=fake.api_base, DISCORD_GATEWAY_URL=fake.gateway_url)

    try:
        await fake.wait_ready(timeout=60)
    except TimeoutError:
        raise AssertionError(f"easel run never identified\n{easel.stderr()}") from None
    assert fake.identify_payload["intents"] == INTENTS
    assert sorted(c["name"] for c in fake.commands() if c["type"] == 1) == [
        "budget", "edit", "gallery", "help", "imagine", "moderation", "queue", "settings", "tips", "upscale", "usage",
        "variation"]
    assert not [r for r in fake.requests if r.path.endswith("/gateway/bot")]  # it was given the gateway

    interaction = await fake.send_slash_command("imagine", {"prompt": "a lighthouse --ar 1:1"})
    ack = await fake.wait_for_ack(interaction)
    assert (ack.status, ack.json["type"]) == (200, 5), easel.stderr()
    try:
        message = await result_of(fake, interaction, timeout=120)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{easel.stderr()}") from None
    [attachment] = message.attachments
    assert decoded(attachment.data).size == (512, 512) and attachment.filename.endswith(".png")
    fields = embed_fields(message)
    assert fields["Model"] == "tiny (local)" and fields["Size"] == "512\u00d7512"
    assert not is_deleted(fake, message.id)

    started = time.monotonic()
    assert await easel.stop(timeout=20) == 0, easel.stderr()
    assert time.monotonic() - started < 10
    assert await fake.wait_gateway_closed() in (1000, 4000)
    stored = list((root / "data" / "images").rglob("*.png"))
    assert [p.read_bytes() for p in stored] == [attachment.data]
    assert fake.token not in easel.stderr()  # the log never shows the token


async def test_easel_run_given_only_the_api_base_asks_it_for_the_gateway(fake, easel_process, tmp_path):
    root = write_workspace(tmp_path / "ws")
    easel = await easel_process(root, DISCORD_API_BASE=fake.api_base)
    try:
        await fake.wait_ready(timeout=60)
    except TimeoutError:
        raise AssertionError(f"easel run never identified\n{easel.stderr()}") from None
    [ask] = [r for r in fake.requests if r.path == "/api/v10/gateway/bot"]
    assert (ask.method, ask.status, ask.authorized) == ("GET", 200, True)
    assert fake.identify_payload["intents"] == INTENTS
    await fake.wait_for_request(lambda r: r.method == "PUT" and r.path.endswith("/commands"), timeout=30)

    # The operator's endpoints on the bot's own HTTP server.
    import json
    import tomllib
    import urllib.request

    port = tomllib.loads((root / "easel.toml").read_text())["server"]["port"]

    def get(path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as answer:
                return answer.status, answer.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    async def readiness() -> dict:
        status, body = await asyncio.to_thread(get, "/readyz")
        return json.loads(body) | {"status": status}

    ready = await readiness()  # connected and waiting for the guilds to arrive, or ready already
    for _ in range(50):
        if ready["ready"]:
            break
        await asyncio.sleep(0.2)
        ready = await readiness()
    assert ready["status"] == 200 and ready["checks"]["discord"] == {"ok": True, "detail": "connected"}, ready
    status, body = await asyncio.to_thread(get, "/metrics")
    assert status == 200 and b"easel_discord_ack_seconds_count" in body

    # SIGHUP: what can change without a restart is applied and said; a bad file changes nothing.
    with (root / "easel.toml").open("a") as config:
        config.write("\n[budget]\ndefault_allowance_usd = 7.5\n")
    easel.proc.send_signal(signal.SIGHUP)
    await eventually(lambda: "settings reloaded" in easel.stderr(), timeout=10, what="a reload")
    assert "budget.default_allowance_usd" in easel.stderr()
    with (root / "easel.toml").open("a") as config:
        config.write("\n[budgett]\n")
    easel.proc.send_signal(signal.SIGHUP)
    await eventually(lambda: "settings not reloaded" in easel.stderr(), timeout=10, what="a refused reload")
    assert "budgett" in easel.stderr() and easel.proc.returncode is None

    assert fake.token not in easel.stderr()
    assert await easel.stop(timeout=20) == 0, easel.stderr()


# ---- prompts: tips for short prompts, enhancement ---------------------------------------------

async def test_a_short_prompt_gets_one_private_tip_a_day_and_a_server_can_switch_tips_off(fake, make_bot, bob):
    bot = await make_bot({"prompts": {"tip_under_words": 4}})
    first = await fake.send_slash_command("imagine", {"prompt": "a kite"})
    await result_of(fake, first, bot=bot)
    [tip] = await eventually(lambda: [fake.message(i) for i in first.followup_message_ids] or None,
                             what="a tip")
    assert tip.content.startswith("\U0001f4a1 Tip: short prompts") and tip.flags & EPHEMERAL
    again = await fake.send_slash_command("imagine", {"prompt": "a boat"})
    await result_of(fake, again, bot=bot)
    long = await fake.send_slash_command("imagine", {"prompt": "a red kite over green hills at dawn"}, user=bob)
    await result_of(fake, long, bot=bot)

    reply = await immediate_reply(fake, await fake.send_slash_command("tips", {"on": False}, user=fake.owner))
    assert "off" in reply.content
    short = await fake.send_slash_command("imagine", {"prompt": "a kite"}, user=bob)
    await result_of(fake, short, bot=bot)
    await asyncio.sleep(0.3)
    assert again.followup_message_ids == [] and long.followup_message_ids == [] and short.followup_message_ids == []


@pytest.fixture
async def chat(monkeypatch):
    async with FakeOpenAI(api_key="sk-chat-test") as fake_chat:
        monkeypatch.setenv("EASEL_CHAT_KEY", fake_chat.api_key)
        yield fake_chat


def enhance_config(chat) -> dict:
    return {"enhance": {"model": "gpt-4o-mini", "base_url": f"{chat.base_url}/v1", "api_key_env": "EASEL_CHAT_KEY"}}


async def test_imagine_with_enhance_shows_the_enhanced_and_the_typed_prompt(fake, make_bot, chat):
    bot = await make_bot(enhance_config(chat))
    _, message = await imagine_result(bot, {"prompt": "a kite --seed 3", "enhance": True})
    [job] = bot.jobs()
    assert (job.prompt, job.original_prompt) == ("a kite" + chat.enhancement, "a kite")
    assert bot.generator.calls[0].prompt == job.prompt
    assert message.embeds[0]["description"] == job.prompt
    assert embed_fields(message)["Typed prompt (enhanced above)"] == "a kite"
    assert f"easel:enhance:{job.id}" not in button_ids(message)  # already enhanced


async def test_the_enhance_button_redraws_the_same_seed_with_the_enhanced_prompt(fake, make_bot, chat, bob):
    bot = await make_bot(enhance_config(chat))
    _, result = await imagine_result(bot, {"prompt": "a lighthouse --seed 11"})
    [source] = bot.jobs()
    assert f"easel:enhance:{source.id}" in button_ids(result)
    click = await fake.send_component_interaction(result.id, f"easel:enhance:{source.id}", user=bob)
    await result_of(fake, click, bot=bot)
    job = bot.jobs()[-1]
    assert (job.user_id, job.seed, job.original_prompt) == (str(bob.id), 11, "a lighthouse")
    assert job.prompt == "a lighthouse" + chat.enhancement and bot.generator.calls[-1].seed == 11


async def test_without_an_enhancer_the_enhance_button_is_not_offered_and_settings_refuse_it(fake, make_bot):
    bot = await make_bot()
    _, result = await imagine_result(bot, {"prompt": "a lighthouse"})
    assert not any(":enhance:" in b for b in button_ids(result))
    interaction = await fake.send_slash_command("settings", {"enhance": True})
    reply = await immediate_reply(fake, interaction)
    assert "not set up" in reply.content
    assert bot.app.preferences.user(str(fake.user.id)).enhance is False


async def test_acknowledgements_are_timed_for_the_metrics(fake, make_bot, bob):
    bot = await make_bot()
    await imagine_result(bot, {"prompt": "a kite"})
    _, result = await imagine_result(bot, {"prompt": "a boat"})
    [_, source] = bot.jobs()
    click = await fake.send_component_interaction(result.id, f"easel:reroll:{source.id}", user=bob)
    await result_of(fake, click, bot=bot)
    registry = bot.app.metrics.registry
    assert registry.get_sample_value("easel_discord_ack_seconds_count") == 3
    assert 0 <= registry.get_sample_value("easel_discord_ack_seconds_sum") < 3 * 5


async def test_the_zoom_out_button_outpaints_around_the_original(fake, make_bot, bob):
    bot = await make_bot()
    _, result = await imagine_result(bot, {"prompt": "a glass city"})
    [source] = bot.jobs()
    assert f"easel:zoom:{source.id}" in button_ids(result) and f"easel:left:{source.id}" in button_ids(result)
    click = await fake.send_component_interaction(result.id, f"easel:zoom:{source.id}", user=bob)
    message = await result_of(fake, click, bot=bot)
    job = bot.jobs()[-1]
    assert (job.kind, job.outpaint, job.source_job_id, job.user_id) == ("edit", "zoom", source.id, str(bob.id))
    assert embed_fields(message)["Size"] == "1024\u00d71024"
    zoomed = decoded(bot.app.blobs.get(job.sha256)).convert("RGB")
    original = decoded(bot.app.blobs.get(source.sha256)).convert("RGB")
    assert zoomed.crop((256, 256, 768, 768)).tobytes() == original.tobytes()  # the original, exactly



async def test_admins_see_the_moderation_log_of_their_server(fake, make_bot, bob):
    await make_bot({"moderation": {"log_prompts": True}})
    blocked = await fake.send_slash_command("imagine", {"prompt": "a gory battlefield"}, user=bob)
    assert "Not allowed" in await refusal_of(fake, blocked)
    reply = await immediate_reply(fake, await fake.send_slash_command("moderation log", {}, user=fake.owner))
    lines = reply.content.splitlines()
    assert lines[0] == "**Blocked requests** (newest first, 1)"
    assert f"<@{bob.id}> \u00b7 prompt \u00b7 `gore`" in lines[1] and "||a gory battlefield||" in lines[1]
    refused = await fake.send_slash_command("moderation log", {}, user=bob)
    assert (await immediate_reply(fake, refused)).content == "\U0001f512 only admins can see the moderation log"


class SpoilerInAgeRestricted:
    """Passes every image; in an age-restricted channel, as a spoiler (a channel policy's verdict)."""

    def screen_image(self, image, *, nsfw_channel=False):
        from bot.core.models import ALLOWED, Verdict

        return Verdict(True, rule="nudity", reason="spoiler", score=0.8) if nsfw_channel else ALLOWED

    def unavailable_reason(self):
        return None


async def test_an_age_restricted_channels_spoiler_policy_posts_the_image_as_a_spoiler(fake, make_bot):
    bot = await make_bot(image_screen=SpoilerInAgeRestricted())
    _, plain = await imagine_result(bot, {"prompt": "a beach"})
    spoiled = await fake.send_slash_command("imagine", {"prompt": "a beach"}, channel=fake.nsfw_channel)
    message = await result_of(fake, spoiled, bot=bot)
    assert plain.attachments[0].filename.startswith("easel-")
    assert message.attachments[0].filename.startswith("SPOILER_easel-")
    assert [j.spoiler for j in bot.jobs()] == [False, True]


async def test_admins_hear_once_when_a_member_is_cooled_down(fake, make_bot, bob):
    bot = await make_bot({"moderation": {"cooldown_after": 2},
                          "discord": {"admin_channel": str(fake.nsfw_channel.id)}})
    for prompt in ("a gory battlefield", "more gore", "a lighthouse"):
        interaction = await fake.send_slash_command("imagine", {"prompt": prompt}, user=bob)
        await refusal_of(fake, interaction)

    def notes():
        return [m for m in fake.messages(fake.nsfw_channel) if "requests blocked" in (m.content or "")]

    [note] = await eventually(lambda: notes() or None, what="a note to the admins")
    assert f"<@{bob.id}> had 2 requests blocked" in note.content and "`gore`" in note.content
    await asyncio.sleep(0.3)
    assert len(notes()) == 1  # the third, cooled-down request adds no second note
    assert [j.status for j in bot.jobs()] == ["blocked", "blocked"]  # the cooled one made no job


# ---- budgets: roles, limits with their reset time, blocks, spend alerts ---------------------------


async def test_a_roles_allowance_applies_to_its_members(fake, make_bot):
    await make_bot()
    moderators = next(r for r in fake.guild.roles.values() if r.name == "Moderator")
    text = await budget(fake, "allowance set", {"amount": 3.0, "role": moderators})
    assert text.startswith("Done; it applies from the next refill") and f"<@&{moderators.id}> $3.0000" in text
    usage = await immediate_reply(fake, await fake.send_slash_command("usage", {}, user=fake.moderator))
    assert "**Available** $3.0000" in usage.content and "**Allowance** $3.0000 per month" in usage.content
    usage = await immediate_reply(fake, await fake.send_slash_command("usage", {}, user=fake.user))
    assert "**Available** $1.0000" in usage.content  # no role: the default
    text = await budget(fake, "exempt", {"on": True, "role": moderators})
    assert text == f"<@&{moderators.id}> is now exempt from limits."
    shown = await budget(fake, "allowance show")
    assert f"**Exempt from limits** <@&{moderators.id}>" in shown


async def test_a_rate_limit_says_when_it_lifts(fake, make_bot):
    bot = await make_bot({"budget": {"user_images_per_hour": 1}})
    await imagine_result(bot, {"prompt": "a kite"})
    text = await refusal_of(fake, await fake.send_slash_command("imagine", {"prompt": "a second kite"}))
    first = bot.jobs()[0]
    assert text == (f"\u23f3 you have made 1 image in the last hour, the limit. "
                    f"It lifts <t:{int(first.created_at + 3600)}:R>."), text
    assert bot.jobs()[-1].error_code == "rate_limited" and bot.held() == []


async def test_a_blocked_member_is_refused_and_admins_see_why(fake, make_bot, bob):
    bot = await make_bot()
    assert "Blocked them" in await budget(fake, "block", {"user": bob, "reason": "spam in #general"})
    text = await refusal_of(fake, await fake.send_slash_command("imagine", {"prompt": "a dog"}, user=bob))
    assert text == "\U0001f6ab an admin has blocked you from generating images.", text
    assert "spam" not in text
    assert "**Blocked**: spam in #general" in await budget(fake, "show", {"user": bob})
    await budget(fake, "unblock", {"user": bob})
    await imagine_result(bot, {"prompt": "a dog"}, user=bob)


async def test_spend_alerts_reach_the_admin_channel_once_per_threshold(fake, make_bot):
    bot = await make_bot({"budget": {"daily_spend_cap_usd": 0.02},
                          "discord": {"admin_channel": str(fake.nsfw_channel.id)}})

    def alerts():
        return [m.content for m in fake.messages(fake.nsfw_channel) if "spend alert" in (m.content or "")]

    await imagine_result(bot, {"prompt": "a first coin"})  # $0.01 of $0.02: 50%
    [half] = await eventually(lambda: alerts() or None, what="the 50% alert")
    assert "at 50% of its cap ($0.0100 of $0.0200; passed 50%)" in half
    await imagine_result(bot, {"prompt": "a second coin"})  # 100%: the 80% is passed with it
    await eventually(lambda: len(alerts()) == 2 or None, what="the 100% alert")
    assert "passed 100%" in alerts()[1]
    text = await refusal_of(fake, await fake.send_slash_command("imagine", {"prompt": "a third coin"}))
    assert "daily spending cap of $0.0200 is reached. It lifts <t:" in text, text
    await asyncio.sleep(0.3)
    assert len(alerts()) == 2


async def test_imagine_takes_loras_and_a_controlnet_with_its_image(fake, make_bot):
    bot = await make_bot(generator=PreparedGenerator(loras=("watercolor", "ink"), controlnets=("canny",)))
    edges = fake.add_attachment("edges.png", png_bytes(128, 128, seed=4), "image/png")
    await imagine_result(bot, {"prompt": "a heron", "lora": "watercolor:0.7, ink", "control": "canny",
                               "control_image": edges, "control_scale": 0.6})
    [call] = bot.generator.calls
    assert dict(call.params.options) == {"lora": "watercolor:0.7, ink", "control": "canny", "control_scale": "0.6"}
    assert decoded(call.control_image).size == (128, 128) and call.source_image is None
    [job] = bot.jobs()
    assert job.options["lora"] == "watercolor:0.7, ink" and job.source_sha256  # the control image is kept
    refused = await fake.send_slash_command("imagine", {"prompt": "a heron", "lora": "oils"})
    text = await refusal_of(fake, refused)
    assert "oils" in text and len(bot.generator.calls) == 1 and bot.held() == []


async def test_an_earlier_result_can_be_the_control_image(fake, make_bot, bob):
    bot = await make_bot(generator=PreparedGenerator(controlnets=("canny",)))
    await imagine_result(bot, {"prompt": "a heron"})
    [first] = bot.jobs()
    await imagine_result(bot, {"prompt": "a heron in ink", "control": "canny", "control_job": str(first.id)})
    call = bot.generator.calls[-1]
    assert pixels(call.control_image) == pixels(bot.app.blobs.get(first.sha256))
    second = bot.jobs()[-1]
    assert second.source_job_id == first.id and second.source_sha256
    await bot.app.results.delivered(first.id, None)  # no longer posted publicly: bob may not use it
    refused = await fake.send_slash_command("imagine", {"prompt": "mine", "control": "canny",
                                                        "control_job": str(first.id)}, user=bob)
    assert f"no job {first.id}" in await refusal_of(fake, refused)
    text = await refusal_of(fake, await fake.send_slash_command(
        "imagine", {"prompt": "no control", "control_job": str(first.id)}))
    assert "give control too" in text
