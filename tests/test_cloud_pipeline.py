"""Cloud jobs end to end: settings -> router -> real SDK -> fake provider -> re-hosted result,
and the money on every path."""
from __future__ import annotations

import logging
import re
import time

import pytest

from bot.config import settings_from_dict
from bot.core.models import usd_to_micros
from moderation import NoImageScreen
from tests.fakes.providers import (
    HTML_ERROR_PAGE,
    FakeOpenAI,
    FakeReplicate,
    FakeTogether,
    HostPolicy,
    Outcome,
    openai_error,
    replicate_error,
)
from tests.helpers import job_request, start_app


@pytest.fixture
async def fakes(monkeypatch):
    monkeypatch.setenv("REPLICATE_POLL_INTERVAL", "0.01")
    async with FakeOpenAI() as openai, FakeReplicate() as replicate, FakeTogether() as together:
        monkeypatch.setenv("OPENAI_API_KEY", openai.api_key)
        monkeypatch.setenv("REPLICATE_API_TOKEN", replicate.api_key)
        monkeypatch.setenv("TOGETHER_API_KEY", together.api_key)
        # No base_url in the settings for OpenAI: the SDK's own variable is honoured.
        monkeypatch.setenv("OPENAI_BASE_URL", f"{openai.base_url}/v1")
        yield openai, replicate, together


def make_app(tmp_path, fakes, **overrides):
    openai, replicate, together = fakes
    data = {
        "storage": {"database": str(tmp_path / "easel.db"), "images_dir": str(tmp_path / "images")},
        "generation": {"default_model": "flux-schnell"},
        "generators": {
            "local": {"enabled": False},
            "openai": {"timeout_s": 3},
            "replicate": {"base_url": replicate.base_url, "timeout_s": 3},
            "together": {"base_url": f"{together.base_url}/v1", "timeout_s": 3},
        },
        "routing": {"retry_base_delay_s": 0.01},
    }
    for section, values in overrides.items():
        data.setdefault(section, {}).update(values)
    return start_app(settings_from_dict(data), image_screen=NoImageScreen())


def balance(app, user="u1"):
    return app.ledger.balance(user)


async def test_unservable_request_is_refused_before_anything_is_reserved_or_sent(tmp_path, fakes):
    openai, _, _ = fakes
    app = make_app(tmp_path, fakes)
    out = await app.service.submit(job_request("imagine", "u1", "a fox --seed 3 --model dall-e-3"))
    assert out.error_code == "usage" and "dall-e-3 does not take a seed" in out.error
    assert openai.calls("POST", "/v1/images") == [] and app.jobs.list() == []
    out = await app.service.submit(job_request("edit", "u1", "a hat", model="flux-schnell",
                                               image=open(__file__, "rb").read()))
    assert out.error_code == "usage"


async def test_dalle3_url_output_is_rehosted_at_once(tmp_path, fakes):
    openai, _, _ = fakes
    openai.output_policy = HostPolicy(expire_after=1)
    app = make_app(tmp_path, fakes)
    out = await app.service.submit(job_request("imagine", "u1", "a lighthouse", model="dalle",
                                               options={"quality": "hd"}))
    assert out.ok, out.error
    job = out.job
    assert (job.model, job.provider, job.seed, job.width, job.height) == ("dall-e-3", "openai", None, 1024, 1024)
    assert job.revised_prompt
    assert job.cost_micros == usd_to_micros(0.08)
    sent = openai.calls("POST", "/v1/images/generations")[0].json
    assert sent["model"] == "dall-e-3" and sent["quality"] == "hd" and sent["prompt"] == "a lighthouse"
    assert app.blobs.exists(job.sha256)


async def test_flux_seed_is_sent_and_recorded(tmp_path, fakes):
    _, replicate, _ = fakes
    app = make_app(tmp_path, fakes)
    out = await app.service.submit(job_request("imagine", "u1", "a fox --seed 42 --ar 16:9"))
    assert out.ok, out.error
    created = replicate.calls("POST", "/v1/models/black-forest-labs/flux-schnell/predictions")[0].json
    assert created["input"]["seed"] == 42 and created["input"]["aspect_ratio"] == "16:9"
    assert out.job.seed == 42 and (out.job.width, out.job.height) == (1344, 768)
    assert out.job.cost_micros == usd_to_micros(0.003)


async def test_content_policy_refusal_is_a_block_refunded_and_not_retried(tmp_path, fakes):
    openai, _, _ = fakes
    openai.script("generations", openai_error(400, "Your request was rejected as a result of our safety system.",
                                              type="image_generation_user_error", code="content_policy_violation"))
    app = make_app(tmp_path, fakes)
    out = await app.service.submit(job_request("imagine", "u1", "a fox", model="dall-e-3"))
    assert (out.status, out.error_code) == ("blocked", "blocked")
    assert len(openai.calls("POST", "/v1/images/generations")) == 1
    assert balance(app).available_micros == usd_to_micros(1.0)


async def test_server_error_then_success_is_retried_and_charged_once(tmp_path, fakes):
    openai, _, _ = fakes
    openai.script("generations", openai_error(500, "The server had an error.", type="server_error"))
    app = make_app(tmp_path, fakes)
    out = await app.service.submit(job_request("imagine", "u1", "a fox", model="dall-e-3"))
    assert out.ok and len(openai.calls("POST", "/v1/images/generations")) == 2
    assert balance(app).balance_micros == usd_to_micros(1.0) - usd_to_micros(0.04)


