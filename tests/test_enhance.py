"""Prompt enhancement end to end: the real ChatEnhancer (the openai SDK) against the fake OpenAI's
chat completions endpoint, the stand-in image generator, and the real database and ledger."""
from __future__ import annotations

import pytest

from bot.config import settings_from_dict
from bot.core.models import ErrorCode, JobStatus, Requester, UserSettings, usd_to_micros
from moderation import NoImageScreen
from tests.fakes.generators import PreparedGenerator
from tests.fakes.providers import FakeOpenAI, openai_error
from tests.helpers import job_request, start_app

PRICE_PER_1K = 0.5  # dear, so that the tokens show in the bill


@pytest.fixture
async def chat():
    async with FakeOpenAI(api_key="sk-test-secret-4f2a") as fake:
        yield fake


def make_app(tmp_path, chat: FakeOpenAI | None, gen: PreparedGenerator, **sections):
    data = {
        "storage": {"database": str(tmp_path / "easel.db"), "images_dir": str(tmp_path / "images")},
        "generation": {"default_model": "fake-model", "job_timeout_s": 5.0},
        "moderation": {"prompt_rules": {"test": {"terms": ["forbidden"]}}},
        **({"enhance": {"model": "gpt-4o-mini", "base_url": f"{chat.base_url}/v1", "api_key_env": "EASEL_TEST_KEY",
                        "price_per_1k_tokens_usd": PRICE_PER_1K, "timeout_s": 3}} if chat else {}),
    }
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return start_app(settings_from_dict(data), generators=[gen], image_screen=NoImageScreen())


@pytest.fixture(autouse=True)
def key(monkeypatch):
    monkeypatch.setenv("EASEL_TEST_KEY", "sk-test-secret-4f2a")


async def test_the_enhanced_prompt_is_screened_drawn_recorded_and_its_tokens_charged(tmp_path, chat):
    gen = PreparedGenerator()
    app = make_app(tmp_path, chat, gen)
    try:
        out = await app.service.submit(job_request("imagine", "u1", "a fox --enhance --seed 5"))
        held = app.ledger.held_job_ids()
    finally:
        await app.close()
    assert out.ok, out.error
    enhanced = "a fox" + chat.enhancement
    assert gen.calls[0].prompt == enhanced and gen.calls[0].seed == 5
    assert (out.job.prompt, out.job.original_prompt) == (enhanced, "a fox")
    [call] = chat.calls("POST", "/v1/chat/completions")
    assert call.json["model"] == "gpt-4o-mini" and call.json["messages"][-1]["content"] == "a fox"
    tokens = len(" ".join(m["content"] for m in call.json["messages"]).split()) + len(enhanced.split())
    assert out.job.cost_micros == usd_to_micros(gen.price_usd) + usd_to_micros(tokens / 1000 * PRICE_PER_1K)
    assert held == []


async def test_an_enhanced_prompt_the_screen_blocks_is_blocked_and_free(tmp_path, chat):
    chat.enhancement = ", in a forbidden style"
    gen = PreparedGenerator()
    app = make_app(tmp_path, chat, gen)
    try:
        out = await app.service.submit(job_request("imagine", "u1", "a fox --enhance"))
        balance = app.ledger.balance("u1")
    finally:
        await app.close()
    assert out.status == JobStatus.BLOCKED and out.error_code == ErrorCode.BLOCKED
    assert gen.calls == [] and out.job.cost_micros == 0
    assert balance.balance_micros == usd_to_micros(1.0) and balance.reserved_micros == 0


async def test_a_failed_enhancement_uses_the_prompt_as_typed_with_a_note(tmp_path, chat):
    chat.script("chat", openai_error(500, "The server had an error", type="server_error"))
    gen = PreparedGenerator()
    app = make_app(tmp_path, chat, gen)
    try:
        out = await app.service.submit(job_request("imagine", "u1", "a fox", enhance=True))
    finally:
        await app.close()
    assert out.ok and gen.calls[0].prompt == "a fox" and out.job.original_prompt is None
    assert "prompt enhancement failed" in out.job.note and "used as typed" in out.job.note
    assert out.job.cost_micros == usd_to_micros(gen.price_usd)


async def test_a_failed_enhancement_can_refuse_the_job_instead(tmp_path, chat):
    chat.script("chat", openai_error(401, "Incorrect API key provided: sk-test-****4f2a", code="invalid_api_key"))
    gen = PreparedGenerator()
    app = make_app(tmp_path, chat, gen, enhance={"on_failure": "refuse"})
    try:
        out = await app.service.submit(job_request("imagine", "u1", "a fox", enhance=True))
        balance = app.ledger.balance("u1")
    finally:
        await app.close()
    assert out.status == JobStatus.FAILED and "prompt enhancement failed" in out.error
    assert "4f2a" not in out.error and "sk-test" not in out.error  # the key never shown
    assert gen.calls == [] and balance.reserved_micros == 0 and balance.balance_micros == usd_to_micros(1.0)


async def test_without_an_enhancer_enhance_is_refused_before_anything_is_made(tmp_path):
    gen = PreparedGenerator()
    app = make_app(tmp_path, None, gen)
    try:
        out = await app.service.submit(job_request("imagine", "u1", "a fox --enhance"))
        jobs = app.jobs.list()
    finally:
        await app.close()
    assert out.error_code == ErrorCode.USAGE and "not set up" in out.error
    assert jobs == [] and gen.calls == []


async def test_a_members_default_enhances_and_a_request_may_say_no(tmp_path, chat):
    gen = PreparedGenerator()
    app = make_app(tmp_path, chat, gen)
    defaults = UserSettings("u1", enhance=True)
    try:
        first = await app.service.submit(job_request("imagine", "u1", "a fox", defaults=defaults))
        second = await app.service.submit(job_request("imagine", "u1", "a hare", defaults=defaults, enhance=False))
        again = await app.service.reroll(first.job.id, Requester("u1"))
    finally:
        await app.close()
    assert first.job.prompt == "a fox" + chat.enhancement and second.job.prompt == "a hare"
    # A reroll draws the recorded (enhanced) prompt again, without a second enhancement.
    assert again.job.prompt == first.job.prompt and len(chat.calls("POST", "/v1/chat/completions")) == 1
