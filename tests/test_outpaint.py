"""Outpainting on the cloud path: zoom out and pan an earlier result through gpt-image-1's edit
endpoint (the real openai SDK against the fake OpenAI), with the extended canvas and its mask,
and the original pixels put back exactly."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from bot.config import settings_from_dict
from bot.core.models import ErrorCode, Requester
from moderation import NoImageScreen
from tests.fakes.providers import FakeOpenAI
from tests.helpers import job_request, start_app


@pytest.fixture
async def openai(monkeypatch):
    async with FakeOpenAI() as fake:
        monkeypatch.setenv("OPENAI_API_KEY", fake.api_key)
        monkeypatch.setenv("OPENAI_BASE_URL", f"{fake.base_url}/v1")
        yield fake


@pytest.fixture
async def app(tmp_path, openai):
    app = start_app(settings_from_dict({
        "storage": {"database": str(tmp_path / "easel.db"), "images_dir": str(tmp_path / "images")},
        "generation": {"default_model": "gpt-image-1"},
        "generators": {"local": {"enabled": False}, "openai": {"timeout_s": 5}},
        "budget": {"default_allowance_usd": 5.0},
    }), image_screen=NoImageScreen())
    yield app
    await app.close()


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


async def first_image(app):
    out = await app.service.submit(job_request("imagine", "u1", "a harbour at dawn", guild_id="g1"))
    assert out.ok, out.error
    return out.job, pixels(app.blobs.get(out.job.sha256))


@pytest.mark.parametrize("direction, canvas, at", [
    ("left", (1536, 1024), (512, 0)),  # half again to the left: the original on the right
    ("right", (1536, 1024), (0, 0)),
    ("zoom", (2048, 2048), (512, 512)),  # twice the size around it
])
async def test_outpainting_extends_the_canvas_and_keeps_the_original_pixels_exactly(app, openai, direction,
                                                                                   canvas, at):
    source, original = await first_image(app)
    out = await app.service.outpaint(source.id, Requester("u1", "g1"), direction)
    assert out.ok, out.error
    job = out.job
    assert (job.kind, job.outpaint, job.source_job_id, job.prompt) == ("edit", direction, source.id, source.prompt)
    assert (job.width, job.height) == canvas
    [call] = openai.calls("POST", "/v1/images/edits")
    sent = Image.open(io.BytesIO(call.form["image"].data))
    mask = np.asarray(Image.open(io.BytesIO(call.form["mask"].data)).convert("RGBA"))[..., 3]
    assert sent.size == canvas and mask.shape == (canvas[1], canvas[0])
    x, y = at
    # OpenAI's mask is transparent where it may paint: everywhere but the original.
    assert (mask[y:y + 1024, x:x + 1024] == 255).all() and (mask == 0).sum() == canvas[0] * canvas[1] - 1024 * 1024
    result = pixels(app.blobs.get(job.sha256))
    assert result.shape == (canvas[1], canvas[0], 3)
    assert np.array_equal(result[y:y + 1024, x:x + 1024], original)  # the original, exactly
    assert job.cost_micros > 0 and app.ledger.held_job_ids() == []


async def test_rerolling_an_outpainting_extends_the_same_source_again(app, openai):
    source, original = await first_image(app)
    first = await app.service.outpaint(source.id, Requester("u1"), "up")
    again = await app.service.reroll(first.job.id, Requester("u1"))
    assert again.ok and (again.job.outpaint, again.job.source_job_id) == ("up", source.id)
    result = pixels(app.blobs.get(again.job.sha256))
    assert np.array_equal(result[512:, :], original)  # up: the original at the bottom


async def test_outpainting_another_members_private_result_is_refused_as_missing(app, openai):
    source, _ = await first_image(app)
    out = await app.service.outpaint(source.id, Requester("mallory", "g1"), "zoom")
    assert out.error_code == ErrorCode.NOT_FOUND and openai.calls("POST", "/v1/images/edits") == []


async def test_an_unknown_direction_is_refused(app, openai):
    source, _ = await first_image(app)
    out = await app.service.outpaint(source.id, Requester("u1"), "sideways")
    assert out.error_code == ErrorCode.USAGE and "zoom, left, right, up, down" in out.error
