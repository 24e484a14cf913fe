"""Running the easel Discord bot in-process against the fake Discord, and reading what members see
(messages in the fake) and what easel recorded (jobs, ledger) - for tests/test_discord_bot.py."""
from __future__ import annotations

import asyncio
import copy
import io
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from PIL import Image

from bot.bootstrap import App
from bot.config import settings_from_dict
from bot.core.models import GeneratedImage, GenerationRequest, ModelSpec
from bot.discord.client import EaselClient
from moderation import NoImageScreen, Verdict
from tests.fakes.discord_server import EPHEMERAL, FakeDiscord, FakeInteraction, StoredMessage
from tests.fakes.generators import PreparedGenerator
from tests.helpers import start_app

T = TypeVar("T")
RESULT_REACTIONS = {"\U0001f501", "\U0001f3b2", "\u2b06\ufe0f", "\U0001f5d1\ufe0f"}
ACTIONS = ("subtle", "strong", "reroll", "upscale", "details", "delete", "zoom", "left", "right", "up",
           "down")  # three rows
PRICE_MICROS = 10_000  # PreparedGenerator's default price, $0.01
ALLOWANCE_MICROS = 1_000_000  # easel's default allowance, $1


async def eventually(check: Callable[[], T], timeout: float = 5.0, what: str = "the condition") -> T:
    """Poll `check` until it returns something truthy without raising; return that."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while True:
        try:
            value = check()
            if value:
                return value
        except (AssertionError, LookupError) as exc:
            last = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout}s (last: {last!r})")
        await asyncio.sleep(0.02)


@dataclass
class SteppingGenerator(PreparedGenerator):
    """Reports progress `steps` times, `step_s` apart (with `preview` before the last step, as
    the local generator does), before returning its prepared image."""

    steps: int = 10
    step_s: float = 0.1
    preview: bytes | None = None

    async def generate(self, request: GenerationRequest, progress=None) -> GeneratedImage:
        for i in range(1, self.steps + 1):
            await asyncio.sleep(self.step_s)
            if progress is not None:
                progress(i / self.steps, self.preview if i < self.steps else None)
        return await super().generate(request, progress)


@dataclass
class FixedSizeGenerator(PreparedGenerator):
    """A model that makes only square and 3:2 images (as some cloud models do)."""

    def models(self) -> list[ModelSpec]:
        [spec] = super().models()
        return [ModelSpec(name=spec.name, provider=spec.provider, kinds=spec.kinds,
                          sizes=((512, 512), (768, 512)), default_size=(512, 512))]


class NsfwChannelsOnlyScreen:
    """An image screen that finds every image unfit for a normal channel."""

    def screen_image(self, image: Image.Image, *, nsfw_channel: bool = False) -> Verdict:
        if nsfw_channel:
            return Verdict(allowed=True)
        return Verdict(allowed=False, rule="nudity", reason="nudity", score=0.9)

    def unavailable_reason(self) -> str | None:
        return None


def settings_data(tmp_path: Path, overrides: dict[str, dict[str, Any]] | None = None) -> dict:
    data: dict[str, dict[str, Any]] = {
        "storage": {"database": str(tmp_path / "easel.db"), "images_dir": str(tmp_path / "images")},
        "generation": {"default_model": "fake-model"},
        "discord": {"progress_interval_s": 1.0},
        "prompts": {"tip_under_words": 0},  # tips for short prompts are tested on their own
    }
    for table, values in (overrides or {}).items():
        data.setdefault(table, {}).update(values)
    return data


@dataclass
class RunningBot:
    """One easel App and EaselClient connected to the fake Discord."""

    fake: FakeDiscord
    app: App
    client: EaselClient
    generator: PreparedGenerator
    runner: asyncio.Task
    config: dict = field(repr=False)
    image_screen: Any = None
    queue_limit: int | None = None

    async def close(self) -> None:
        """As `easel run` stops: jobs still running are cancelled (and refunded) first."""
        await self.client.delivery.shutdown(grace_s=0)
        if not self.client.is_closed():
            await self.client.close()
        await asyncio.wait_for(asyncio.gather(self.runner, return_exceptions=True), 5)
        await self.app.close()

    async def restarted(self) -> RunningBot:
        """Close this bot and start a new App and client on the same database and images."""
        await self.close()
        return await start_bot(self.fake, config=self.config, generator=self.generator,
                               image_screen=self.image_screen, queue_limit=self.queue_limit)

    # ---- what easel recorded --------------------------------------------------------------

    def jobs(self) -> list:
        return list(reversed(self.app.jobs.list(limit=1000)))

    def charges(self, user_id: int | None = None) -> list[tuple[str, int, int]]:
        """(user, job, micros charged) for every charge in the ledger."""
        rows = self.app.db.query(
            "SELECT user_id, job_id, -amount_micros FROM ledger_entries WHERE kind IN ('charge', 'settle') ORDER BY id")
        return [tuple(r) for r in rows if user_id is None or r[0] == str(user_id)]

    def held(self) -> list[int]:
        return self.app.ledger.held_job_ids()

    def available(self, user_id: int) -> int:
        return self.app.ledger.balance(str(user_id)).available_micros


async def start_bot(fake: FakeDiscord, *, config: dict, generator: PreparedGenerator | None = None,
                    image_screen=None, queue_limit: int | None = None) -> RunningBot:
    generator = generator if generator is not None else PreparedGenerator()
    image_screen = image_screen if image_screen is not None else NoImageScreen()
    app = start_app(settings_from_dict(copy.deepcopy(config)), generators=[generator],
                    image_screen=image_screen,
                    queue_limits={"fake": queue_limit} if queue_limit is not None else None)
    client = EaselClient(app, app.settings.discord, guild_ready_timeout=0.05)
    await client.login(fake.token)
    runner = asyncio.create_task(client.connect(reconnect=False))
    await asyncio.wait_for(client.wait_until_ready(), 10)
    # setup_hook syncs the commands before the gateway connects, so they are registered by now.
    return RunningBot(fake, app, client, generator, runner, config, image_screen, queue_limit)


# ---- what a member sees ------------------------------------------------------------------------


def original(fake: FakeDiscord, interaction: FakeInteraction) -> StoredMessage:
    return fake.message(interaction.original_message_id)


def is_deleted(fake: FakeDiscord, message_id: int | None) -> bool:
    try:
        fake.message(message_id)
    except LookupError:
        return True
    return False


async def result_of(fake: FakeDiscord, interaction: FakeInteraction, timeout: float = 10.0,
                    *, bot: RunningBot | None = None) -> StoredMessage:
    """The interaction's response once it carries an image (and, given the bot, once the bot
    has recorded it as the job's message: it does so just after the edit)."""

    def delivered() -> StoredMessage | None:
        message = _with_image(original(fake, interaction))
        if message is None or (bot is not None and bot.app.jobs.by_message(str(message.id)) is None):
            return None
        return message

    return await eventually(delivered, timeout, f"a result for interaction {interaction.id}")


