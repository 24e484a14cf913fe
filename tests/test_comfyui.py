"""The ComfyUI generator against fake ComfyUI servers on 127.0.0.1 that speak its wire format
(tests/fakes/comfyui_server.py): workflows and their placeholders, progress and previews over
the websocket, uploads for edits, spreading jobs over servers, servers that die or fail,
cancellation, the settings, and a job end to end through the app."""
from __future__ import annotations

import asyncio
import contextlib
import io
import json
import re

import pytest
from PIL import Image

from bot.config import ConfigError, settings_from_dict
from bot.core.models import GeneratorError, GeneratorUnavailable, TransientGeneratorError, UnsupportedRequest
from bot.core.routing import RetryPolicy, Router
from generators.comfyui import ComfyUI, load_workflow
from moderation import NoImageScreen
from tests.fakes.comfyui_server import FakeComfyUI
from tests.fakes.providers import image_bytes
from tests.helpers import closed_url, generation_request, job_request, start_app

TXT2IMG = {
    "3": {"class_type": "KSampler", "inputs": {
        "seed": "$seed", "steps": "$steps", "cfg": "$guidance", "sampler_name": "euler", "scheduler": "normal",
        "denoise": 1, "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}},
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "v1-5-pruned-emaonly.safetensors"}},
    "5": {"class_type": "EmptyLatentImage", "inputs": {"width": "$width", "height": "$height", "batch_size": 1}},
    "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "$prompt", "clip": ["4", 1]}},
    "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "$negative", "clip": ["4", 1]}},
    "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
    "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "easel", "images": ["8", 0]}},
}


def inpaint_workflow() -> dict:
    graph = json.loads(json.dumps(TXT2IMG))
    del graph["5"]
    graph["3"]["inputs"].update(latent_image=["12", 0], denoise="$strength")
    graph["10"] = {"class_type": "LoadImage", "inputs": {"image": "$image"}}
    graph["11"] = {"class_type": "LoadImageMask", "inputs": {"image": "$mask", "channel": "red"}}
    graph["13"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["10", 0], "vae": ["4", 2]}}
    graph["12"] = {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["13", 0], "mask": ["11", 0]}}
    return graph


def fixed_workflow() -> dict:
    """No $seed, $negative, $steps, $guidance or size placeholders: a fixed 768x512 workflow."""
    graph = json.loads(json.dumps(TXT2IMG))
    graph["3"]["inputs"].update(seed=7, steps=3, cfg=6.5)
    graph["5"]["inputs"].update(width=768, height=512)
    graph["7"]["inputs"]["text"] = "blurry"
    return graph


@pytest.fixture
def workflows(tmp_path):
    files = {"sd15": TXT2IMG, "sd15-inpaint": inpaint_workflow(), "fixed": fixed_workflow()}
    for name, graph in files.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(graph))
    return {name: str(tmp_path / f"{name}.json") for name in files}


@pytest.fixture
async def fake():
    async with FakeComfyUI() as server:
        yield server


@contextlib.asynccontextmanager
async def comfy(servers, workflows, **kw):
    gen = ComfyUI(servers, workflows, **kw)
    try:
        yield gen
    finally:
        await gen.close()



def sd15(**fields):
    fields.setdefault("prompt", "a lighthouse at dusk")
    fields.setdefault("steps", 4)
    return generation_request("imagine", model="sd15", **fields)


async def test_txt2img_reports_progress_and_previews_and_records_the_seed(fake, workflows):
    seen = []
    async with comfy([fake.base_url], workflows) as gen:
        result = await gen.generate(sd15(seed=42, width=128, height=96), lambda f, p: seen.append((f, p)))
    assert (result.width, result.height, result.seed, result.model, result.provider) == (128, 96, 42, "sd15", "comfyui")
    assert Image.open(io.BytesIO(result.data)).format == "PNG"
    assert [f for f, p in seen if p is None] == [0.25, 0.5, 0.75, 1.0]
    previews = [p for f, p in seen if p is not None]
    assert len(previews) == 4 and all(Image.open(io.BytesIO(p)).format == "PNG" for p in previews)
    [submitted] = fake.calls("POST", "/prompt")
    assert len(submitted.json["client_id"]) == 32


async def test_placeholders_are_replaced_by_typed_values(fake, workflows):
    async with comfy([fake.base_url], workflows) as gen:
        await gen.generate(sd15(seed=123, width=64, height=80, steps=2, guidance=5, negative_prompt="fog"))
    [prompt] = fake.prompts.values()
    graph = prompt.graph
    assert graph["3"]["inputs"] | {} == {**TXT2IMG["3"]["inputs"], "seed": 123, "steps": 2, "cfg": 5.0}
    assert type(graph["3"]["inputs"]["cfg"]) is float and type(graph["3"]["inputs"]["seed"]) is int
    assert graph["5"]["inputs"] == {"width": 64, "height": 80, "batch_size": 1}
    assert graph["6"]["inputs"]["text"] == "a lighthouse at dusk" and graph["7"]["inputs"]["text"] == "fog"
    assert graph["4"] == TXT2IMG["4"]  # untouched


