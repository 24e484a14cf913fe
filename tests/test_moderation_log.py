"""The moderation log and cool-downs through the real database: every block is recorded with its
stage and rule (the prompt only when configured), repeated blocks cool a member down for a while,
and `easel moderation check|log|stats` show it from the command line."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from bot.bootstrap import Overrides, bootstrap
from bot.config import settings_from_dict
from bot.core.models import ErrorCode, JobStatus, Verdict
from moderation import NoImageScreen
from tests.fakes.generators import PreparedGenerator
from tests.fakes.ports import FixedClock
from tests.helpers import job_request, write_workspace_config


class BlockEverything:
    def screen_image(self, image, *, nsfw_channel=False):
        return Verdict(False, rule="exposed", reason="nudity", score=0.93)

    def unavailable_reason(self):
        return None


def make_app(tmp_path, clock, image_screen=None, **moderation):
    moderation.setdefault("review_dir", str(tmp_path / "review"))
    settings = settings_from_dict({
        "storage": {"database": str(tmp_path / "easel.db"), "images_dir": str(tmp_path / "images")},
        "generation": {"default_model": "fake-model"},
        "moderation": {"prompt_rules": {"weapons": {"terms": ["crossbow"]}}, **moderation},
    })
    app = bootstrap(settings, Overrides(generators=[PreparedGenerator()], clock=clock,
                                        image_screen=image_screen or NoImageScreen()))
    app.recover()
    return app


async def test_blocks_are_logged_and_repeated_ones_cool_a_member_down(tmp_path):
    clock = FixedClock()
    app = make_app(tmp_path, clock, cooldown_after=3, cooldown_window_s=600, cooldown_s=900)
    try:
        for i in range(3):
            out = await app.service.submit(job_request("imagine", "eve", f"a crossbow {i}", guild_id="g1"))
            assert out.status == JobStatus.BLOCKED
            clock.t += 10
        events = app.moderation.recent(user_id="eve")
        assert [(e.stage, e.rule, e.guild_id, e.prompt) for e in events] == [("prompt", "weapons", "g1", None)] * 3
        assert all(e.job_id for e in events) and events[0].created_at == clock.t - 10

        cooled = await app.service.submit(job_request("imagine", "eve", "a lighthouse", guild_id="g1"))
        assert cooled.error_code == ErrorCode.BLOCKED and "ask again in about 15 minutes" in cooled.error
        assert len(app.moderation.recent(user_id="eve")) == 3  # a cool-down is not itself logged
        assert (await app.service.submit(job_request("imagine", "ann", "a lighthouse"))).ok  # others are not

        clock.t += 900
        assert (await app.service.submit(job_request("imagine", "eve", "a lighthouse"))).ok
        assert app.moderation.counts(0) == {"weapons": 3}
    finally:
        await app.close()


async def test_blocks_spread_over_more_than_the_window_cause_no_cool_down(tmp_path):
    clock = FixedClock()
    app = make_app(tmp_path, clock, cooldown_after=2, cooldown_window_s=60)
    try:
        await app.service.submit(job_request("imagine", "eve", "a crossbow"))
        clock.t += 120
        await app.service.submit(job_request("imagine", "eve", "another crossbow"))
        assert (await app.service.submit(job_request("imagine", "eve", "a lighthouse"))).ok
    finally:
        await app.close()


async def test_an_output_block_is_logged_with_its_score_and_prompts_only_when_kept(tmp_path):
    app = make_app(tmp_path, FixedClock(), image_screen=BlockEverything(), log_prompts=True)
    try:
        out = await app.service.submit(job_request("imagine", "eve", "a beach", guild_id="g1", channel_id="c1"))
        [event] = app.moderation.recent()
        shown = await app.results.moderation_log("g1")
        elsewhere = await app.results.moderation_log("g2")
    finally:
        await app.close()
    assert out.status == JobStatus.BLOCKED
    assert (event.stage, event.rule, event.score, event.prompt, event.channel_id) == (
        "output", "exposed", 0.93, "a beach", "c1")
    assert shown == [event] and elsewhere == []


def test_the_command_line_checks_prompts_and_shows_the_log(tmp_path):
    write_workspace_config(tmp_path, moderation={"image_classifier": "none"})
    env = {k: v for k, v in os.environ.items() if k != "EASEL_CONFIG"}

    def easel(*args, stdin=None):
        return subprocess.run([sys.executable, "-m", "bot.cli", "--config", str(tmp_path / "easel.toml"), *args],
                              cwd=tmp_path, env=env, input=stdin, capture_output=True, text=True, timeout=60)

    checked = easel("moderation", "check", "a lighthouse", "n u d e  woman", "a 12 year old in lingerie")
    lines = [json.loads(x) for x in checked.stdout.splitlines()]
    assert checked.returncode == 0 and [x["blocked"] for x in lines] == [False, True, True]
    assert [x["category"] for x in lines] == [None, "explicit", "minors"]
    nsfw = easel("moderation", "check", "-", "--channel", "nsfw", stdin="n u d e  woman\na 12 year old in lingerie\n")
    assert [json.loads(x)["blocked"] for x in nsfw.stdout.splitlines()] == [False, True]
    assert not (tmp_path / "data" / "easel.db").exists()  # check opens nothing

    blocked = easel("imagine", "a gory battlefield", "--json")
    assert blocked.returncode == 3
    log = easel("moderation", "log", "--json")
    [event] = json.loads(log.stdout)
    assert (event["stage"], event["rule"], event["user_id"], event["prompt"]) == ("prompt", "gore", "local", None)
    stats = easel("moderation", "stats", "--period", "day")
    assert stats.returncode == 0 and "blocks this day: 1" in stats.stdout and "gore" in stats.stdout



async def test_a_blocked_output_kept_for_review_is_never_served(tmp_path):
    from aiohttp.test_utils import TestClient, TestServer

    from bot.http import make_http_app

    app = make_app(tmp_path, FixedClock(), image_screen=BlockEverything(), keep_blocked_outputs=True)
    try:
        out = await app.service.submit(job_request("imagine", "eve", "a beach"))
        [event] = app.moderation.recent()
        async with TestClient(TestServer(make_http_app(app))) as client:
            served = await client.get(f"/images/{event.review_sha256}.png")
    finally:
        await app.close()
    assert out.status == JobStatus.BLOCKED and out.job.sha256 is None
    kept = tmp_path / "review" / event.review_sha256[:2] / f"{event.review_sha256}.png"
    assert kept.is_file() and not any((tmp_path / "images").rglob("*.png"))
    assert served.status == 404


def test_a_review_folder_inside_the_images_folder_is_refused(tmp_path):
    import pytest

    from bot.config import ConfigError

    with pytest.raises(ConfigError, match="must not be inside storage.images_dir"):
        make_app(tmp_path, FixedClock(), keep_blocked_outputs=True, review_dir=str(tmp_path / "images" / "review"))
