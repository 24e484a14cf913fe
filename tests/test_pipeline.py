"""The job pipeline end to end, with prepared generators (real protocol, instant images)."""
from __future__ import annotations

import asyncio
import hashlib
import os

import pytest

from bot.config import settings_from_dict
from bot.core.models import ContentPolicyError, GeneratorError, TransientGeneratorError, usd_to_micros
from moderation import NoImageScreen, Verdict
from tests.fakes.generators import PreparedGenerator, png_bytes
from tests.helpers import job_request, pixels, start_app


class BlockEverything:
    """An image screen that blocks every image (a real ImageScreen implementation)."""

    def screen_image(self, image, *, nsfw_channel=False):
        return Verdict(allowed=nsfw_channel, rule="test", reason="blocked by the test screen")

    def unavailable_reason(self):
        return None


def make_app(tmp_path, *gens, allowance=1.0, image_screen=None, queue_limits=None, **overrides):
    data = {
        "storage": {"database": str(tmp_path / "easel.db"), "images_dir": str(tmp_path / "images")},
        "generation": {"default_model": "fake-model", "job_timeout_s": 5.0},
        "budget": {"default_allowance_usd": allowance},
    }
    for section, values in overrides.items():
        data.setdefault(section, {}).update(values)
    app = start_app(settings_from_dict(data), generators=list(gens) or [PreparedGenerator()],
                    image_screen=image_screen or NoImageScreen(), queue_limits=queue_limits)
    app.router.retry = type(app.router.retry)(attempts=3, base_delay_s=0.001, max_delay_s=0.01)
    return app


def available(app, user="u1") -> int:
    return app.ledger.balance(user).available_micros


async def test_done_job_is_stored_recorded_and_charged(tmp_path):
    gen = PreparedGenerator(price_usd=0.02, billed_usd=0.015)
    app = make_app(tmp_path, gen)
    out = await app.service.submit(job_request("imagine", "u1", "a red fox --seed 42 --no blur --ar 2:1"))
    assert out.status == "done", out.error
    job = out.job
    assert (job.seed, job.negative_prompt, job.prompt) == (42, "blur", "a red fox")
    assert job.width == 2 * job.height
    assert gen.calls[0].seed == 42 and gen.calls[0].negative_prompt == "blur"
    data = open(out.image_path, "rb").read()
    assert hashlib.sha256(data).hexdigest() == job.sha256
    assert job.image_url.endswith(f"/images/{job.sha256}.png")
    assert job.cost_micros == usd_to_micros(0.015)  # the billed cost, not the estimate
    assert available(app) == usd_to_micros(1.0) - usd_to_micros(0.015)
    assert app.ledger.balance("u1").reserved_micros == 0
    assert set(job.timings) >= {"prepare", "screen_prompt", "reserve", "queue", "generate",
                                "validate", "screen_image", "store", "record"}
    assert out.as_dict()["cost_usd"] == pytest.approx(0.015)


async def test_seed_is_chosen_and_recorded_when_none_given(tmp_path):
    app = make_app(tmp_path)
    out = await app.service.submit(job_request("imagine", "u1", "a fox"))
    assert out.ok and isinstance(out.job.seed, int)
    again = await app.service.submit(job_request("imagine", "u1", "a fox", seed=out.job.seed))
    assert pixels(app.blobs.get(again.job.sha256)) == pixels(app.blobs.get(out.job.sha256))


async def test_model_without_seed_records_none(tmp_path):
    app = make_app(tmp_path, PreparedGenerator(honours_seed=False))
    out = await app.service.submit(job_request("imagine", "u1", "a fox"))
    assert out.ok and out.job.seed is None
    refused = await app.service.submit(job_request("imagine", "u1", "a fox --seed 3"))
    assert refused.error_code == "usage" and "does not take a seed" in refused.error


async def test_failed_generation_releases_the_reservation(tmp_path):
    gen = PreparedGenerator(script=[GeneratorError("the GPU caught fire")])
    app = make_app(tmp_path, gen)
    out = await app.service.submit(job_request("imagine", "u1", "a fox"))
    assert out.status == "failed" and "caught fire" in out.error
    assert available(app) == usd_to_micros(1.0)
    assert app.jobs.get(out.job.id).status == "failed"
    assert app.ledger.held_job_ids() == []