async def test_capabilities_follow_the_placeholders(workflows):
    specs = {s.name: s for s in ComfyUI(["http://gpu1:8188"], workflows).models()}
    assert specs["sd15"].kinds == {"imagine"} and specs["sd15"].honours_seed and specs["sd15"].negative_prompt
    assert specs["sd15"].sizes is None and specs["sd15"].steps and specs["sd15"].guidance
    assert specs["sd15-inpaint"].kinds == {"edit"}
    fixed = specs["fixed"]
    assert (fixed.honours_seed, fixed.negative_prompt, fixed.steps, fixed.guidance) == (False, False, None, None)
    assert fixed.sizes == ((768, 512),) and fixed.default_size == (768, 512)


async def test_a_request_the_workflow_cannot_serve_is_refused_before_anything_is_sent(fake, workflows):
    async with comfy([fake.base_url], workflows) as gen:
        with pytest.raises(UnsupportedRequest, match="does not take a seed"):
            await gen.generate(generation_request(model="fixed", prompt="x", width=768, height=512, seed=1))
        with pytest.raises(UnsupportedRequest, match="cannot do variation"):
            await gen.generate(generation_request("variation", model="sd15", prompt="x", source_image=image_bytes(64, 64)))
    assert fake.requests == []


async def test_a_workflow_without_a_seed_records_none(fake, workflows):
    async with comfy([fake.base_url], workflows) as gen:
        result = await gen.generate(generation_request(model="fixed", prompt="x", width=768, height=512))
    assert result.seed is None and (result.width, result.height) == (768, 512)
    assert next(iter(fake.prompts.values())).graph["3"]["inputs"]["seed"] == 7


@pytest.mark.parametrize(("content", "message"), [
    (None, "no such file"),
    ("{not json", "is not valid JSON"),
    (json.dumps({"nodes": [], "links": [], "version": 0.4}), re.escape("UI format; export it with \"Save (API Format)\"")),
    (json.dumps([1, 2]), "is not in API format"),
    (json.dumps({"1": {"class_type": "SaveImage", "inputs": {"filename_prefix": "x"}}}), re.escape("has no \"$prompt\"")),
    (json.dumps({"1": {"class_type": "X", "inputs": {"text": "$prompt", "s": "$sed", "width": 8, "height": 8}}}),
     "unknown placeholders \\$sed"),
    (json.dumps({"1": {"class_type": "X", "inputs": {"text": "$prompt"}}}), "neither \\$width/\\$height"),
])
def test_a_bad_workflow_file_is_refused_naming_the_file(tmp_path, content, message):
    path = tmp_path / "broken_api.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=message) as caught:
        load_workflow("broken", path)
    assert str(path) in str(caught.value)


async def test_an_edit_uploads_the_image_and_the_mask(fake, workflows):
    source = image_bytes(96, 64)
    mask = Image.new("L", (96, 64), 0)
    mask.paste(255, (0, 0, 48, 64))
    buf = io.BytesIO()
    mask.save(buf, format="PNG")
    async with comfy([fake.base_url], workflows) as gen:
        result = await gen.generate(generation_request(
            "edit", model="sd15-inpaint", prompt="a red door", width=96, height=64, seed=9,
            source_image=source, mask_image=buf.getvalue()))
    assert (result.width, result.height, result.seed) == (96, 64, 9)
    graph = next(iter(fake.prompts.values())).graph
    image_name, mask_name = graph["10"]["inputs"]["image"], graph["11"]["inputs"]["image"]
    assert image_name != mask_name and {image_name, mask_name} == set(fake.uploads)
    assert Image.open(io.BytesIO(fake.uploads[image_name])).size == (96, 64)
    uploaded_mask = Image.open(io.BytesIO(fake.uploads[mask_name]))
    assert uploaded_mask.mode == "L" and uploaded_mask.getpixel((10, 10)) == 255 and uploaded_mask.getpixel((80, 10)) == 0
    assert graph["3"]["inputs"]["denoise"] == 1.0  # an edit's default strength
    assert all(c.form["overwrite"][1] == b"true" for c in fake.calls("POST", "/upload/image"))


