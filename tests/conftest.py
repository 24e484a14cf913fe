"""Fixtures shared by several test files."""
from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.fakes.discord_server import FakeDiscord


@pytest.fixture
async def fake() -> AsyncIterator[FakeDiscord]:
    """A fake Discord on 127.0.0.1, with discord.py's REST base and gateway pointed at it."""
    async with FakeDiscord() as server:
        with server.patch_discord_py():
            yield server