def _with_image(message: StoredMessage) -> StoredMessage | None:
    return message if message.attachments and message.embeds else None


async def refusal_of(fake: FakeDiscord, interaction: FakeInteraction, timeout: float = 10.0) -> str:
    """The text of the ephemeral followup that refused the interaction, once the deferred
    response is gone; asserts that nothing else was left in the channel for the interaction."""

    def refused() -> StoredMessage | None:
        followups = [fake.message(i) for i in interaction.followup_message_ids]
        return followups[0] if followups and is_deleted(fake, interaction.original_message_id) else None

    message = await eventually(refused, timeout, f"a refusal for interaction {interaction.id}")
    assert message.flags & EPHEMERAL, message
    assert not message.attachments and not message.embeds
    assert len(interaction.followup_message_ids) == 1
    return message.content


async def immediate_reply(fake: FakeDiscord, interaction: FakeInteraction) -> StoredMessage:
    """The message of an immediate (type 4) answer; asserts it is ephemeral."""
    ack = await fake.wait_for_ack(interaction)
    assert (ack.status, ack.json["type"]) == (200, 4), (ack.status, ack.json)
    message = original(fake, interaction)
    assert message.flags & EPHEMERAL, message
    return message


def decoded(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def embed_fields(message: StoredMessage) -> dict[str, str]:
    [embed] = message.embeds
    return {f["name"]: f["value"] for f in embed.get("fields", [])}


def button_ids(message: StoredMessage) -> list[str]:
    return [c["custom_id"] for row in message.components for c in row.get("components", [])]


def bot_reactions(fake: FakeDiscord, message: StoredMessage) -> set[str]:
    return {emoji for emoji, users in message.reactions.items() if fake.bot_user.id in users}


def message_link(message: StoredMessage) -> str:
    return f"https://discord.com/channels/{message.guild_id}/{message.channel_id}/{message.id}"


class BotStarter:
    """Starts the bot with settings overrides ({"table": {key: value}}); closes what it started."""

    def __init__(self, fake: FakeDiscord, tmp_path: Path):
        self.fake, self.tmp_path = fake, tmp_path
        self.started: list[RunningBot] = []

    async def __call__(self, overrides=None, **kwargs) -> RunningBot:
        running = await start_bot(self.fake, config=settings_data(self.tmp_path, overrides), **kwargs)
        self.started.append(running)
        return running

    async def restart(self, running: RunningBot) -> RunningBot:
        restarted = await running.restarted()
        self.started.append(restarted)
        return restarted

    async def close_all(self) -> None:
        for running in self.started:
            if not running.client.is_closed():
                await running.close()


def labels(message: StoredMessage) -> dict[str, str]:
    """Button label -> custom id."""
    return {c.get("label", ""): c["custom_id"] for row in message.components for c in row.get("components", [])}