async def test_a_job_goes_to_the_least_loaded_server_and_two_jobs_spread(workflows):
    async with FakeComfyUI() as busy, FakeComfyUI() as idle:
        busy.others_pending = 3
        async with comfy([busy.base_url, idle.base_url], workflows) as gen:
            await gen.generate(sd15(seed=1, width=64, height=64))
            assert (len(busy.prompts), len(idle.prompts)) == (0, 1)
            busy.others_pending = 0
            busy.step_delay_s = idle.step_delay_s = 0.02
            await asyncio.gather(gen.generate(sd15(seed=2, width=64, height=64)),
                                 gen.generate(sd15(seed=3, width=64, height=64)))
        assert (len(busy.prompts), len(idle.prompts)) == (1, 2)
        assert busy.calls("GET", "/system_stats") and idle.calls("GET", "/queue")


async def test_a_dead_server_is_skipped_and_left_out_for_a_while(fake, workflows):
    dead = closed_url()
    async with comfy([dead, fake.base_url], workflows) as gen:
        assert (await gen.generate(sd15(seed=1, width=64, height=64))).seed == 1
        assert gen._pool.servers[0].problem.startswith("cannot connect")
        assert not gen._pool.is_up(gen._pool.servers[0])
    async with comfy([dead], workflows) as gen:
        with pytest.raises(GeneratorUnavailable, match=f"no ComfyUI server answered: {dead}: cannot connect"):
            await gen.generate(sd15(seed=1, width=64, height=64))


async def test_a_server_dying_mid_job_is_transient_and_the_router_retries_elsewhere(workflows):
    async with FakeComfyUI() as dying, FakeComfyUI() as healthy:
        healthy.others_pending = 1  # the dying one is picked first
        dying.die_after_steps = 1
        async with comfy([dying.base_url, healthy.base_url], workflows) as gen:
            with pytest.raises(TransientGeneratorError, match=f"ComfyUI at {dying.base_url} failed mid-job"):
                await gen.generate(sd15(seed=5, width=64, height=64))
            router = Router([gen], retry=RetryPolicy(attempts=2, base_delay_s=0))
            dying.die_after_steps = None
            result = await router.generate(router.resolve("sd15"), sd15(seed=5, width=64, height=64))
        assert result.seed == 5 and len(healthy.prompts) == 1


async def test_a_workflow_the_server_refuses_is_a_clear_error(fake, tmp_path):
    graph = json.loads(json.dumps(TXT2IMG))
    graph["4"]["inputs"]["ckpt_name"] = "missing.safetensors"
    (tmp_path / "bad.json").write_text(json.dumps(graph))
    async with comfy([fake.base_url], {"bad": tmp_path / "bad.json"}) as gen:
        with pytest.raises(GeneratorError) as caught:
            await gen.generate(generation_request(model="bad", prompt="x", seed=1))
    assert not caught.value.transient
    assert str(caught.value) == (
        "ComfyUI refused workflow bad (HTTP 400): Prompt outputs failed validation; node 4 "
        "(CheckpointLoaderSimple): Value not in list: ckpt_name: 'missing.safetensors' not in "
        "['v1-5-pruned-emaonly.safetensors', 'sd_xl_base_1.0.safetensors']")


async def test_an_untyped_value_is_what_comfyui_refuses(fake, tmp_path):
    """The fake refuses a string where an INT is due, as ComfyUI does: typed substitution matters."""
    graph = json.loads(json.dumps(TXT2IMG))
    graph["3"]["inputs"]["steps"] = "20"
    (tmp_path / "str.json").write_text(json.dumps(graph))
    async with comfy([fake.base_url], {"str": tmp_path / "str.json"}) as gen:
        with pytest.raises(GeneratorError, match="node 3 \\(KSampler\\): Failed to convert an input value to a INT"):
            await gen.generate(generation_request(model="str", prompt="x", seed=1))


async def test_an_execution_error_is_a_clear_error(fake, workflows):
    fake.fail_after_steps = (1, "Allocation on device 0 would exceed allowed memory.")
    async with comfy([fake.base_url], workflows) as gen:
        with pytest.raises(GeneratorError) as caught:
            await gen.generate(sd15(seed=1, width=64, height=64))
    assert str(caught.value) == ("ComfyUI workflow sd15 failed in node 3 (KSampler): torch.OutOfMemoryError: "
                                 "Allocation on device 0 would exceed allowed memory.")


