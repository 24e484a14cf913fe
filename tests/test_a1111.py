"""The AUTOMATIC1111 generator against fake A1111 servers on 127.0.0.1 that speak its wire format
(tests/fakes/a1111_server.py): checkpoints and samplers, txt2img and img2img with masks,
progress and previews, spreading jobs over servers, servers that die or fail, cancellation, the
settings, `easel models`, and a job end to end through the app."""
from __future__ import annotations

import asyncio
import base64
import contextlib
import io

import pytest
from PIL import Image

from bot.config import settings_from_dict
from bot.core.models import GeneratorError, GeneratorUnavailable, TransientGeneratorError
from generators.a1111 import Automatic1111, sampler_slug
from moderation import NoImageScreen
from tests.fakes.a1111_server import CHECKPOINTS, FakeA1111
from tests.fakes.providers import image_bytes
from tests.helpers import closed_url, generation_request, job_request, start_app, write_config

SD15 = "a1111/v1-5-pruned-emaonly"


@pytest.fixture(scope="module")
def shared():
    """One fake for the tests that change no switch."""
    with FakeA1111() as server:
        yield server


@pytest.fixture
def fake():
    with FakeA1111() as server:
        yield server


@contextlib.asynccontextmanager
async def a1111(servers, **kw):
    kw.setdefault("poll_interval_s", 0.01)
    gen = Automatic1111(servers, **kw)
    try:
        yield gen
    finally:
        await gen.close()



def sd15(kind="imagine", **fields):
    fields.setdefault("prompt", "a lighthouse at dusk")
    fields.setdefault("steps", 4)
    fields.setdefault("width", 64)
    fields.setdefault("height", 64)
    return generation_request(kind, model=SD15, **fields)


def png_of(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


@pytest.mark.parametrize(("name", "slug"), [("DPM++ 2M Karras", "dpmpp_2m_karras"), ("Euler a", "euler_a"),
                                            ("DDIM", "ddim")])
def test_sampler_names_become_option_values(name, slug):
    assert sampler_slug(name) == slug


async def test_models_and_samplers_come_from_the_servers_once(shared):
    before = len(shared.calls("GET", "/sdapi/v1/sd-models"))
    async with a1111([shared.base_url]) as gen:
        specs = gen.models()
        assert gen.models() == specs and gen.unavailable_reason() is None
    assert [s.name for s in specs] == [SD15, "a1111/sd_xl_base_1.0"]
    assert specs[0].options == {"sampler": ("default", "dpmpp_2m", "dpmpp_sde", "euler_a", "euler", "ddim", "unipc")}
    assert specs[0].kinds == {"imagine", "variation", "edit"} and specs[1].default_size == (1024, 1024)
    assert len(shared.calls("GET", "/sdapi/v1/sd-models")) == before + 1


async def test_configured_models_are_offered_by_name_or_title(shared):
    async with a1111([shared.base_url], models=["sd_xl_base_1.0.safetensors [31e35c80fc]"]) as gen:
        assert [s.name for s in gen.models()] == ["a1111/sd_xl_base_1.0"]


async def test_txt2img_sends_typed_values_reports_progress_and_records_the_seed(fake):
    fake.step_delay_s = 0.03
    seen = []
    async with a1111([fake.base_url]) as gen:
        req = sd15(seed=42, width=128, height=96, guidance=5.5, negative_prompt="fog", options={"sampler": "dpmpp_2m"})
        result = await gen.generate(req, lambda f, p: seen.append((f, p)))
    assert (result.width, result.height, result.seed, result.model, result.provider) == (128, 96, 42, SD15, "a1111")
    [call] = fake.calls("POST", "/sdapi/v1/txt2img")
    body = call.json
    assert {k: body[k] for k in ("prompt", "negative_prompt", "seed", "width", "height", "steps", "cfg_scale",
                                 "sampler_name", "batch_size", "n_iter")} == {
        "prompt": "a lighthouse at dusk", "negative_prompt": "fog", "seed": 42, "width": 128, "height": 96,
        "steps": 4, "cfg_scale": 5.5, "sampler_name": "DPM++ 2M", "batch_size": 1, "n_iter": 1}
    assert body["override_settings"] == {"sd_model_checkpoint": CHECKPOINTS[0]["title"]}
    fractions = [f for f, _ in seen]
    assert fractions and fractions == sorted(fractions) and 0 < max(fractions) <= 1
    previews = [p for _, p in seen if p is not None]
    assert previews and all(Image.open(io.BytesIO(p)).format == "PNG" for p in previews)
    assert fake.calls("GET", "/sdapi/v1/progress")


async def test_the_seed_recorded_is_the_one_info_reports(shared):
    async with a1111([shared.base_url]) as gen:
        result = await gen.generate(sd15())  # no seed asked: the generator chooses and sends one
    body = shared.calls("POST", "/sdapi/v1/txt2img")[-1].json
    assert isinstance(body["seed"], int) and result.seed == body["seed"]
    assert "sampler_name" not in body  # the server's default sampler


async def test_an_edit_sends_the_image_and_mask_to_img2img(shared):
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))
    buf = io.BytesIO()
    mask.save(buf, format="PNG")
    async with a1111([shared.base_url]) as gen:
        result = await gen.generate(sd15("edit", seed=3, source_image=image_bytes(64, 64), mask_image=buf.getvalue()))
        await gen.generate(sd15("variation", seed=4, source_image=image_bytes(64, 64), strength=0.3))
    assert result.seed == 3
    edit, variation = [c.json for c in shared.calls("POST", "/sdapi/v1/img2img")[-2:]]
    assert png_of(edit["init_images"][0]).size == (64, 64)
    sent_mask = png_of(edit["mask"])
    assert sent_mask.getpixel((5, 5)) == 255 and sent_mask.getpixel((50, 5)) == 0
    assert (edit["denoising_strength"], edit["inpainting_fill"], edit["inpaint_full_res"],
            edit["inpainting_mask_invert"]) == (1.0, 1, False, 0)
    assert variation["denoising_strength"] == 0.3 and "mask" not in variation