async def test_transient_failures_are_retried(tmp_path):
    gen = PreparedGenerator(script=[TransientGeneratorError("503"), TransientGeneratorError("429", retry_after=0.01)])
    app = make_app(tmp_path, gen)
    out = await app.service.submit(job_request("imagine", "u1", "a fox"))
    assert out.ok and len(gen.calls) == 3


async def test_content_policy_refusal_is_a_block_and_not_retried(tmp_path):
    gen = PreparedGenerator(script=[ContentPolicyError("content_policy_violation")])
    app = make_app(tmp_path, gen)
    out = await app.service.submit(job_request("imagine", "u1", "a fox"))
    assert (out.status, out.error_code) == ("blocked", "blocked") and len(gen.calls) == 1
    assert available(app) == usd_to_micros(1.0)


@pytest.mark.parametrize("bad, reason", [
    (b"<!DOCTYPE html><html><body>502 Bad Gateway</body></html>", "HTML"),
    (png_bytes(64, 64)[: len(png_bytes(64, 64)) // 2], "truncated"),
    (b"", "empty"),
    (png_bytes(32, 64), "32x64"),
])
async def test_unusable_output_is_rejected_and_refunded(tmp_path, bad, reason):
    gen = PreparedGenerator(script=[bad])
    app = make_app(tmp_path, gen)
    out = await app.service.submit(job_request("imagine", "u1", "a fox", size=(64, 64)))
    assert out.status == "failed" and reason in out.error
    assert available(app) == usd_to_micros(1.0)
    assert not any((tmp_path / "images").rglob("*.png"))


async def test_blank_output_is_rejected(tmp_path):
    import io

    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), "black").save(buf, format="PNG")
    app = make_app(tmp_path, PreparedGenerator(script=[buf.getvalue()]))
    out = await app.service.submit(job_request("imagine", "u1", "a fox", size=(64, 64)))
    assert out.status == "failed" and "blank" in out.error


async def test_blocked_prompt_reaches_no_generator_and_costs_nothing(tmp_path):
    gen = PreparedGenerator()
    app = make_app(tmp_path, gen)
    out = await app.service.submit(job_request("imagine", "u1", "an N S F W scene"))
    assert out.status == "blocked" and gen.calls == []
    assert "nsfw" not in out.error.lower().replace(" ", "")  # the rule is named, the words are not echoed
    assert available(app) == usd_to_micros(1.0)
    assert app.jobs.get(out.job.id).status == "blocked"


async def test_explicit_terms_are_allowed_in_age_restricted_channels(tmp_path):
    app = make_app(tmp_path)
    out = await app.service.submit(job_request("imagine", "u1", "an nsfw scene", nsfw_channel=True))
    assert out.ok


async def test_blocked_output_is_not_stored_or_charged(tmp_path):
    app = make_app(tmp_path, image_screen=BlockEverything())
    out = await app.service.submit(job_request("imagine", "u1", "a fox"))
    assert out.status == "blocked" and "blocked by the test screen" in out.error
    assert out.job.sha256 is None and not any((tmp_path / "images").rglob("*.png"))
    assert available(app) == usd_to_micros(1.0)


async def test_blocked_output_is_charged_when_configured(tmp_path):
    app = make_app(tmp_path, PreparedGenerator(price_usd=0.05), image_screen=BlockEverything(),
                   moderation={"blocked_outputs_are_paid": True})
    out = await app.service.submit(job_request("imagine", "u1", "a fox"))
    assert out.status == "blocked" and available(app) == usd_to_micros(0.95)


async def test_over_budget_is_refused_before_generation(tmp_path):
    gen = PreparedGenerator(price_usd=0.6)
    app = make_app(tmp_path, gen, allowance=0.5)
    out = await app.service.submit(job_request("imagine", "u1", "a fox"))
    assert (out.status, out.error_code) == ("refused", "over_budget")
    assert "$0.6000" in out.error and "$0.5000" in out.error
    assert gen.calls == [] and available(app) == usd_to_micros(0.5)


