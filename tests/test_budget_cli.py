"""`easel budget ...` end to end, as a subprocess in its own workspace, with jobs served by the
fake OpenAI server: allowances per role and member, grants with a reason, blocks and exemptions
(exit 4 like any budget refusal), a rate limit that says until when, history and the report with
its chart, each with --json."""
from __future__ import annotations

import io
import json
import os
import re
import sqlite3
from pathlib import Path

import pytest
from PIL import Image

from tests.fakes.providers import FakeOpenAI
from tests.helpers import write_workspace_config
from tests.test_cli import EASEL

EXIT_OVER_BUDGET = 4


@pytest.fixture
async def openai():
    async with FakeOpenAI() as fake:
        yield fake


@pytest.fixture
def workspace(tmp_path, openai):
    def make(**budget):
        write_workspace_config(tmp_path, **{
            "generation": {"default_model": "gpt-image-1"},
            "generators.local": {"enabled": False},
            "budget": {"default_allowance_usd": 1.0, **budget},
        })
        env = {k: v for k, v in os.environ.items() if k != "EASEL_CONFIG"}
        env.update(OPENAI_API_KEY=openai.api_key, OPENAI_BASE_URL=f"{openai.base_url}/v1", USER="tester")
        return tmp_path / "easel.toml", env

    return make


async def easel(ws, *args: str) -> tuple[int, str, str]:
    import asyncio

    config, env = ws
    proc = await asyncio.create_subprocess_exec(*EASEL, "--config", str(config), *args, env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    return proc.returncode, out.decode(), err.decode()


async def as_json(ws, *args: str) -> dict:
    code, out, err = await easel(ws, *args, "--json")
    assert code == 0, err
    return json.loads(out)


async def test_allowances_for_the_default_a_role_and_a_member(workspace):
    ws = workspace()
    assert (await as_json(ws, "budget", "allowance", "set", "2.5", "--role", "111"))["roles"] == {"111": 2_500_000}
    await as_json(ws, "budget", "allowance", "set", "0.25", "--user", "carol")
    shown = await as_json(ws, "budget", "allowance", "show")
    assert (shown["default_micros"], shown["default_from_settings"]) == (1_000_000, True)
    assert shown["users"] == {"carol": 250_000} and shown["period"] == "month"
    member = await as_json(ws, "budget", "show", "ann", "--role", "111", "--role", "222")
    assert (member["allowance_micros"], member["available_micros"]) == (2_500_000, 2_500_000)
    assert (await as_json(ws, "budget", "show", "carol", "--role", "111"))["allowance_micros"] == 250_000
    await as_json(ws, "budget", "allowance", "set", "none", "--user", "carol")
    assert (await as_json(ws, "budget", "allowance", "show"))["users"] == {}
    code, _, err = await easel(ws, "budget", "allowance", "set", "none")
    assert code == 2 and "the default allowance cannot be removed" in err


async def test_a_grant_and_a_block_are_in_the_history_with_who_and_why(workspace):
    ws = workspace()
    granted = await as_json(ws, "budget", "grant", "ann", "0.5", "--reason", "won the contest")
    assert granted["did"] == "added $0.5000" and granted["balance_micros"] == 1_500_000
    blocked = await as_json(ws, "budget", "block", "ann", "--reason", "spam")
    assert (blocked["blocked"], blocked["blocked_reason"]) == (True, "spam")
    code, _, err = await easel(ws, "imagine", "a red kite", "--user", "ann")
    assert code == EXIT_OVER_BUDGET and "an admin has blocked you from generating images" in err
    await easel(ws, "budget", "unblock", "ann")
    history = (await as_json(ws, "budget", "history", "ann"))["entries"]
    assert [e["kind"] for e in history] == ["unblock", "block", "grant", "refill"]
    assert history[2]["reason"] == "won the contest" and history[2]["actor"] == "cli:tester"
    assert history[1]["reason"] == "spam"


async def test_a_rate_limit_is_exit_4_and_says_until_when(workspace):
    ws = workspace(user_images_per_hour=1)
    first = await as_json(ws, "imagine", "a lighthouse", "--user", "ann")
    assert first["status"] == "done"
    code, _, err = await easel(ws, "imagine", "another lighthouse", "--user", "ann")
    assert code == EXIT_OVER_BUDGET, err
    assert re.search(r"you have made 1 image in the last hour, the limit \(until \d{4}-\d\d-\d\d \d\d:\d\d UTC\)", err)
    await easel(ws, "budget", "exempt", "--user", "ann")
    code, _, err = await easel(ws, "imagine", "a third lighthouse", "--user", "ann")
    assert code == 0, err  # exempt: no rate limit, and not charged
    member = await as_json(ws, "budget", "show", "ann")
    charged = round(first["cost_usd"] * 1e6)
    assert member["exempt"] and member["spent_micros"] > charged > 0  # both jobs' costs are recorded...
    assert member["balance_micros"] == 1_000_000 - charged  # ...only the first was charged


async def test_the_report_and_its_chart(workspace, tmp_path):
    ws = workspace(daily_spend_cap_usd=1.0)
    for user in ("ann", "bob", "ann"):
        code, _, err = await easel(ws, "imagine", "a harbour at noon", "--user", user)
        assert code == 0, err
    chart = tmp_path / "spend.png"
    report = await as_json(ws, "budget", "report", "--chart", str(chart))
    by = {d: {r["key"]: r["spent_micros"] for r in rows} for d, rows in report["by"].items()}
    assert list(by["user"]) == ["ann", "bob"] and by["user"]["ann"] == 2 * by["user"]["bob"]
    assert by["provider"] == {"openai": report["total_micros"]} and by["model"] == {"gpt-image-1": report["total_micros"]}
    assert sum(by["day"].values()) == report["total_micros"] and report["daily_cap_usd"] == 1.0
    image = Image.open(io.BytesIO(chart.read_bytes()))
    assert image.format == "PNG" and image.size == (900, 420)


async def test_free_local_images_are_counted_per_period(workspace, tmp_path):
    ws = workspace(free_local_images=1)
    config, env = ws
    text = config.read_text().replace("[generators.local]\nenabled = false", "[generators.local]\nenabled = true")
    config.write_text(text.replace('default_model = "gpt-image-1"', 'default_model = "tiny"'))
    code, _, err = await easel(ws, "imagine", "a pebble", "--user", "ann", "--size", "64x64", "--steps", "1")
    assert code == 0, err
    code, _, err = await easel(ws, "imagine", "a second pebble", "--user", "ann", "--size", "64x64", "--steps", "1")
    assert code == EXIT_OVER_BUDGET and "you have made your 1 free image for this period" in err
    with sqlite3.connect(Path(tmp_path) / "data" / "easel.db") as conn:
        assert conn.execute("SELECT amount_micros, counted FROM reservations").fetchall() == [(0, 1)]
    assert (await as_json(ws, "budget", "show", "ann"))["balance_micros"] == 1_000_000  # free
