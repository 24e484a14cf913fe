"""Fixtures shared by several test files."""
from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.fakes.discord_server import FakeDiscord


@pytest.fixture
async def fake() -> AsyncIterator[FakeDiscord]:
    """A fake Discord on 127.0.0.1, with discord.py's REST base and gateway pointed at it."""
    async with FakeDiscord() as server:
        with server.patch_discord_py():
            yield server


@pytest.fixture
async def make_bot(fake: FakeDiscord, tmp_path) -> AsyncIterator[Any]:
    """Starts bots against `fake` (tests.discord_helpers.BotStarter), all closed afterwards."""
    from tests.discord_helpers import BotStarter  # discord.py: only for the tests that use it

    starter = BotStarter(fake, tmp_path)
    yield starter
    await starter.close_all()


@pytest.fixture
async def bob(fake: FakeDiscord):
    """A second plain member (alice is fake.user)."""
    user = fake.add_user("bob")
    fake.add_member(fake.guild, user)
    return user


@pytest.fixture
def store(tmp_path):
    """An empty local blob store (the image server's tests; test_s3_store has its own)."""
    from storage.blobs import LocalBlobStore

    return LocalBlobStore(tmp_path / "images", "http://img.example")