async def test_concurrent_requests_cannot_overspend(tmp_path):
    gen = PreparedGenerator(price_usd=0.4, delay_s=0.05)
    app = make_app(tmp_path, gen, allowance=1.0, queue={"max_jobs_per_user": 10})
    outs = await asyncio.gather(*[app.service.submit(job_request("imagine", "u1", f"fox {i}")) for i in range(5)])
    statuses = sorted(o.status for o in outs)
    assert statuses.count("done") == 2 and statuses.count("refused") == 3
    assert all(o.error_code == "over_budget" for o in outs if o.status == "refused")
    assert app.ledger.balance("u1").balance_micros == usd_to_micros(0.2)


async def test_usage_errors_create_no_job(tmp_path):
    app = make_app(tmp_path)
    for prompt, words in [("a fox --sed 4", "unknown flag --sed"),
                          ("x" * 20_000, "20000 characters"),
                          ("a fox --model nope", "unknown model 'nope'"),
                          ("", "empty")]:
        out = await app.service.submit(job_request("imagine", "u1", prompt))
        assert (out.status, out.error_code) == ("refused", "usage") and words in out.error
    assert app.jobs.list() == []


async def test_too_many_jobs_in_flight_are_refused(tmp_path):
    gen = PreparedGenerator(delay_s=0.2)
    app = make_app(tmp_path, gen, queue={"max_jobs_per_user": 2})
    outs = await asyncio.gather(*[app.service.submit(job_request("imagine", "u1", "a fox")) for _ in range(3)])
    assert sorted(o.status for o in outs) == ["done", "done", "refused"]
    busy = next(o for o in outs if o.status == "refused")
    assert busy.error_code == "busy" and available(app) == usd_to_micros(1.0) - 2 * usd_to_micros(0.01)


async def test_queue_is_fair_across_users(tmp_path):
    gen = PreparedGenerator(delay_s=0.02)
    app = make_app(tmp_path, gen, queue={"max_jobs_per_user": 10}, queue_limits={"fake": 1})
    order: list[str] = []

    async def one(user, prompt, delay=0.0):
        await asyncio.sleep(delay)
        out = await app.service.submit(job_request("imagine", user, prompt))
        order.append(user)
        return out

    tasks = [one("greedy", f"fox {i}") for i in range(5)] + [one("other", "a cat", delay=0.005)]
    await asyncio.gather(*tasks)
    # greedy's first job was already running; other's one job goes next, not after greedy's ten.
    assert order.index("other") <= 2


async def test_queued_job_reports_position_and_can_be_cancelled(tmp_path):
    gen = PreparedGenerator(delay_s=0.3)
    app = make_app(tmp_path, gen, queue={"max_jobs_per_user": 5}, queue_limits={"fake": 1})
    events = []
    first = asyncio.create_task(app.service.submit(job_request("imagine", "a", "one")))
    await asyncio.sleep(0.05)
    second = asyncio.create_task(app.service.submit(job_request("imagine", "b", "two"), on_event=events.append))
    await asyncio.sleep(0.05)
    queued = [e for e in events if e.state == "queued"]
    assert queued and queued[-1].position == 1
    job_id = queued[-1].job_id
    assert app.service.queue_position(job_id) == 1
    assert await app.service.cancel(job_id)
    cancelled = await second  # an outcome that says so (the caller was not itself cancelled)
    assert (cancelled.status, cancelled.error_code) == ("cancelled", "cancelled")
    assert app.jobs.get(job_id).status == "cancelled"
    assert available(app, "b") == usd_to_micros(1.0)
    assert (await first).ok and len(gen.calls) == 1


async def test_running_job_times_out_and_is_refunded(tmp_path):
    gen = PreparedGenerator(script=[10.0])
    app = make_app(tmp_path, gen, generation={"job_timeout_s": 0.1})
    out = await app.service.submit(job_request("imagine", "u1", "a fox"))
    assert out.status == "failed" and "longer than 0.1s" in out.error
    assert available(app) == usd_to_micros(1.0)


