"""The fake Discord in tests/fakes/discord_server.py, driven by a real discord.py client.

The probe bot below does what easel does - slash commands with attachment options, deferred
responses edited with a file and an embed, followups, channel messages with reactions, and a
persistent button view - so a fake that drifts from what discord.py needs fails here first.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from PIL import Image

discord = pytest.importorskip("discord")
from discord import app_commands  # noqa: E402

from tests.fakes.discord_server import EPHEMERAL, FakeDiscord  # noqa: E402

RETRY_BUTTON = {"type": 2, "style": 1, "label": "Retry", "custom_id": "easel:retry"}
RETRY_ROW = [{"type": 1, "components": [RETRY_BUTTON]}]


def _png(colour: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 6), colour).save(buffer, "PNG")
    return buffer.getvalue()


RESULT_PNG = _png("red")


class RetryView(discord.ui.View):
    def __init__(self, clicks: list[int]) -> None:
        super().__init__(timeout=None)
        self.clicks = clicks

    @discord.ui.button(label="Retry", custom_id="easel:retry")
    async def retry(self, interaction: discord.Interaction, button: discord.ui.Button) -> None:
        self.clicks.append(interaction.user.id)
        await interaction.response.edit_message(content="retrying")


class ProbeBot(discord.Client):
    def __init__(self, guild_id: int) -> None:
        intents = discord.Intents.none()
        intents.guilds = True
        intents.guild_reactions = True
        super().__init__(intents=intents, guild_ready_timeout=0.05)
        self.tree = app_commands.CommandTree(self)
        self.outcomes: asyncio.Queue[Any] = asyncio.Queue()  # what handlers saw, or the errors they hit
        self.reactions: asyncio.Queue[discord.RawReactionActionEvent] = asyncio.Queue()
        self.clicks: list[int] = []
        self.release_slow = asyncio.Event()

        @self.tree.command(description="Generate an image")
        async def imagine(
            interaction: discord.Interaction, prompt: str, image: discord.Attachment | None = None
        ) -> None:
            await interaction.response.defer(thinking=True)
            source = await image.read() if image else b""
            embed = discord.Embed(title="Result", description=prompt)
            embed.add_field(name="seed", value="42", inline=False)
            embed.set_image(url="attachment://result.png")
            result = discord.File(io.BytesIO(RESULT_PNG), "result.png")
            await interaction.edit_original_response(
                content=f"done: {prompt}", embed=embed, attachments=[result]
            )
            await interaction.followup.send("more options", ephemeral=True)
            posted = await interaction.channel.send("vote here")
            await posted.add_reaction("👍")
            await self.outcomes.put((prompt, source))

        @self.tree.command(description="Defer privately, then answer with two followups")
        async def think(interaction: discord.Interaction) -> None:
            await interaction.response.defer(ephemeral=True, thinking=True)
            first = await interaction.followup.send("first", wait=True)
            second = await interaction.followup.send("second", wait=True)
            await self.outcomes.put((first.id, second.id))

        @self.tree.command(description="Say whether this channel is age-restricted")
        async def where(interaction: discord.Interaction) -> None:
            await interaction.response.send_message(f"nsfw={interaction.channel.is_nsfw()}")

        @self.tree.command(description="Defer, then edit once released")
        async def slow(interaction: discord.Interaction) -> None:
            await interaction.response.defer()
            await self.release_slow.wait()
            try:
                await interaction.edit_original_response(content="finally")
            except discord.HTTPException as error:
                await self.outcomes.put(error)

        @self.tree.command(description="Answer after the acknowledgement window")
        async def late(interaction: discord.Interaction) -> None:
            await asyncio.sleep(0.3)
            try:
                await interaction.response.send_message("too late")
            except discord.HTTPException as error:
                await self.outcomes.put(error)

        @self.tree.command(description="Guild-only ping", guild=discord.Object(guild_id))
        async def ping(interaction: discord.Interaction) -> None:
            await interaction.response.send_message("pong")

        admin = app_commands.Group(name="admin", description="Moderation")

        @admin.command(description="Ban a member")
        async def ban(
            interaction: discord.Interaction,
            member: discord.Member,
            days: app_commands.Range[int, 0, 7] = 0,
        ) -> None:
            kind = type(member).__name__
            await interaction.response.send_message(f"banned {member.id} ({kind}) for {days} days")

        @admin.command(description="Restrict a channel to a role")
        async def lock(
            interaction: discord.Interaction, channel: discord.TextChannel, role: discord.Role
        ) -> None:
            reply = f"locked {channel.id} (nsfw={channel.nsfw}) to {role.name}"
            await interaction.response.send_message(reply)

        self.tree.add_command(admin)

        @self.tree.error
        async def on_command_error(interaction: discord.Interaction, error: Exception) -> None:
            await self.outcomes.put(error)

    async def setup_hook(self) -> None:
        self.add_view(RetryView(self.clicks))

    async def on_raw_reaction_add(self, payload: discord.RawReactionActionEvent) -> None:
        await self.reactions.put(payload)


class Listener(discord.Client):
    """Records gateway events, to see which ones the identified intents let through."""

    def __init__(self, intents: discord.Intents) -> None:
        super().__init__(intents=intents, guild_ready_timeout=0.05)
        self.events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

    async def on_message(self, message: discord.Message) -> None:
        await self.events.put(("message", message))

    async def on_raw_reaction_add(self, payload: discord.RawReactionActionEvent) -> None:
        await self.events.put(("reaction", payload))


async def _connect(fake: FakeDiscord, client: discord.Client) -> asyncio.Task[None]:
    """Log in and connect; returns the task running the gateway connection."""
    await client.login(fake.token)
    runner = asyncio.create_task(client.connect(reconnect=False))
    await asyncio.wait_for(client.wait_until_ready(), 5)
    return runner


async def _next(queue: asyncio.Queue[Any]) -> Any:
    return await asyncio.wait_for(queue.get(), 5)


@pytest.fixture
async def bot(fake: FakeDiscord) -> AsyncIterator[ProbeBot]:
    bot = ProbeBot(fake.guild.id)
    runner = await _connect(fake, bot)
    await bot.tree.sync()
    await bot.tree.sync(guild=discord.Object(fake.guild.id))
    yield bot
    await bot.close()
    await asyncio.wait_for(runner, 5)


async def test_bot_logs_in_caches_the_guild_and_syncs_commands(fake: FakeDiscord, bot: ProbeBot) -> None:
    assert bot.user.id == fake.bot_user.id
    assert bot.application_id == fake.application_id
    guild = bot.get_guild(fake.guild.id)
    assert guild is not None and guild.name == fake.guild.name
    assert guild.get_channel(fake.nsfw_channel.id).is_nsfw()
    assert not guild.get_channel(fake.channel.id).is_nsfw()
    assert fake.identify_payload["intents"] == bot.intents.value
    assert "token" not in fake.identify_payload

    global_commands = {c["name"]: c for c in fake.commands()}
    assert sorted(global_commands) == ["admin", "imagine", "late", "slow", "think", "where"]
    imagine = global_commands["imagine"]
    imagine_options = [(o["name"], o["type"], o.get("required", False)) for o in imagine["options"]]
    assert imagine_options == [("prompt", 3, True), ("image", 11, False)]
    assert [c["name"] for c in fake.commands(fake.guild)] == ["ping"]

    resynced = await bot.tree.sync()  # a bulk overwrite keeps command ids, as on Discord
    assert {c.name: c.id for c in resynced} == {n: int(c["id"]) for n, c in global_commands.items()}
    command_requests = [r for r in fake.requests if "/commands" in r.path]
    assert [r.method for r in command_requests] == ["PUT", "PUT", "PUT"]
    assert all(r.authorized and r.status == 200 for r in command_requests)
    assert fake.unmatched_requests == []


async def test_deferred_command_is_edited_with_file_and_embed_then_followed_up(
    fake: FakeDiscord, bot: ProbeBot
) -> None:
    sketch = _png("blue")
    upload = fake.add_attachment("sketch.png", sketch, "image/png")
    interaction = await fake.send_slash_command("imagine", {"prompt": "a red fox", "image": upload})

    ack = await fake.wait_for_ack(interaction)
    assert (ack.status, ack.json) == (200, {"type": 5})
    assert 0 <= interaction.ack_latency < fake.ack_deadline
    # The bot downloaded the option's file from the fake.
    assert await _next(bot.outcomes) == ("a red fox", sketch)

    edit = next(r for r in interaction.requests if r.method == "PATCH")
    assert edit.path.endswith(f"/webhooks/{fake.application_id}/{interaction.token}/messages/@original")
    assert [(f.field, f.filename, f.data) for f in edit.files] == [
        ("files[0]", "result.png", RESULT_PNG)
    ]
    assert edit.received_at > ack.received_at

    original = fake.message(interaction.original_message_id)
    assert original.content == "done: a red fox" and not original.loading
    [attachment] = original.attachments
    assert attachment.filename == "result.png" and attachment.data == RESULT_PNG
    assert attachment.content_type == "image/png"
    assert (attachment.width, attachment.height) == (8, 6)
    [embed] = original.embeds
    assert (embed["title"], embed["description"]) == ("Result", "a red fox")
    assert embed["fields"] == [{"name": "seed", "value": "42", "inline": False}]
    assert embed["image"]["url"] == attachment.url

    later = [m for m in fake.messages(fake.channel) if m.id > original.id]
    assert [(m.content, m.ephemeral) for m in later] == [("more options", True), ("vote here", False)]
    assert later[1].reactions == {"👍": [fake.bot_user.id]}
    # Discord echoes the bot's own reaction over the gateway; a bot has to ignore it.
    own_reaction = await _next(bot.reactions)
    assert (own_reaction.user_id, own_reaction.message_id) == (fake.bot_user.id, later[1].id)
    assert str(own_reaction.emoji) == "👍"
    assert later[0].flags & EPHEMERAL


async def test_rest_fetches_edits_and_deletes(fake: FakeDiscord, bot: ProbeBot) -> None:
    channel = await bot.fetch_channel(fake.nsfw_channel.id)
    assert channel.is_nsfw()
    guild = await bot.fetch_guild(fake.guild.id)
    assert {role.name for role in guild.roles} >= {"@everyone", "Moderator"}
    member = await guild.fetch_member(fake.moderator.id)
    assert [role.name for role in member.roles if not role.is_default()] == ["Moderator"]

    sent = await channel.send("draft", file=discord.File(io.BytesIO(RESULT_PNG), "draft.png"))
    edited = await sent.edit(content="final", attachments=[])  # dropping the file, as Discord does
    assert (edited.content, edited.attachments) == ("final", [])
    fetched = await channel.fetch_message(sent.id)
    assert fetched.content == "final" and fetched.edited_at is not None
    assert [m.id async for m in channel.history(limit=5)] == [sent.id]
    await fetched.add_reaction("🎨")
    await fetched.remove_reaction("🎨", bot.user)
    assert fake.message(sent.id).reactions == {}
    await fetched.delete()
    assert fake.messages(fake.nsfw_channel) == []
    with pytest.raises(discord.NotFound) as gone:
        await channel.fetch_message(sent.id)
    assert gone.value.code == 10008


async def test_first_followup_after_a_deferral_replaces_the_thinking_message(
    fake: FakeDiscord, bot: ProbeBot
) -> None:
    interaction = await fake.send_slash_command("think")
    assert (await fake.wait_for_ack(interaction)).json == {"type": 5, "data": {"flags": EPHEMERAL}}

    first_id, second_id = await _next(bot.outcomes)
    assert first_id == interaction.original_message_id
    assert interaction.followup_message_ids == [second_id]
    first, second = fake.message(first_id), fake.message(second_id)
    # The first followup keeps the deferral's ephemerality; later ones are independent.
    assert (first.content, first.ephemeral, first.loading) == ("first", True, False)
    assert (second.content, second.ephemeral) == ("second", False)


async def test_immediate_replies_in_an_age_restricted_channel(fake: FakeDiscord, bot: ProbeBot) -> None:
    where = await fake.send_slash_command("where", channel=fake.nsfw_channel, user=fake.moderator)
    ack = await fake.wait_for_ack(where)
    assert ack.status == 200 and ack.json["type"] == 4
    assert ack.response_json["resource"]["message"]["content"] == "nsfw=True"

    ping = await fake.send_slash_command("ping", channel=fake.nsfw_channel)  # a guild command
    assert (await fake.wait_for_ack(ping)).status == 200
    assert ping.payload["data"]["guild_id"] == str(fake.guild.id)
    replies = fake.messages(fake.nsfw_channel)
    assert [(m.content, m.interaction_metadata["user"]["id"]) for m in replies] == [
        ("nsfw=True", str(fake.moderator.id)),
        ("pong", str(fake.user.id)),
    ]


async def test_subcommands_resolve_member_channel_and_role_options(
    fake: FakeDiscord, bot: ProbeBot
) -> None:
    ban = await fake.send_slash_command("admin ban", {"member": fake.user, "days": 3})
    ack = await fake.wait_for_ack(ban)
    assert ack.json["data"]["content"] == f"banned {fake.user.id} (Member) for 3 days"
    [subcommand] = ban.payload["data"]["options"]
    assert (subcommand["name"], subcommand["type"]) == ("ban", 1)

    [moderators] = [role for role in fake.guild.roles.values() if role.name == "Moderator"]
    options = {"channel": fake.nsfw_channel, "role": moderators}
    lock = await fake.send_slash_command("admin lock", options)
    ack = await fake.wait_for_ack(lock)
    assert ack.json["data"]["content"] == f"locked {fake.nsfw_channel.id} (nsfw=True) to Moderator"
    for refused in ("3", 8):  # a Discord client lets neither through
        with pytest.raises(ValueError, match="days"):
            await fake.send_slash_command("admin ban", {"member": fake.user, "days": refused})


async def test_user_reactions_reach_on_raw_reaction_add_with_the_member(
    fake: FakeDiscord, bot: ProbeBot
) -> None:
    message = await fake.add_message(fake.channel, author=fake.bot_user, content="a result")

    await fake.add_reaction(message.id, "❤️", user=fake.user)
    heart = await _next(bot.reactions)
    assert (heart.user_id, heart.channel_id, heart.guild_id, heart.message_id) == (
        fake.user.id,
        fake.channel.id,
        fake.guild.id,
        message.id,
    )
    assert heart.emoji.name == "❤️" and heart.emoji.id is None
    assert heart.member is not None and heart.member.id == fake.user.id
    assert heart.message_author_id == fake.bot_user.id

    await fake.add_reaction(message.id, "easel_star:123456789012345678", user=fake.moderator)
    star = await _next(bot.reactions)
    assert (star.emoji.name, star.emoji.id) == ("easel_star", 123456789012345678)
    assert star.user_id == fake.moderator.id
    assert fake.message(message.id).reactions == {
        "❤️": [fake.user.id],
        "easel_star:123456789012345678": [fake.moderator.id],
    }


async def test_button_click_reaches_the_persistent_view(fake: FakeDiscord, bot: ProbeBot) -> None:
    # A message posted before a restart: only the view registered with add_view can answer it.
    message = await fake.add_message(
        fake.channel, author=fake.bot_user, content="old result", components=RETRY_ROW
    )
    interaction = await fake.send_component_interaction(message.id, "easel:retry", user=fake.moderator)

    ack = await fake.wait_for_ack(interaction)
    assert (ack.status, ack.json["type"]) == (200, 7)
    assert bot.clicks == [fake.moderator.id]
    edited = fake.message(message.id)
    assert edited.content == "retrying" and edited.components == RETRY_ROW
    with pytest.raises(LookupError, match="easel:retry"):
        await fake.send_component_interaction(message.id, "easel:nope")


async def test_expired_token_makes_edit_original_response_fail(fake: FakeDiscord, bot: ProbeBot) -> None:
    interaction = await fake.send_slash_command("slow")
    assert (await fake.wait_for_ack(interaction)).status == 200

    fake.expire_interaction(interaction)
    bot.release_slow.set()
    error = await _next(bot.outcomes)
    assert isinstance(error, discord.HTTPException)
    assert (error.status, error.code) == (401, 50027)
    assert fake.message(interaction.original_message_id).loading


@pytest.mark.parametrize("lateness", ["past the deadline", "token expired"])
async def test_late_acknowledgement_fails_as_unknown_interaction(
    fake: FakeDiscord, bot: ProbeBot, lateness: str
) -> None:
    if lateness == "past the deadline":
        fake.ack_deadline = 0.1
    interaction = await fake.send_slash_command("late")
    if lateness == "token expired":
        fake.expire_interaction(interaction)

    error = await _next(bot.outcomes)
    assert isinstance(error, discord.NotFound)
    assert (error.status, error.code) == (404, 10062)
    assert interaction.callback is None and interaction.ack_latency is None
    assert fake.messages(fake.channel) == []


async def test_fake_answers_what_discord_would_refuse(fake: FakeDiscord, bot: ProbeBot) -> None:
    with pytest.raises(discord.NotFound) as missing_route:
        audit_log = discord.http.Route("GET", "/guilds/{guild_id}/audit-logs", guild_id=fake.guild.id)
        await bot.http.request(audit_log)
    error = missing_route.value
    assert (error.status, error.code, error.text) == (404, 0, "404: Not Found")
    assert [r.path for r in fake.unmatched_requests] == [f"/api/v10/guilds/{fake.guild.id}/audit-logs"]

    with pytest.raises(discord.HTTPException) as too_long:
        await bot.get_channel(fake.channel.id).send("x" * 2001)
    assert (too_long.value.status, too_long.value.code) == (400, 50035)
    assert "content" in too_long.value.text  # discord.py flattens Discord's field errors into the text

    fake.attachment_size_limit = 1000
    with pytest.raises(discord.HTTPException) as too_big:
        await bot.get_channel(fake.channel.id).send(file=discord.File(io.BytesIO(bytes(1001)), "a.bin"))
    assert (too_big.value.status, too_big.value.code) == (413, 40005)

    # Rules discord.py guards on its side too, so they are checked on the wire here.
    answered = await fake.send_slash_command("where")
    assert (await fake.wait_for_ack(answered)).status == 200
    unanswered = await fake.send_slash_command("late")  # answers only after 0.3 s
    async with aiohttp.ClientSession() as http:
        callback_url = f"{fake.api_base}/interactions/{answered.id}/{answered.token}/callback"
        async with http.post(callback_url, json={"type": 4, "data": {"content": "again"}}) as second_ack:
            assert (second_ack.status, (await second_ack.json())["code"]) == (400, 40060)
        followup_url = f"{fake.api_base}/webhooks/{fake.application_id}/{unanswered.token}?wait=1"
        async with http.post(followup_url, json={"content": "too early"}) as early_followup:
            assert (early_followup.status, (await early_followup.json())["code"]) == (404, 10015)
    assert (await fake.wait_for_ack(unanswered)).status == 200  # in time after all

    with pytest.raises(LookupError, match="not registered"):
        await fake.send_slash_command("nope")
    with pytest.raises(ValueError, match="prompt"):
        await fake.send_slash_command("imagine", {})


async def test_gateway_events_follow_the_identified_intents(fake: FakeDiscord) -> None:
    listener = Listener(discord.Intents(guilds=True, guild_messages=True))
    runner = await _connect(fake, listener)
    try:
        first = await fake.add_message(fake.channel, author=fake.user, content="a secret")
        await fake.add_reaction(first.id, "👍")  # no guild_reactions intent: not dispatched
        second = await fake.add_message(fake.channel, author=fake.user, content="another")
        events = [await _next(listener.events), await _next(listener.events)]
        assert [(kind, message.id) for kind, message in events] == [
            ("message", first.id),
            ("message", second.id),
        ]
        # Without the message_content intent, Discord blanks other users' messages.
        assert events[0][1].content == "" and events[0][1].author.id == fake.user.id
    finally:
        await listener.close()
        await asyncio.wait_for(runner, 5)


async def test_bot_closes_its_gateway_connection_cleanly(fake: FakeDiscord) -> None:
    bot = ProbeBot(fake.guild.id)
    runner = await _connect(fake, bot)
    await fake.wait_ready()

    await bot.close()
    await asyncio.wait_for(runner, 5)  # connect() returns without raising
    # A close frame, not a dropped socket (1006). Client.close() asks for 1000, but with aiohttp 3.14
    # its own reader task wakes first and closes with discord.py's default 4000.
    assert await fake.wait_gateway_closed() in (1000, 4000)
    with pytest.raises(RuntimeError, match="no bot is connected"):
        await fake.send_slash_command("where")
