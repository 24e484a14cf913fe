"""Discord at scale: `discord.shards = "auto"` runs an AutoShardedClient with Discord's recommended
count; a fixed count with `shard_ids` lets several processes split the guilds. Against the fake
Discord, which deals each guild to shard (guild_id >> 22) % count, as Discord does."""
from __future__ import annotations

import asyncio
import time

import discord
import pytest

from bot.config import ConfigError, settings_from_dict
from bot.discord.client import EaselClient, ShardedEaselClient, make_client
from tests.discord_helpers import result_of, settings_data
from tests.fakes.generators import PreparedGenerator
from tests.helpers import start_app


@pytest.fixture
def guilds(fake):
    """Guilds on both of two shards (snowflakes carry the time, so add until both have one), each
    with a channel and alice as a member."""
    found = {fake.shard_of(fake.guild.id, 2): fake.guild}
    n = 0
    while len(found) < 2 or n < 3:
        n += 1
        guild = fake.add_guild(f"guild {n}")
        fake.add_channel(guild, "general")
        fake.add_member(guild, fake.user)
        found.setdefault(fake.shard_of(guild.id, 2), guild)
        time.sleep(0.002)
    return found


async def _start(fake, tmp_path, discord_settings):
    config = settings_data(tmp_path, {"discord": discord_settings})
    app = start_app(settings_from_dict(config), generators=[PreparedGenerator()])
    client = make_client(app, app.settings.discord, guild_ready_timeout=0.05)
    await client.login(fake.token)
    runner = asyncio.create_task(client.connect(reconnect=False))
    await asyncio.wait_for(client.wait_until_ready(), 15)
    return app, client, runner


async def _stop(app, client, runner):
    await client.close()
    await asyncio.gather(runner, return_exceptions=True)
    await app.close()


async def test_auto_asks_gateway_bot_and_runs_the_recommended_shards(fake, guilds, tmp_path):
    fake.recommended_shards, fake.max_concurrency = 2, 2
    app, client, runner = await _start(fake, tmp_path, {"shards": "auto"})
    try:
        assert isinstance(client, discord.AutoShardedClient) and client.shard_count == 2
        assert sorted(fake.identified_shards) == [[0, 2], [1, 2]]
        assert {g.id for g in client.guilds} == set(fake.guilds)
        for guild in client.guilds:
            assert guild.shard_id == fake.shard_of(guild.id, 2)
        # A command in a guild of the second shard arrives on that shard's connection and is served.
        channel = next(iter(guilds[1].channels.values()))
        interaction = await fake.send_slash_command("imagine", {"prompt": "a lighthouse at dusk"},
                                                    channel=channel)
        message = await result_of(fake, interaction)
        assert message.attachments
    finally:
        await _stop(app, client, runner)


async def test_a_fixed_count_with_shard_ids_splits_the_guilds_between_processes(fake, guilds, tmp_path):
    fake.max_concurrency = 2
    first = await _start(fake, tmp_path / "a", {"shards": 2, "shard_ids": [0]})
    second = await _start(fake, tmp_path / "b", {"shards": 2, "shard_ids": [1]})
    try:
        for (_, client, _), shard in ((first, 0), (second, 1)):
            assert client.shard_ids == [shard]
            assert {g.id for g in client.guilds} == {g for g in fake.guilds if fake.shard_of(g, 2) == shard}
        assert sorted(fake.identified_shards) == [[0, 2], [1, 2]]
    finally:
        await _stop(*second)
        await _stop(*first)


async def test_no_sharding_by_default(fake, tmp_path):
    app, client, runner = await _start(fake, tmp_path, {})
    try:
        assert type(client) is EaselClient and not isinstance(client, ShardedEaselClient)
        assert fake.identified_shards == [] and "shard" not in (fake.identify_payload or {})
    finally:
        await _stop(app, client, runner)


@pytest.mark.parametrize("discord_settings, message", [
    ({"shards": "many"}, "'discord.shards' must be \"auto\" or a number of shards"),
    ({"shards": -1}, "'discord.shards' must be"),
    ({"shards": "auto", "shard_ids": [0]}, "'discord.shard_ids' needs discord.shards set to a number"),
    ({"shards": 2, "shard_ids": [2]}, "'discord.shard_ids' must be distinct shard numbers from 0 to 1"),
    ({"shards": 2, "shard_ids": [1, 1]}, "'discord.shard_ids' must be distinct"),
])
def test_bad_shard_settings_are_refused_naming_the_key(discord_settings, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        settings_from_dict({"discord": discord_settings})