async def test_crash_mid_job_is_refunded_on_restart(tmp_path):
    app = make_app(tmp_path)
    job = app.jobs.create(kind="imagine", user_id="u1", prompt="x", status="running", owner="nohost-dead:1")
    app.ledger.reserve("u1", job.id, usd_to_micros(0.3))
    assert available(app) == usd_to_micros(0.7)
    # a job owned by a dead process on this host
    dead = app.jobs.create(kind="imagine", user_id="u1", prompt="y", status="queued",
                           owner=f"{os.uname().nodename}:999999999")
    app.ledger.reserve("u1", dead.id, usd_to_micros(0.1))
    app.db.close()
    restarted = make_app(tmp_path)
    assert restarted.jobs.get(dead.id).status == "failed"
    assert restarted.jobs.get(dead.id).error_code == "interrupted"
    # the other host's job is not ours to judge: it stays, and so does its money
    assert restarted.jobs.get(job.id).status == "running"
    assert available(restarted) == usd_to_micros(0.7)


async def test_variation_and_upscale_of_an_earlier_job(tmp_path):
    gen = PreparedGenerator()
    app = make_app(tmp_path, gen)
    first = await app.service.submit(job_request("imagine", "u1", "a fox --seed 1", size=(96, 64)))
    var = await app.service.submit(job_request("variation", "u1", seed=9, source_job_id=first.job.id))
    assert var.ok and var.job.prompt == "a fox" and var.job.seed == 9
    assert var.job.source_job_id == first.job.id and var.job.strength == 0.6
    assert gen.calls[-1].source_image == open(first.image_path, "rb").read()
    up = await app.service.submit(job_request("upscale", "u1"))  # defaults to the user's last image
    assert up.ok and (up.job.width, up.job.height) == (192, 128)
    assert up.job.source_job_id == var.job.id and gen.calls[-1].kind == "upscale"
    missing = await app.service.submit(job_request("variation", "u1", source_job_id=999))
    assert missing.error_code == "not_found" and "no job 999" in missing.error


async def test_edit_checks_uploads_before_spending(tmp_path):
    gen = PreparedGenerator()
    app = make_app(tmp_path, gen)
    image, mask = png_bytes(64, 64), png_bytes(32, 32)
    out = await app.service.submit(job_request("edit", "u1", "add a hat", image=b"<html>hi</html>"))
    assert out.error_code == "usage" and "HTML" in out.error
    out = await app.service.submit(job_request("edit", "u1", "add a hat", image=image, mask=mask))
    assert out.error_code == "usage" and "must match" in out.error
    ok = await app.service.submit(job_request("edit", "u1", "add a hat", image=image, mask=png_bytes(64, 64, 3)))
    assert ok.ok and gen.calls[-1].mask_image is not None
    # the inputs are kept, so the edit can be made again
    assert app.blobs.get(ok.job.source_sha256) == gen.calls[-1].source_image
    assert app.blobs.get(ok.job.mask_sha256) == gen.calls[-1].mask_image
    assert gen.calls == [gen.calls[-1]]  # nothing was generated for the refused ones


async def test_daily_spend_cap_stops_paid_generation(tmp_path):
    gen = PreparedGenerator(provider="openai", price_usd=0.04)
    app = make_app(tmp_path, gen, budget={"daily_spend_cap_usd": 0.1}, queue={"max_jobs_per_user": 5})
    outs = [await app.service.submit(job_request("imagine", f"user{i}", "a fox")) for i in range(3)]
    assert [o.status for o in outs] == ["done", "done", "refused"]
    assert outs[2].error_code == "spend_cap" and "daily spending cap of $0.10" in outs[2].error
    assert available(app, "user2") == usd_to_micros(1.0)
    assert app.jobs.spend_by_provider_since(0) == {"openai": usd_to_micros(0.08)}


async def test_local_generation_is_not_under_the_spend_cap(tmp_path):
    gen = PreparedGenerator(provider="local", price_usd=0.04)
    app = make_app(tmp_path, gen, budget={"daily_spend_cap_usd": 0.05})
    outs = [await app.service.submit(job_request("imagine", "u1", "a fox")) for _ in range(3)]
    assert all(o.ok for o in outs)