async def test_a_job_goes_to_the_least_loaded_server():
    with FakeA1111() as busy, FakeA1111() as idle:
        busy.busy_jobs = 1
        async with a1111([busy.base_url, idle.base_url]) as gen:
            await gen.generate(sd15(seed=1))
        assert busy.calls("POST", "/sdapi/v1/txt2img") == [] and len(idle.calls("POST", "/sdapi/v1/txt2img")) == 1
        assert busy.calls("GET", "/sdapi/v1/progress")


async def test_a_dead_server_is_skipped():
    with FakeA1111() as dying, FakeA1111() as healthy:
        async with a1111([dying.base_url, healthy.base_url]) as gen:
            gen.models()  # both listed their checkpoints
            dying.down = True  # now it drops every connection
            assert (await gen.generate(sd15(seed=1))).seed == 1
            assert not gen._pool.is_up(gen._pool.servers[0])
        assert len(healthy.calls("POST", "/sdapi/v1/txt2img")) == 1


async def test_a_server_dying_mid_job_is_transient(fake):
    fake.step_delay_s, fake.die_after_steps = 0.01, 1
    async with a1111([fake.base_url]) as gen:
        with pytest.raises(TransientGeneratorError, match=f"AUTOMATIC1111 at {fake.base_url} failed mid-job: "
                                                          "the server closed the connection"):
            await gen.generate(sd15(seed=1))
        with pytest.raises(GeneratorUnavailable, match="no AUTOMATIC1111 server is up"):
            await gen.generate(sd15(seed=1))


async def test_a_server_error_is_a_clear_error(shared):
    shared.fail_with = "CUDA out of memory. Tried to allocate 2.00 GiB"
    try:
        async with a1111([shared.base_url]) as gen:
            with pytest.raises(GeneratorError) as caught:
                await gen.generate(sd15(seed=1))
    finally:
        shared.fail_with = None
    assert caught.value.transient
    assert str(caught.value) == (f"AUTOMATIC1111 at {shared.base_url} failed with HTTP 500: OutOfMemoryError: "
                                 "CUDA out of memory. Tried to allocate 2.00 GiB")


