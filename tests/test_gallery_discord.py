"""The gallery from Discord: the real EaselClient against the fake Discord (tests/fakes/
discord_server.py). A public result's embed links to its gallery page, which easel's HTTP app then
serves; /gallery mine answers with the member's page; /gallery delete gives the requester alone a
signed link that works on the HTTP app; /gallery hide is for the server's admins."""
from __future__ import annotations

import re
from urllib.parse import urlsplit

import pytest
from aiohttp.test_utils import TestClient, TestServer

discord = pytest.importorskip("discord")

from bot.http import make_http_app  # noqa: E402
from tests.discord_helpers import immediate_reply, result_of, settings_data, start_bot  # noqa: E402
from tests.fakes.discord_server import EPHEMERAL  # noqa: E402

PUBLIC_URL = "http://127.0.0.1:8080"  # settings_data's default storage.public_url


@pytest.fixture
async def bot(fake, tmp_path, monkeypatch):
    monkeypatch.delenv("EASEL_GALLERY_SECRET", raising=False)
    running = await start_bot(fake, config=settings_data(tmp_path))
    yield running
    if not running.client.is_closed():
        await running.close()


@pytest.fixture
async def web(bot):
    """easel's HTTP app beside the bot, on the same App (as `easel run` serves it)."""
    async with TestClient(TestServer(make_http_app(bot.app))) as client:
        yield client


async def imagine(bot, prompt: str, **kwargs):
    interaction = await bot.fake.send_slash_command("imagine", {"prompt": prompt}, **kwargs)
    message = await result_of(bot.fake, interaction, bot=bot)
    return message, bot.app.jobs.by_message(str(message.id))


def path_of(url: str) -> str:
    parts = urlsplit(url)
    return parts.path + (f"?{parts.query}" if parts.query else "")


async def test_a_public_results_embed_links_to_its_gallery_page(bot, web):
    message, job = await imagine(bot, "a lighthouse at dusk")
    [embed] = message.embeds
    assert embed["url"] == f"{PUBLIC_URL}/i/{job.sha256}"
    resp = await web.get(path_of(embed["url"]))
    text = await resp.text()
    assert resp.status == 200 and "a lighthouse at dusk" in text
    [slash] = [line for line in re.findall(r"<pre><code>(.*?)</code></pre>", text) if line.startswith("/")]
    assert slash.startswith("/imagine prompt:a lighthouse at dusk") and f" seed:{job.seed} model:fake-model" in slash


async def test_a_private_results_embed_links_to_the_image_not_to_a_page(bot, web, fake):
    await immediate_reply(fake, await fake.send_slash_command("settings", {"private": True}))
    message, job = await imagine(bot, "a secret garden")
    assert message.flags & EPHEMERAL
    [embed] = message.embeds
    assert embed["url"] == job.image_url
    assert (await web.get(f"/i/{job.sha256}")).status == 404
    assert job.sha256 not in await (await web.get(f"/u/{fake.user.id}")).text()


async def test_gallery_mine_answers_privately_with_the_members_page(bot, fake):
    reply = await immediate_reply(fake, await fake.send_slash_command("gallery mine"))
    assert f"{PUBLIC_URL}/u/{fake.user.id}" in reply.content
    assert f"{PUBLIC_URL}/g/{fake.guild.id}" in reply.content


async def test_gallery_delete_gives_only_the_requester_a_link_that_works(bot, web, fake):
    bob = fake.add_user("bob")
    fake.add_member(fake.guild, bob)
    _, job = await imagine(bot, "a castle on a hill")
    refusal = await immediate_reply(fake, await fake.send_slash_command("gallery delete", {"job": str(job.id)},
                                                                        user=bob))
    assert f"you have no job {job.id}" in refusal.content and "token=" not in refusal.content

    reply = await immediate_reply(fake, await fake.send_slash_command("gallery delete", {"job": str(job.id)}))
    link = re.search(r"(http\S+/delete/\d+\?token=\S+)", reply.content)[1]
    confirm = await web.get(path_of(link))
    assert confirm.status == 200 and "a castle on a hill" in await confirm.text()
    token = link.split("token=")[1]
    assert (await web.post(f"/delete/{job.id}", data={"token": token[:-1] + "x"})).status == 403
    assert (await web.get(f"/i/{job.sha256}")).status == 200
    assert (await web.post(f"/delete/{job.id}", data={"token": token})).status == 200
    assert (await web.get(f"/i/{job.sha256}")).status == 404


async def test_gallery_hide_is_for_the_servers_admins(bot, web, fake):
    _, job = await imagine(bot, "a windmill")
    refusal = await immediate_reply(fake, await fake.send_slash_command("gallery hide", {"job": str(job.id)}))
    assert "only a server's admins can hide" in refusal.content
    assert (await web.get(f"/i/{job.sha256}")).status == 200

    reply = await immediate_reply(fake, await fake.send_slash_command("gallery hide", {"job": str(job.id)},
                                                                      user=fake.owner))
    assert f"Job {job.id} is hidden" in reply.content
    assert (await web.get(f"/i/{job.sha256}")).status == 404
    row = bot.app.db.query_one("SELECT hidden_by FROM jobs WHERE id = ?", (job.id,))
    assert row[0] == f"discord:{fake.owner.id}"