async def test_reservation_covers_the_dearest_fallback(tmp_path):
    cheap = PreparedGenerator(provider="p1", model="cheap", price_usd=0.01,
                              script=[TransientGeneratorError("down")] * 3)
    dear = PreparedGenerator(provider="p2", model="dear", price_usd=0.05)
    app = make_app(tmp_path, cheap, dear, generation={"default_model": "cheap"},
                   routing={"fallbacks": {"cheap": "dear"}})
    out = await app.service.submit(job_request("imagine", "u1", "a fox"))
    assert out.ok and out.job.model == "dear" and out.job.provider == "p2"
    assert out.job.estimate_micros == usd_to_micros(0.05) and out.job.cost_micros == usd_to_micros(0.05)


async def test_guild_cap_and_guild_default_model(tmp_path):
    from storage.preferences import GuildSettings

    cheap = PreparedGenerator(provider="p1", model="cheap", price_usd=0.01)
    dear = PreparedGenerator(provider="p2", model="dear", price_usd=0.3)
    app = make_app(tmp_path, cheap, dear, generation={"default_model": "cheap"})
    app.preferences.set_guild(GuildSettings("g1", default_model="dear", spend_cap_micros=usd_to_micros(0.5)))
    first = await app.service.submit(job_request("imagine", "u1", "a fox", guild_id="g1"))
    assert first.ok and first.job.model == "dear"
    second = await app.service.submit(job_request("imagine", "u2", "a fox", guild_id="g1"))
    assert second.error_code == "spend_cap" and "spending cap of $0.50" in second.error
    elsewhere = await app.service.submit(job_request("imagine", "u2", "a fox", guild_id="g2"))
    assert elsewhere.ok and elsewhere.job.model == "cheap"
    assert app.ledger.top_spenders(0, guild_id="g1") == [("u1", usd_to_micros(0.3))]
    assert app.ledger.spend_by_provider(0) == {"p2": usd_to_micros(0.3), "p1": usd_to_micros(0.01)}


async def test_an_alias_goes_to_the_cheapest_healthy_model(tmp_path):
    dear = PreparedGenerator(provider="p1", model="flux-a", price_usd=0.05)
    cheap = PreparedGenerator(provider="p2", model="flux-b", price_usd=0.01)
    for gen in (dear, cheap):
        gen.aliases = ("flux",)
    app = make_app(tmp_path, dear, cheap)
    out = await app.service.submit(job_request("imagine", "u1", "a fox --model flux"))
    assert out.ok and out.job.model == "flux-b"
    for _ in range(3):  # p2 fails until its breaker opens
        app.router.breakers["p2"].record_failure()
    out = await app.service.submit(job_request("imagine", "u1", "a fox --model flux"))
    assert out.ok and out.job.model == "flux-a"


async def test_without_a_model_named_a_capable_one_is_chosen(tmp_path):
    imagine_only = PreparedGenerator(provider="p1", model="painter", kinds=("imagine",))
    editor = PreparedGenerator(provider="p2", model="editor", price_usd=0.02)
    app = make_app(tmp_path, imagine_only, editor, generation={"default_model": "painter"})
    out = await app.service.submit(job_request("edit", "u1", "add a hat", image=png_bytes(64, 64)))
    assert out.ok and out.job.model == "editor"
    refused = await app.service.submit(job_request("edit", "u1", "add a hat", model="painter",
                                                   image=png_bytes(64, 64)))
    assert refused.error_code == "usage" and "painter cannot do edit" in refused.error


async def test_options_a_model_does_not_have_are_refused(tmp_path):
    app = make_app(tmp_path)
    out = await app.service.submit(job_request("imagine", "u1", "a fox", options={"quality": "hd"}))
    assert out.error_code == "usage" and "fake-model has no option 'quality'" in out.error


async def test_a_sampler_is_refused_by_a_model_that_takes_none(tmp_path):
    gen = PreparedGenerator()
    app = make_app(tmp_path, gen)
    out = await app.service.submit(job_request("imagine", "u1", "a fox --sampler euler_a"))
    assert out.status == "refused" and out.error_code == "usage"
    assert "has no option 'sampler'" in out.error
    assert gen.calls == [] and available(app) == usd_to_micros(1.0)