@pytest.mark.parametrize("bad", ["html", "truncated"])
async def test_bad_output_fails_and_refunds(tmp_path, fakes, bad):
    from tests.fakes.providers import truncated_png

    openai, _, _ = fakes
    openai.make_output = (lambda w, h: HTML_ERROR_PAGE) if bad == "html" else truncated_png
    app = make_app(tmp_path, fakes, routing={"retry_attempts": 1})
    out = await app.service.submit(job_request("imagine", "u1", "a fox", model="dall-e-3"))
    assert out.status == "failed"
    assert balance(app).available_micros == usd_to_micros(1.0) and balance(app).reserved_micros == 0


async def test_failing_provider_falls_back_and_says_which_model_served(tmp_path, fakes, caplog):
    _, replicate, together = fakes
    replicate.outcome = Outcome(kind="fail", error="Prediction failed: please retry, the GPU was lost")
    app = make_app(tmp_path, fakes, routing={"fallbacks": {"flux-schnell": "together/flux-schnell"},
                                             "retry_attempts": 1})
    caplog.set_level(logging.DEBUG)
    out = await app.service.submit(job_request("imagine", "u1", "a fox --seed 5", size=(1024, 1024)))
    assert out.ok, out.error
    assert (out.job.model, out.job.provider, out.job.seed) == ("together/flux-schnell", "together", 5)
    sent = together.calls("POST", "/v1/images/generations")[0].json
    assert sent["seed"] == 5 and sent["model"] == "black-forest-labs/FLUX.1-schnell"
    assert out.job.cost_micros == usd_to_micros(0.0027 * 1024 * 1024 / 1e6)
    assert app.ledger.spend_by_provider(0) == {"together": out.job.cost_micros}
    for secret in (replicate.api_key, together.api_key):
        assert secret not in caplog.text and secret not in (out.error or "")


async def test_hung_prediction_is_cancelled_and_refunded(tmp_path, fakes):
    _, replicate, _ = fakes
    replicate.outcome = Outcome(kind="hang")
    app = make_app(tmp_path, fakes, generators={"local": {"enabled": False}, "replicate": {
        "base_url": replicate.base_url, "timeout_s": 0.3}}, routing={"retry_attempts": 1})
    out = await app.service.submit(job_request("imagine", "u1", "a fox"))
    assert out.status == "failed"
    assert replicate.calls("POST", "/v1/predictions/")  # the cancel call
    assert balance(app).available_micros == usd_to_micros(1.0)


async def test_cloud_generator_is_off_without_its_key(tmp_path, fakes, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY")
    app = make_app(tmp_path, fakes)
    names = {s.name for s in app.router.models()}
    assert "dall-e-3" not in names and "flux-schnell" in names
    app2 = make_app(tmp_path / "b", fakes, generators={"local": {"enabled": False}, "together": {"enabled": False}})
    assert "together/flux-schnell" not in {s.name for s in app2.router.models()}


def rate_limited(retry_after: str):
    return openai_error(429, "Rate limit reached for images per minute.", type="requests",
                        code="rate_limit_exceeded", headers={"Retry-After": retry_after})


@pytest.mark.parametrize(
    ("retry_after", "overrides", "message"),
    [
        ("86400", {}, r"openai asked to wait 86400 s; easel gives up after 60 s"),
        ("10", {"routing": {"retry_max_wait_s": 5}}, r"openai asked to wait 10 s; easel gives up after 5 s"),
        ("30", {"generation": {"job_timeout_s": 20}}, r"openai asked to wait 30 s; the job has (20|19\.\d) s left"),
    ],
    ids=["over-the-default-cap", "over-the-configured-cap", "past-the-job-deadline"],
)
async def test_a_retry_after_not_worth_waiting_for_fails_the_job_at_once_and_refunds(
    tmp_path, fakes, retry_after, overrides, message
):
    openai, _, _ = fakes
    openai.script("generations", rate_limited(retry_after))
    app = make_app(tmp_path, fakes, **overrides)
    started = time.monotonic()
    out = await app.service.submit(job_request("imagine", "u1", "a fox", model="dall-e-3"))
    assert time.monotonic() - started < 2
    assert out.status == "failed"
    assert out.error and re.search(message, out.error), out.error
    assert openai.api_key not in out.error
    assert len(openai.calls("POST", "/v1/images/generations")) == 1
    assert balance(app).available_micros == usd_to_micros(1.0) and balance(app).reserved_micros == 0


async def test_a_retry_after_over_the_cap_moves_on_to_the_fallback(tmp_path, fakes):
    _, replicate, together = fakes
    limited = replicate_error(429, "Throttled", "Request was throttled.", headers={"Retry-After": "86400"})
    replicate.script("create", limited)
    app = make_app(tmp_path, fakes, routing={"fallbacks": {"flux-schnell": "together/flux-schnell"}})
    started = time.monotonic()
    out = await app.service.submit(job_request("imagine", "u1", "a fox --seed 5", size=(1024, 1024)))
    assert time.monotonic() - started < 2
    assert out.ok, out.error
    assert (out.job.model, out.job.provider) == ("together/flux-schnell", "together")
    assert len(replicate.calls("POST", "/v1/models/")) == 1 and len(together.calls("POST", "/v1/images")) == 1
