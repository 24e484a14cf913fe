"""What operators watch: /metrics after a known sequence of jobs (parsed from the exposition
format), /healthz and /readyz under a broken database, storage that cannot be written, no
usable generator and a disconnected bot, and the structured log lines with secrets masked."""
from __future__ import annotations

import asyncio
import io
import json
import logging
import shutil
import time

import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from bot.config import settings_from_dict
from bot.http import make_http_app
from bot.logs import MASK, setup
from moderation import NoImageScreen
from tests.fakes.generators import GeneratorError, PreparedGenerator
from tests.helpers import job_request, start_app


def make_app(tmp_path, generators=None, **sections):
    data = {
        "storage": {"database": str(tmp_path / "easel.db"), "images_dir": str(tmp_path / "images")},
        "generation": {"default_model": "fake-model", "job_timeout_s": 5.0},
        "moderation": {"prompt_rules": {"weapons": {"terms": ["crossbow"]}}},
        "routing": {"retry_attempts": 1},
    }
    data.update(sections)
    return start_app(settings_from_dict(data), generators=[PreparedGenerator()] if generators is None else generators,
                     image_screen=NoImageScreen())


async def scrape(app, **kwargs) -> tuple[int, dict, dict[tuple[str, tuple], float]]:
    async with TestClient(TestServer(make_http_app(app, **kwargs))) as client:
        ready = await client.get("/readyz")
        body = await ready.json()
        health = await client.get("/healthz")
        assert health.status == 200
        metrics = await client.get("/metrics")
        assert metrics.status == 200 and metrics.headers["Content-Type"].startswith("text/plain")
        text = await metrics.text()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return ready.status, body, samples


def value(samples, name, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_metrics_count_a_known_sequence_of_jobs(tmp_path):
    gen = PreparedGenerator(script=[GeneratorError("the GPU caught fire")])  # the first call fails
    app = make_app(tmp_path, [gen])
    try:
        failed = await app.service.submit(job_request("imagine", "u1", "a lighthouse"))
        done = [await app.service.submit(job_request("imagine", "u1", f"a lighthouse {i}")) for i in range(2)]
        blocked = await app.service.submit(job_request("imagine", "u2", "a crossbow"))
        status, body, samples = await scrape(app)
    finally:
        await app.close()
    assert not failed.ok and all(o.ok for o in done) and blocked.error_code == "blocked"
    labels = {"kind": "imagine", "provider": "fake", "model": "fake-model"}
    assert value(samples, "easel_jobs_total", status="done", **labels) == 2
    assert value(samples, "easel_jobs_total", status="failed", **labels) == 1
    assert value(samples, "easel_moderation_blocks_total", stage="prompt", category="weapons") == 1
    assert value(samples, "easel_provider_errors_total", provider="fake", kind="error") == 1
    assert value(samples, "easel_spend_usd_total", provider="fake", model="fake-model") == pytest.approx(0.02)
    # Time in the generator counts for every job that reached it, the failed one too.
    assert value(samples, "easel_generation_seconds_count", provider="fake", model="fake-model") == 3
    assert value(samples, "easel_job_seconds_count", kind="imagine", status="done") == 2
    assert value(samples, "easel_image_screen_seconds_count") == 2
    assert value(samples, "easel_queue_depth", provider="fake") == 0
    assert value(samples, "easel_running_jobs", provider="fake") == 0
    assert ("easel_circuit_open", (("provider", "fake"),)) in samples
    assert not any("u1" in str(k) or "u2" in str(k) for k in samples)  # no user ids as labels
    assert status == 200 and body["ready"] is True


async def test_readiness_says_what_is_wrong(tmp_path):
    app = make_app(tmp_path)
    try:
        status, body, _ = await scrape(app, discord_ready=lambda: True)
        assert (status, body["ready"]) == (200, True)
        assert set(body["checks"]) == {"database", "storage", "generators", "discord"}

        status, body, _ = await scrape(app, discord_ready=lambda: False)
        assert status == 503 and body["checks"]["discord"] == {"ok": False, "detail": "not connected to Discord"}

        images = tmp_path / "images"
        shutil.rmtree(images)
        images.write_text("a file where the images folder was")
        status, body, _ = await scrape(app)
        assert status == 503 and body["checks"]["storage"]["ok"] is False
        assert "images folder" in body["checks"]["storage"]["detail"]
        assert body["checks"]["database"]["ok"] is True

        app.db.conn.close()  # the database is gone from under easel
        status, body, _ = await scrape(app)
        assert status == 503 and body["checks"]["database"]["ok"] is False
        assert "easel.db" in body["checks"]["database"]["detail"]
    finally:
        app.db.conn = __import__("sqlite3").connect(":memory:")  # so that close() can close something
        await app.close()


async def test_readiness_needs_a_usable_generator(tmp_path):
    app = make_app(tmp_path, generators=[])
    try:
        status, body, _ = await scrape(app)
    finally:
        await app.close()
    assert status == 503 and body["checks"]["generators"]["ok"] is False


@pytest.fixture
def log_stream():
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    stream = io.StringIO()
    yield stream
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])


async def test_json_log_lines_carry_the_jobs_fields(tmp_path, log_stream):
    setup("json", "INFO", secrets=[], stream=log_stream)
    app = make_app(tmp_path)
    try:
        out = await app.service.submit(job_request("imagine", "u7", "a lighthouse", guild_id="g3"))
    finally:
        await app.close()
    lines = [json.loads(line) for line in log_stream.getvalue().splitlines()]
    [line] = [x for x in lines if x.get("job_id") == out.job.id]
    assert line["message"] == f"job {out.job.id} done" and line["level"] == "info"
    assert (line["user_id"], line["guild_id"], line["model"], line["provider"]) == ("u7", "g3", "fake-model", "fake")
    assert line["duration_ms"] >= 0 and line["cost_usd"] == pytest.approx(0.01) and "ts" in line


