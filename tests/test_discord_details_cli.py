"""📋 Details end to end with the real local generator (the tiny model): the `easel imagine`
command it shows, run through the command line on another data folder, makes the same pixels."""
from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

discord = pytest.importorskip("discord")
pytest.importorskip("diffusers")

from bot.config import settings_from_dict  # noqa: E402
from bot.discord.client import EaselClient  # noqa: E402
from tests.discord_helpers import (  # noqa: E402
    RESULT_REACTIONS,
    bot_reactions,
    eventually,
    immediate_reply,
    result_of,
    settings_data,
)
from tests.helpers import pixels, start_app, write_workspace_config  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# The command line inherits this process's thread settings: torch's CPU results depend on the
# number of threads, and the bot's image is made in this process.
ENV = {**{k: v for k, v in os.environ.items() if k != "EASEL_CONFIG"}, "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny") / "tiny"
    build = "import sys, pathlib; from generators.tiny import build_tiny_pipeline; " \
            "build_tiny_pipeline(pathlib.Path(sys.argv[1]))"
    result = subprocess.run([sys.executable, "-c", build, str(folder)], cwd=ROOT, env=ENV,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return folder


async def test_the_details_command_remakes_the_same_pixels_on_the_command_line(fake, tmp_path, tiny_model):
    config = settings_data(tmp_path, {"generation": {"default_model": "tiny"}})
    config["generators"] = {"local": {"models": {"tiny": str(tiny_model)}}}
    app = start_app(settings_from_dict(config))
    client = EaselClient(app, app.settings.discord, guild_ready_timeout=0.05)
    await client.login(fake.token)
    runner = asyncio.create_task(client.connect(reconnect=False))
    try:
        await asyncio.wait_for(client.wait_until_ready(), 10)
        interaction = await fake.send_slash_command("imagine", {"prompt": "a lighthouse --seed 42 --ar 3:2"})
        result = await result_of(fake, interaction, timeout=120)
        job = await eventually(lambda: app.jobs.by_message(str(result.id)), what="the result recorded")
        await eventually(lambda: bot_reactions(fake, fake.message(result.id)) == RESULT_REACTIONS)
        click = await fake.send_component_interaction(result.id, f"easel:details:{job.id}")
        text = (await immediate_reply(fake, click)).content
    finally:
        await client.close()
        await asyncio.gather(runner, return_exceptions=True)
        await app.close()

    [command] = re.findall(r"```\n(easel imagine .*)\n```", text)
    words = shlex.split(command)
    workspace = tmp_path / "elsewhere"
    write_workspace_config(workspace, **{"generators.local.models": {"tiny": str(tiny_model)}})
    made = subprocess.run([str(ROOT / ".venv" / "bin" / "easel"), *words[1:], "--json"], cwd=workspace, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr[-3000:]
    out = json.loads(made.stdout)
    assert (out["seed"], out["model"], out["width"], out["height"]) == (42, "tiny", job.width, job.height)
    assert pixels(Path(workspace / out["image_path"])) == pixels(app.blobs.get(job.sha256)), (command, job)