async def test_cancelling_a_running_job_interrupts_it(fake, workflows):
    fake.step_delay_s, fake_steps = 0.05, 40
    started = asyncio.Event()
    async with comfy([fake.base_url], workflows) as gen:
        task = asyncio.create_task(gen.generate(sd15(seed=1, width=64, height=64, steps=fake_steps),
                                                lambda f, p: started.set()))
        await asyncio.wait_for(started.wait(), 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        [prompt] = fake.prompts.values()
        assert [c.json for c in fake.calls("POST", "/interrupt")] == [{"prompt_id": prompt.prompt_id}]
        assert prompt.interrupted and fake.calls("POST", "/queue") == []


async def test_cancelling_a_waiting_job_deletes_it_from_the_queue(fake, workflows):
    fake.paused = True
    async with comfy([fake.base_url], workflows) as gen:
        task = asyncio.create_task(gen.generate(sd15(seed=1, width=64, height=64)))
        for _ in range(200):
            if fake.pending:
                break
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    [prompt] = fake.prompts.values()
    assert [c.json for c in fake.calls("POST", "/queue")] == [{"delete": [prompt.prompt_id]}]
    assert fake.pending == [] and fake.calls("POST", "/interrupt") == []


# --- settings and the app ----------------------------------------------------------------------


def test_settings_build_the_generator_only_with_servers(tmp_path, workflows):
    assert settings_from_dict({}).generators.comfyui.generator_kwargs(settings_from_dict({})) is None
    s = settings_from_dict({"generators": {"comfyui": {
        "servers": ["http://gpu1:8188", "http://gpu2:8188/"], "workflows": {"sd15": "wf/sd15_api.json"},
        "price_per_image_usd": 0.002, "timeout_s": 90}}})
    kwargs = s.generators.comfyui.generator_kwargs(s)
    assert kwargs == {"servers": ["http://gpu1:8188", "http://gpu2:8188/"],
                      "workflows": {"sd15": str(s.base_dir / "wf/sd15_api.json")},
                      "price_per_image_usd": 0.002, "timeout_s": 90.0}
    with pytest.raises(ConfigError, match="'generators.comfyui.servers' must be http:// or https:// URLs"):
        settings_from_dict({"generators": {"comfyui": {"servers": ["gpu1:8188"]}}})


def test_a_missing_workflow_file_stops_start_up_naming_it(tmp_path):
    from bot.bootstrap import build_generators

    s = settings_from_dict({"generators": {"local": {"enabled": False}, "comfyui": {
        "servers": ["http://gpu1:8188"], "workflows": {"sd15": str(tmp_path / "nope.json")}}}})
    with pytest.raises(ConfigError, match="'generators.comfyui': ComfyUI workflow 'sd15' .*nope.json\\): no such file"):
        build_generators(s)


async def test_a_job_end_to_end_is_seeded_stored_and_free(tmp_path, fake, workflows):
    settings = settings_from_dict({
        "storage": {"database": str(tmp_path / "easel.db"), "images_dir": str(tmp_path / "images")},
        "generation": {"default_model": "sd15"},
        "generators": {"local": {"enabled": False},
                       "comfyui": {"servers": [fake.base_url], "workflows": workflows}},
    })
    app = start_app(settings, image_screen=NoImageScreen())
    try:
        out = await app.service.submit(job_request("imagine", "u1", "a lighthouse --seed 42", size=(128, 128)))
        assert out.ok, out.error
        job = out.job
        assert (job.seed, job.model, job.provider, job.width, job.height) == (42, "sd15", "comfyui", 128, 128)
        assert job.cost_micros == 0 and app.blobs.exists(job.sha256)
        assert next(iter(fake.prompts.values())).graph["3"]["inputs"]["seed"] == 42
    finally:
        await app.close()


def test_importing_the_gpu_server_generators_loads_no_http_client():
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys, generators.comfyui, generators.a1111, generators.gpu_servers;"
            "print([m for m in ('aiohttp', 'httpx', 'requests') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parent.parent,
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


async def test_a_variation_uploads_the_source_at_the_requested_size(fake, tmp_path):
    graph = inpaint_workflow()
    del graph["11"], graph["12"]
    graph["3"]["inputs"]["latent_image"] = ["13", 0]
    (tmp_path / "img2img.json").write_text(json.dumps(graph))
    async with comfy([fake.base_url], {"img2img": tmp_path / "img2img.json"}) as gen:
        assert gen.models()[0].kinds == {"variation"}
        result = await gen.generate(generation_request(
            "variation", model="img2img", prompt="x", width=96, height=64, seed=2, strength=0.3,
            source_image=image_bytes(100, 60)))
    assert (result.width, result.height) == (96, 64)
    sent = next(iter(fake.prompts.values())).graph
    assert Image.open(io.BytesIO(fake.uploads[sent["10"]["inputs"]["image"]])).size == (96, 64)
    assert sent["3"]["inputs"]["denoise"] == 0.3


async def test_a_job_past_its_timeout_is_transient_and_stopped_on_the_server(fake, workflows):
    fake.step_delay_s = 0.2
    async with comfy([fake.base_url], workflows, timeout_s=0.3) as gen:
        with pytest.raises(TransientGeneratorError, match=f"ComfyUI at {fake.base_url} did not finish within 0.3 s"):
            await gen.generate(sd15(seed=1, width=64, height=64))
    [prompt] = fake.prompts.values()
    assert [c.json for c in fake.calls("POST", "/interrupt")] == [{"prompt_id": prompt.prompt_id}]