def test_secrets_never_reach_a_log_line(log_stream):
    secret = "sk-live-0123456789abcdef"
    setup("json", "INFO", secrets=[secret, "short"], stream=log_stream)
    log = logging.getLogger("easel.test")
    log.warning("the provider said: bad key %s", secret)
    try:
        raise RuntimeError(f"request failed with Authorization: Bearer {secret}")
    except RuntimeError:
        log.exception("call failed")
    text = log_stream.getvalue()
    assert secret not in text and text.count(MASK) >= 2
    assert [json.loads(x)["message"] for x in text.splitlines()] == [f"the provider said: bad key {MASK}", "call failed"]


def test_human_lines_put_the_fields_after_the_message(log_stream):
    setup("human", "INFO", secrets=[], stream=log_stream)
    logging.getLogger("easel.test").info("job 3 done", extra={"job_id": 3, "model": "tiny"})
    assert log_stream.getvalue().rstrip().endswith("easel.test: job 3 done job_id=3 model=tiny")


async def test_a_reload_applies_budgets_limits_and_rules_and_names_what_needs_a_restart(tmp_path, log_stream):
    from bot.config import load_settings
    from bot.discord.client import reload_settings
    from tests.helpers import write_config

    setup("human", "INFO", secrets=[], stream=log_stream)
    config = tmp_path / "easel.toml"
    tables = {"storage": {"database": "easel.db", "images_dir": "images"},
              "generation": {"default_model": "fake-model"}}
    write_config(config, tables)
    app = start_app(load_settings(str(config)), generators=[PreparedGenerator()], image_screen=NoImageScreen())
    try:
        assert (await app.service.submit(job_request("imagine", "u1", "a crossbow"))).ok
        write_config(config, {**tables, "budget": {"default_allowance_usd": 0.005},
                              "queue": {"max_jobs_per_user": 1},
                              "moderation.prompt_rules.weapons": {"terms": ["crossbow"]},
                              "server": {"port": 9999}})
        changed = await reload_settings(app)
        assert set(changed) == {"budget.default_allowance_usd", "queue.max_jobs_per_user",
                                "moderation.prompt_rules", "server.port (needs a restart)"}
        blocked = await app.service.submit(job_request("imagine", "u1", "a crossbow"))
        poor = await app.service.submit(job_request("imagine", "u2", "a lighthouse"))  # a new member's allowance
        assert blocked.error_code == "blocked" and poor.error_code == "over_budget"
        assert app.service.admission.max_requests_per_user == 1

        config.write_text("[budgett]\n")
        assert await reload_settings(app) is None  # refused: nothing changed
        assert app.settings.budget.default_allowance_usd == 0.005
    finally:
        await app.close()
    text = log_stream.getvalue()
    assert "settings reloaded from" in text and "server.port (needs a restart)" in text
    assert "settings not reloaded (nothing changed)" in text and "budgett" in text


async def test_a_reload_builds_its_generators_off_the_event_loop(tmp_path, log_stream):
    """An A1111 server slow to list its checkpoints holds up the reload, not the bot."""
    from bot.config import load_settings
    from bot.discord.client import reload_settings
    from tests.fakes.a1111_server import FakeA1111
    from tests.helpers import write_config

    config = tmp_path / "easel.toml"
    tables = {"storage": {"database": "easel.db", "images_dir": "images"},
              "moderation": {"image_classifier": "none"}, "generators.local.models": {"tiny": "tiny"}}
    write_config(config, tables)
    app = start_app(load_settings(str(config)))
    with FakeA1111() as server:
        server.list_delay_s = 1.0
        try:
            write_config(config, {**tables, "generators.a1111": {"servers": [server.base_url]}})
            gaps, stop = [], asyncio.Event()

            async def tick() -> None:
                last = time.monotonic()
                while not stop.is_set():
                    await asyncio.sleep(0.01)
                    now = time.monotonic()
                    gaps.append(now - last)
                    last = now

            ticker = asyncio.create_task(tick())
            started = time.monotonic()
            changed = await reload_settings(app)
            took = time.monotonic() - started
            stop.set()
            await ticker
            assert changed == ["generators.a1111.servers"]
            assert any(s.provider == "a1111" for s in app.router.models())  # it waited for the list
            assert took >= 1.0 and max(gaps) < 0.5  # the loop went on meanwhile
        finally:
            await app.close()


async def test_a_reload_that_changes_the_model_list_swaps_the_router(tmp_path, log_stream):
    from bot.config import load_settings
    from bot.discord.client import reload_settings
    from tests.helpers import write_config

    config = tmp_path / "easel.toml"
    tables = {"storage": {"database": "easel.db", "images_dir": "images"},
              "moderation": {"image_classifier": "none"}}
    write_config(config, {**tables, "generators.local.models": {"tiny": "tiny"}})
    app = start_app(load_settings(str(config)))
    old = app.router
    try:
        assert [s.name for s in app.router.models()] == ["tiny"]
        write_config(config, {**tables, "generators.local": {"max_concurrent": 3},
                              "generators.local.models": {"tiny": "tiny", "sketch": "tiny"}})
        changed = await reload_settings(app)
        assert changed == ["generators.local.max_concurrent", "generators.local.models.sketch"]  # all applied
        assert app.service.admission._queue("local").limit == 3
        assert sorted(s.name for s in app.service.planner.router.models()) == ["sketch", "tiny"]
        assert app.router is app.service.router is app.accounts.router is not old
        await app.close_retired(1.0)
        assert app.retired == []
    finally:
        await app.close()