async def test_cancelling_a_job_interrupts_it(fake):
    fake.step_delay_s = 0.05
    started = asyncio.Event()
    async with a1111([fake.base_url]) as gen:
        task = asyncio.create_task(gen.generate(sd15(seed=1, steps=60), lambda f, p: started.set()))
        await asyncio.wait_for(started.wait(), 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert len(fake.calls("POST", "/sdapi/v1/interrupt")) == 1


async def test_without_an_answering_server_it_is_unavailable_unless_models_are_listed():
    dead = closed_url()
    async with a1111([dead], discovery_timeout_s=1) as gen:
        assert gen.models() == []
        assert gen.unavailable_reason().startswith(f"no AUTOMATIC1111 server listed its checkpoints ({dead}: ")
    async with a1111([dead], models=["my-model"]) as gen:
        assert [s.name for s in gen.models()] == ["a1111/my-model"] and gen.unavailable_reason() is None
        assert gen.models()[0].options == {"sampler": ("default",)}
        with pytest.raises(GeneratorUnavailable, match=f"no AUTOMATIC1111 server answered: {dead}: cannot connect"):
            await gen.generate(generation_request(model="a1111/my-model", prompt="x", seed=1))


# --- settings, easel models and the app ------------------------------------------------------


def test_settings_build_the_generator_only_with_servers():
    s = settings_from_dict({})
    assert s.generators.a1111.generator_kwargs(s) is None
    s = settings_from_dict({"generators": {"a1111": {"servers": ["http://gpu1:7860"], "models": ["sd_xl_base_1.0"],
                                                     "sampler": "Euler a", "price_per_image_usd": 0.001}}})
    assert s.generators.a1111.generator_kwargs(s) == {
        "servers": ["http://gpu1:7860"], "models": ["sd_xl_base_1.0"], "sampler": "Euler a",
        "price_per_image_usd": 0.001, "timeout_s": 300.0}


def test_easel_models_lists_the_servers_checkpoints_and_samplers(shared, tmp_path, capsys):
    from bot.cli import main

    conf = write_config(tmp_path / "easel.toml", {
        "storage": {"database": str(tmp_path / "easel.db"), "images_dir": str(tmp_path / "images")},
        "generators.local": {"enabled": False},
        "generators.a1111": {"servers": [shared.base_url]},
    })
    assert main(["--config", str(conf), "models"]) == 0
    out = capsys.readouterr().out
    assert f"{SD15} " in out and "a1111/sd_xl_base_1.0" in out
    assert "sampler: default|dpmpp_2m|dpmpp_sde|euler_a|euler|ddim|unipc" in out


async def test_a_job_end_to_end_is_seeded_stored_and_free(shared, tmp_path):
    settings = settings_from_dict({
        "storage": {"database": str(tmp_path / "easel.db"), "images_dir": str(tmp_path / "images")},
        "generation": {"default_model": SD15},
        "generators": {"local": {"enabled": False}, "a1111": {"servers": [shared.base_url]}},
    })
    app = start_app(settings, image_screen=NoImageScreen())
    try:
        out = await app.service.submit(job_request("imagine", "u1", "a lighthouse --seed 42 --sampler euler_a",
                                                   size=(128, 128), steps=3))
        assert out.ok, out.error
        job = out.job
        assert (job.seed, job.model, job.provider, job.width, job.height) == (42, SD15, "a1111", 128, 128)
        assert job.cost_micros == 0 and app.blobs.exists(job.sha256) and job.options == {"sampler": "euler_a"}
        body = shared.calls("POST", "/sdapi/v1/txt2img")[-1].json
        assert (body["seed"], body["sampler_name"], body["steps"]) == (42, "Euler a", 3)
    finally:
        await app.close()
