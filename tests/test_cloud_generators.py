"""The cloud generators, through the real `openai` and `replicate` SDKs, against local fakes that
speak each provider's wire format (tests/fakes/providers.py)."""
from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import socket
import subprocess
import sys
import time
import traceback
from email.utils import formatdate
from pathlib import Path

import aiohttp
import pytest
from PIL import Image

from bot.core.models import (
    ContentPolicyError,
    GenerationRequest,
    GeneratorError,
    TransientGeneratorError,
    UnsupportedRequest,
)
from generators.download import (
    ImageDownloadFailed,
    InvalidProviderImage,
    fetch_image,
    parse_retry_after,
)
from generators.openai_images import OpenAIImages
from generators.replicate_flux import ReplicateFlux
from generators.together_flux import TogetherFlux
from tests.fakes.providers import (
    HTML_ERROR_PAGE,
    FakeOpenAI,
    FakeReplicate,
    FakeTogether,
    HostPolicy,
    Outcome,
    Reply,
    decompression_bomb_png,
    html_page,
    image_bytes,
    openai_error,
    replicate_error,
    truncated_png,
)
from tests.helpers import generation_request

PROMPT = "a red fox asleep in fresh snow, watercolour"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REPO = Path(__file__).resolve().parent.parent


def request(model: str, width: int = 1024, height: int = 1024, **fields) -> GenerationRequest:
    kind, prompt = fields.pop("kind", "imagine"), fields.pop("prompt", PROMPT)
    return generation_request(kind, model=model, prompt=prompt, width=width, height=height, **fields)


def decoded_size(png: bytes) -> tuple[int, int]:
    assert png.startswith(PNG_MAGIC)
    with Image.open(io.BytesIO(png)) as img:
        return img.size


def assert_secret_absent(exc: BaseException, secret: str) -> None:
    """Not in the message, the repr, nor anything a logged traceback would print."""
    assert secret not in str(exc)
    assert secret not in repr(exc)
    assert secret not in "".join(traceback.format_exception(exc))


@contextlib.asynccontextmanager
async def opened(generator):
    try:
        yield generator
    finally:
        await generator.close()


def openai_at(fake: FakeOpenAI, api_key: str | None = None, timeout_s: float = 3, **kw) -> OpenAIImages:
    return OpenAIImages(api_key or fake.api_key, base_url=f"{fake.base_url}/v1", timeout_s=timeout_s, **kw)


def replicate_at(fake: FakeReplicate, api_key: str | None = None, timeout_s: float = 3) -> ReplicateFlux:
    return ReplicateFlux(api_key or fake.api_key, base_url=fake.base_url, timeout_s=timeout_s)


def together_at(fake: FakeTogether, timeout_s: float = 3) -> TogetherFlux:
    return TogetherFlux(fake.api_key, base_url=f"{fake.base_url}/v1", timeout_s=timeout_s)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
async def openai_fake():
    async with FakeOpenAI() as fake:
        yield fake


@pytest.fixture
async def openai_gen(openai_fake):
    async with opened(openai_at(openai_fake)) as gen:
        yield gen


@pytest.fixture
async def replicate_fake(monkeypatch):
    monkeypatch.setenv("REPLICATE_POLL_INTERVAL", "0.01")
    async with FakeReplicate() as fake:
        yield fake


@pytest.fixture
async def replicate_gen(replicate_fake):
    async with opened(replicate_at(replicate_fake)) as gen:
        yield gen


@pytest.fixture
async def together_fake():
    async with FakeTogether() as fake:
        yield fake


@pytest.fixture
async def together_gen(together_fake):
    async with opened(together_at(together_fake)) as gen:
        yield gen


# --- OpenAI ---------------------------------------------------------------------------------


async def test_dalle3_sends_the_exact_request_and_keeps_the_revised_prompt(openai_fake, openai_gen):
    result = await openai_gen.generate(
        request("dalle", 1792, 1024, options={"quality": "hd", "style": "natural"})
    )

    [call] = openai_fake.calls("POST", "/v1/images/generations")
    assert call.json == {
        "model": "dall-e-3",
        "prompt": PROMPT,
        "size": "1792x1024",
        "n": 1,
        "quality": "hd",
        "style": "natural",
        "response_format": "b64_json",
    }
    assert call.headers["content-type"] == "application/json"
    assert (result.width, result.height) == (1792, 1024) == decoded_size(result.data)
    assert (result.model, result.provider, result.seed) == ("dall-e-3", "openai", None)
    assert result.cost_usd == pytest.approx(0.12)
    assert result.revised_prompt == f"A detailed illustration of {PROMPT}"


async def test_a_url_output_is_fetched_before_generate_returns(openai_fake, openai_gen):
    openai_fake.force_url = True
    openai_fake.output_policy = HostPolicy(expire_after=1)  # the URL dies after one fetch

    result = await openai_gen.generate(request("dall-e-3"))

    assert decoded_size(result.data) == (1024, 1024)
    [(name, hosted)] = openai_fake.hosted.items()
    assert hosted.served == 1
    url = f"{openai_fake.base_url}/files/{name}"
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        assert resp.status == 404


async def test_gpt_image_1_asks_for_png_without_response_format_and_bills_its_tokens(openai_fake, openai_gen):
    result = await openai_gen.generate(request("gpt-image", 1536, 1024))

    [call] = openai_fake.calls("POST", "/v1/images/generations")
    assert call.json == {
        "model": "gpt-image-1",
        "prompt": PROMPT,
        "size": "1536x1024",
        "n": 1,
        "quality": "medium",
        "output_format": "png",
    }
    assert decoded_size(result.data) == (1536, 1024)
    assert result.revised_prompt is None
    text_tokens = len(PROMPT.split())  # what the fake reports in `usage`
    assert result.cost_usd == pytest.approx((text_tokens * 5 + 1584 * 40) / 1e6)


async def test_gpt_image_1_edit_sends_the_image_and_an_alpha_mask_as_multipart(openai_fake, openai_gen):
    source = image_bytes(1024, 1024, shade=90)
    mask = Image.new("L", (1024, 1024), 0)
    mask.paste(255, (0, 0, 512, 1024))  # white: repaint the left half
    mask_png = io.BytesIO()
    mask.save(mask_png, format="PNG")

    edit = request(
        "gpt-image-1",
        kind="edit",
        source_image=source,
        mask_image=mask_png.getvalue(),
        options={"quality": "high"},
    )
    result = await openai_gen.generate(edit)

    [call] = openai_fake.calls("POST", "/v1/images/edits")
    assert call.headers["content-type"].startswith("multipart/form-data; boundary=")
    fields = {name: part.text for name, part in call.form.items() if part.filename is None}
    assert fields == {
        "model": "gpt-image-1",
        "prompt": PROMPT,
        "size": "1024x1024",
        "n": "1",
        "quality": "high",
        "output_format": "png",
    }
    image_part, mask_part = call.form["image"], call.form["mask"]
    assert (image_part.filename, image_part.content_type) == ("image.png", "image/png")
    assert image_part.data == source
    assert (mask_part.filename, mask_part.content_type) == ("mask.png", "image/png")
    with Image.open(io.BytesIO(mask_part.data)) as sent_mask:
        assert sent_mask.mode == "RGBA"
        assert sent_mask.getpixel((100, 500))[3] == 0  # transparent: OpenAI repaints here
        assert sent_mask.getpixel((900, 500))[3] == 255
    assert decoded_size(result.data) == (1024, 1024)
    text_tokens = len(PROMPT.split())
    assert result.cost_usd == pytest.approx((text_tokens * 5 + 2 * 323 * 10 + 4160 * 40) / 1e6)


async def test_a_mask_of_another_size_is_scaled_to_the_image(openai_fake, openai_gen):
    mask = Image.new("L", (256, 256), 255)
    mask.paste(0, (0, 128, 256, 256))  # repaint the top half
    mask_png = io.BytesIO()
    mask.save(mask_png, format="PNG")

    source, mask_bytes = image_bytes(1024, 1024), mask_png.getvalue()
    await openai_gen.generate(request("gpt-image-1", kind="edit", source_image=source, mask_image=mask_bytes))

    [call] = openai_fake.calls("POST", "/v1/images/edits")
    with Image.open(io.BytesIO(call.form["mask"].data)) as sent_mask:
        assert sent_mask.size == (1024, 1024)
        assert (sent_mask.getpixel((500, 100))[3], sent_mask.getpixel((500, 900))[3]) == (0, 255)


async def test_an_edit_with_a_mask_that_is_not_an_image_is_refused_before_the_call(openai_fake, openai_gen):
    edit = request("gpt-image-1", kind="edit", source_image=image_bytes(64, 64), mask_image=b"<html></html>")
    with pytest.raises(UnsupportedRequest, match="the image or its mask is not usable: .*HTML page"):
        await openai_gen.generate(edit)
    assert openai_fake.requests == []


@pytest.mark.parametrize(
    ("headers", "retry_after"),
    [({"Retry-After": "7"}, 7.0), ({"retry-after-ms": "1500", "Retry-After": "2"}, 1.5)],
)
async def test_rate_limit_is_transient_with_retry_after_and_not_retried_by_the_sdk(
    openai_fake, openai_gen, headers, retry_after
):
    message = "Rate limit reached for images per minute."
    limited = openai_error(429, message, type="requests", code="rate_limit_exceeded", headers=headers)
    openai_fake.script("generations", limited)
    with pytest.raises(TransientGeneratorError) as caught:
        await openai_gen.generate(request("dall-e-3"))
    assert caught.value.retry_after == pytest.approx(retry_after)
    assert "rate limit" in str(caught.value)
    assert len(openai_fake.calls("POST", "/v1/images/generations")) == 1


async def test_an_exhausted_quota_is_not_transient(openai_fake, openai_gen):
    message = "You exceeded your current quota, please check your plan and billing details."
    no_quota = openai_error(429, message, type="insufficient_quota", code="insufficient_quota")
    openai_fake.script("generations", no_quota)
    with pytest.raises(GeneratorError, match="exceeded your current quota") as caught:
        await openai_gen.generate(request("dall-e-3"))
    assert not caught.value.transient


async def test_a_server_error_is_transient_and_left_to_our_router_to_retry(openai_fake, openai_gen):
    openai_fake.script("generations", openai_error(500, "The server had an error.", type="server_error"))
    with pytest.raises(TransientGeneratorError, match="HTTP 500"):
        await openai_gen.generate(request("dall-e-3"))
    assert len(openai_fake.calls("POST", "/v1/images/generations")) == 1

    result = await openai_gen.generate(request("dall-e-3"))  # the router's retry
    assert decoded_size(result.data) == (1024, 1024)


async def test_a_hanging_server_times_out_as_transient(openai_fake):
    openai_fake.script("generations", Reply(delay_s=30))
    started = time.monotonic()
    async with opened(openai_at(openai_fake, timeout_s=0.5)) as gen:
        with pytest.raises(TransientGeneratorError, match="did not answer within 0.5 s"):
            await gen.generate(request("dall-e-3"))
    assert time.monotonic() - started < 3


async def test_an_unreachable_server_is_transient():
    async with opened(OpenAIImages("sk-x", base_url=f"http://127.0.0.1:{closed_port()}/v1")) as gen:
        with pytest.raises(TransientGeneratorError, match="could not connect to OpenAI"):
            await gen.generate(request("dall-e-3"))


@pytest.mark.parametrize(
    ("model", "code", "message"),
    [
        (
            "dall-e-3",
            "content_policy_violation",
            "Your request was rejected as a result of our safety system. Your prompt may contain text "
            "that is not allowed by our safety system.",
        ),
        (
            "gpt-image-1",
            "moderation_blocked",
            "Your request was rejected by the safety system. If you believe this is an error, contact us.",
        ),
    ],
)
async def test_a_content_refusal_is_a_content_policy_error_not_a_transient_one(
    openai_fake, openai_gen, model, code, message
):
    refusal = openai_error(400, message, type="image_generation_user_error", code=code)
    openai_fake.script("generations", refusal)
    with pytest.raises(ContentPolicyError, match="rejected") as caught:
        await openai_gen.generate(request(model))
    assert not isinstance(caught.value, TransientGeneratorError)
    assert not caught.value.transient


async def test_the_api_key_never_appears_in_errors(openai_fake):
    wrong_key = "sk-proj-wrongKEY0123456789abcdef"
    async with opened(openai_at(openai_fake, api_key=wrong_key)) as gen:
        with pytest.raises(GeneratorError, match="rejected the API key") as caught:
            await gen.generate(request("dall-e-3"))
    assert not caught.value.transient
    assert_secret_absent(caught.value, wrong_key)
    assert_secret_absent(caught.value, wrong_key[-12:])

    # A provider message that quotes the key is passed on with the key cut out.
    openai_fake.script("generations", openai_error(400, f"Bad header for {openai_fake.api_key}.", code="bad"))
    async with opened(openai_at(openai_fake)) as gen:
        with pytest.raises(GeneratorError, match=r"HTTP 400, bad\): Bad header for \[redacted\]\.") as caught:
            await gen.generate(request("dall-e-3"))
    assert_secret_absent(caught.value, openai_fake.api_key)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"quality": "ultra"}, "dall-e-3 quality must be one of standard, hd, not 'ultra'"),
        ({"background": "transparent"}, "dall-e-3 has no option 'background'"),
    ],
)
async def test_options_are_checked_before_the_call(openai_fake, openai_gen, options, message):
    with pytest.raises(UnsupportedRequest, match=message):
        await openai_gen.generate(request("dall-e-3", options=options))
    with pytest.raises(UnsupportedRequest, match=message):
        openai_gen.estimate_cost(request("dall-e-3", options=options))
    assert openai_fake.requests == []


@pytest.mark.parametrize(
    ("req", "message"),
    [
        (request("dall-e-3", seed=5), "dall-e-3 does not take a seed"),
        (request("dall-e-3", kind="edit", source_image=b"x"), "dall-e-3 cannot do edit"),
        (request("dall-e-3", 512, 512), "dall-e-3 cannot make 512x512; sizes it makes: 1024x1024, 1792x1024"),
        (request("gpt-image-1", negative_prompt="blur"), "gpt-image-1 does not take a negative prompt"),
        (request("dall-e-3", prompt="x" * 4001), "4001 characters; dall-e-3 takes at most 4000"),
        (request("dall-e-2"), "model 'dall-e-2' is not served here"),
    ],
)
async def test_openai_capabilities_are_checked_before_the_call(openai_fake, openai_gen, req, message):
    spec = next((s for s in openai_gen.models() if s.name == req.model), None)
    if spec is not None:
        with pytest.raises(UnsupportedRequest, match=message):
            spec.check(req)
    with pytest.raises(UnsupportedRequest, match=message):
        await openai_gen.generate(req)
    assert openai_fake.requests == []


async def test_openai_prices_can_be_overridden_and_models_restricted(openai_fake):
    default = OpenAIImages("k")
    assert default.estimate_cost(request("dall-e-3")) == pytest.approx(0.04)
    hd_tall = request("dall-e-3", 1024, 1792, options={"quality": "hd"})
    assert default.estimate_cost(hd_tall) == pytest.approx(0.12)
    # GPT Image 1: the image, plus at most one token per prompt byte, plus the edit's input allowance
    prompt_cost = len(PROMPT) * 5 / 1e6
    low = request("gpt-image-1", options={"quality": "low"})
    assert default.estimate_cost(low) == pytest.approx(0.011 + prompt_cost)
    edit = request("gpt-image-1", kind="edit", source_image=b"i", mask_image=b"m")
    assert default.estimate_cost(edit) == pytest.approx(0.042 + prompt_cost + 2 * 1500 * 10 / 1e6)

    custom = openai_at(openai_fake, prices={"dall-e-3/standard/1024x1024": 0.05}, enabled_models=["dalle3"])
    async with opened(custom):
        assert [m.name for m in custom.models()] == ["dall-e-3"]
        assert custom.estimate_cost(request("dall-e-3")) == pytest.approx(0.05)
        assert (await custom.generate(request("dall-e-3"))).cost_usd == pytest.approx(0.05)
        with pytest.raises(UnsupportedRequest, match="model 'gpt-image-1' is not served here"):
            await custom.generate(request("gpt-image-1"))

    with pytest.raises(ValueError, match="unknown openai price 'dall-e-3/ultra/1024x1024'"):
        OpenAIImages("k", prices={"dall-e-3/ultra/1024x1024": 1.0})
    with pytest.raises(ValueError, match="must be a number of USD >= 0"):
        OpenAIImages("k", prices={"dall-e-3/hd/1024x1024": -1})
    with pytest.raises(ValueError, match="unknown openai model.*dall-e-2; known: dall-e-3, gpt-image-1"):
        OpenAIImages("k", enabled_models=["dall-e-2"])


async def test_without_a_base_url_the_sdks_environment_variable_is_honoured(openai_fake, monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", f"{openai_fake.base_url}/v1")
    async with opened(OpenAIImages(openai_fake.api_key, timeout_s=2)) as gen:
        result = await gen.generate(request("dall-e-3"))
    assert decoded_size(result.data) == (1024, 1024)
    assert len(openai_fake.calls("POST", "/v1/images/generations")) == 1


# --- Replicate ------------------------------------------------------------------------------


async def test_flux_schnell_polls_the_prediction_then_fetches_its_output(replicate_fake, replicate_gen):
    replicate_fake.outcome = Outcome(polls=2)
    replicate_fake.output_policy = HostPolicy(expire_after=1)
    seen_progress: list[float] = []

    result = await replicate_gen.generate(
        request("flux", 1344, 768, seed=42, steps=4), progress=lambda done, _: seen_progress.append(done)
    )

    [create] = replicate_fake.calls("POST", "/v1/models/")
    assert create.path == "/v1/models/black-forest-labs/flux-schnell/predictions"
    assert create.json == {
        "input": {
            "prompt": PROMPT,
            "seed": 42,
            "output_format": "png",
            "aspect_ratio": "16:9",
            "num_outputs": 1,
            "go_fast": False,
            "num_inference_steps": 4,
        }
    }
    assert "prefer" not in create.headers  # no held request: the prediction id is known at once
    [prediction_id] = replicate_fake.predictions
    polls = replicate_fake.calls("GET", f"/v1/predictions/{prediction_id}")
    assert len(polls) == 3  # processing, processing, succeeded
    assert seen_progress == [0.5, 0.5]
    assert (result.width, result.height) == (1344, 768) == decoded_size(result.data)
    assert (result.model, result.provider, result.seed) == ("flux-schnell", "replicate", 42)
    assert result.cost_usd == 0.003
    [hosted] = replicate_fake.hosted.values()
    assert (hosted.served, hosted.requests) == (1, 1)
    assert replicate_fake.cancelled == []


async def test_flux_pro_asks_for_a_custom_size_and_reads_a_single_url_output(replicate_fake, replicate_gen):
    result = await replicate_gen.generate(request("flux-pro", 1440, 800, seed=9))

    [create] = replicate_fake.calls("POST", "/v1/models/")
    assert create.path == "/v1/models/black-forest-labs/flux-1.1-pro/predictions"
    assert create.json == {
        "input": {
            "prompt": PROMPT,
            "seed": 9,
            "output_format": "png",
            "aspect_ratio": "custom",
            "width": 1440,
            "height": 800,
        }
    }
    assert (result.width, result.height, result.model, result.cost_usd) == (1440, 800, "flux-1.1-pro", 0.04)


async def test_flux_dev_variation_uploads_the_source_and_passes_its_url(replicate_fake, replicate_gen):
    source = image_bytes(832, 1216, shade=40)

    settings = {"strength": 0.6, "steps": 28, "guidance": 3.5, "seed": 1}
    variation = request("flux-dev", 832, 1216, kind="variation", source_image=source, **settings)
    result = await replicate_gen.generate(variation)

    [upload] = replicate_fake.calls("POST", "/v1/files")
    part = upload.form["content"]
    assert (part.filename, part.content_type, part.data) == ("source.png", "image/png", source)
    [upload_id] = replicate_fake.uploads
    [create] = replicate_fake.calls("POST", "/v1/models/")
    assert create.path == "/v1/models/black-forest-labs/flux-dev/predictions"
    assert create.json["input"] == {
        "prompt": PROMPT,
        "seed": 1,
        "output_format": "png",
        "aspect_ratio": "2:3",
        "num_outputs": 1,
        "go_fast": False,
        "num_inference_steps": 28,
        "guidance": 3.5,
        "image": f"{replicate_fake.base_url}/v1/files/{upload_id}",
        "prompt_strength": 0.6,
    }
    assert (result.width, result.height) == (832, 1216)


async def test_without_a_seed_one_is_chosen_sent_and_reported(replicate_fake, replicate_gen):
    result = await replicate_gen.generate(request("flux-schnell"))
    [create] = replicate_fake.calls("POST", "/v1/models/")
    assert isinstance(result.seed, int)
    assert create.json["input"]["seed"] == result.seed


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        ("NSFW content detected. Try running it again, or try a different prompt.", ContentPolicyError),
        ("Prediction interrupted; please retry (code: PA)", TransientGeneratorError),
        ("CUDA out of memory. Tried to allocate 2.00 GiB", GeneratorError),
    ],
)
async def test_a_failed_prediction_raises_by_its_reason(replicate_fake, replicate_gen, error, expected):
    replicate_fake.outcome = Outcome(kind="fail", error=error)
    with pytest.raises(GeneratorError) as caught:
        await replicate_gen.generate(request("flux-schnell", seed=1))
    assert type(caught.value) is expected
    assert error in str(caught.value)
    assert replicate_fake.cancelled == []


async def test_a_hung_prediction_is_cancelled_at_the_deadline(replicate_fake):
    replicate_fake.outcome = Outcome(kind="hang")
    started = time.monotonic()
    async with opened(replicate_at(replicate_fake, timeout_s=0.5)) as gen:
        with pytest.raises(TransientGeneratorError, match="within 0.5 s; the prediction was cancelled"):
            await gen.generate(request("flux-schnell", seed=1))
    assert time.monotonic() - started < 2
    assert replicate_fake.cancelled == list(replicate_fake.predictions)
    [prediction] = replicate_fake.predictions.values()
    assert prediction.data["status"] == "canceled"


async def test_a_hung_prediction_is_cancelled_when_the_job_is_cancelled(replicate_fake, replicate_gen):
    replicate_fake.outcome = Outcome(kind="hang")
    task = asyncio.create_task(replicate_gen.generate(request("flux-schnell", seed=1)))
    await replicate_fake.created.wait()
    await asyncio.sleep(0.05)  # a few polls

    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert replicate_fake.cancelled == list(replicate_fake.predictions)
    assert len(replicate_fake.calls("POST", "/v1/predictions/")) == 1


async def test_replicate_rate_limit_is_transient_with_retry_after(replicate_fake, replicate_gen):
    detail = "Request was throttled. Expected available in 3 seconds."
    replicate_fake.script("create", replicate_error(429, "Throttled", detail, headers={"Retry-After": "3"}))
    with pytest.raises(TransientGeneratorError, match="rate limiting") as caught:
        await replicate_gen.generate(request("flux-schnell", seed=1))
    assert caught.value.retry_after == 3.0
    assert replicate_fake.predictions == {}


async def test_replicate_server_errors_are_transient_and_invalid_input_is_not(replicate_fake, replicate_gen):
    replicate_fake.script("create", replicate_error(502, "Bad gateway", "upstream unavailable"))
    with pytest.raises(TransientGeneratorError, match="HTTP 502"):
        await replicate_gen.generate(request("flux-schnell", seed=1))
    assert len(replicate_fake.calls("POST", "/v1/models/")) == 1  # POSTs are not retried by the SDK

    replicate_fake.script("create", replicate_error(422, "Invalid input", "- input.seed: Must be int"))
    with pytest.raises(GeneratorError, match=r"HTTP 422\): - input.seed: Must be int") as caught:
        await replicate_gen.generate(request("flux-schnell", seed=1))
    assert not caught.value.transient


async def test_a_failing_poll_cancels_the_prediction(replicate_fake, replicate_gen):
    replicate_fake.outcome = Outcome(polls=5)
    replicate_fake.script("get", replicate_error(500, "Internal server error", "oops"))
    with pytest.raises(TransientGeneratorError, match="HTTP 500"):
        await replicate_gen.generate(request("flux-schnell", seed=1))
    assert replicate_fake.cancelled == list(replicate_fake.predictions)


async def test_a_garbled_answer_is_an_error_and_cancels_the_prediction(replicate_fake, replicate_gen):
    replicate_fake.script("get", Reply(body=b"<html>proxy error</html>"))
    with pytest.raises(GeneratorError, match=r"not JSON \(application/octet-stream, 24 bytes\)") as caught:
        await replicate_gen.generate(request("flux-schnell", seed=1))
    assert not caught.value.transient
    assert replicate_fake.cancelled == list(replicate_fake.predictions)


async def test_the_replicate_token_never_appears_in_errors(replicate_fake):
    wrong = "r8_wrongTOKEN0123456789"
    async with opened(replicate_at(replicate_fake, api_key=wrong)) as gen:
        with pytest.raises(GeneratorError, match="rejected the API token") as caught:
            await gen.generate(request("flux-schnell", seed=1))
    assert_secret_absent(caught.value, wrong)

    token = replicate_fake.api_key
    replicate_fake.outcome = Outcome(kind="fail", error=f"webhook auth failed for {token}")
    async with opened(replicate_at(replicate_fake)) as gen:
        with pytest.raises(GeneratorError, match=r"failed for \[redacted\]") as caught:
            await gen.generate(request("flux-schnell", seed=1))
    assert_secret_absent(caught.value, token)


async def test_an_output_of_the_wrong_shape_is_rejected(replicate_fake, replicate_gen):
    replicate_fake.make_output = lambda w, h: image_bytes(1024, 1024)
    with pytest.raises(InvalidProviderImage, match="made a 1024x1024 image for a 1344x768 request"):
        await replicate_gen.generate(request("flux-schnell", 1344, 768, seed=1))


async def test_an_output_download_is_retried_after_a_server_error(replicate_fake, replicate_gen):
    replicate_fake.output_policy = HostPolicy(fail_first=(503,))
    result = await replicate_gen.generate(request("flux-schnell", seed=1))
    [hosted] = replicate_fake.hosted.values()
    assert (hosted.requests, hosted.served) == (2, 1)
    assert decoded_size(result.data) == (1024, 1024)


async def test_an_expired_output_url_fails_at_once_without_retrying(replicate_fake, replicate_gen):
    replicate_fake.output_policy = HostPolicy(expire_after=0)
    with pytest.raises(ImageDownloadFailed, match="HTTP 404 \\(the URL has expired or is gone\\)") as caught:
        await replicate_gen.generate(request("flux-schnell", seed=1))
    assert not caught.value.transient
    [hosted] = replicate_fake.hosted.values()
    assert hosted.requests == 1


@pytest.mark.parametrize(
    ("req", "message"),
    [
        (request("flux-schnell", steps=8), "flux-schnell takes steps 1-4, not 8"),
        (request("flux-schnell", guidance=3.0), "flux-schnell takes no guidance"),
        (request("flux-1.1-pro", steps=20), "flux-1.1-pro takes no steps"),
        (request("flux-dev", guidance=12.0), "flux-dev takes guidance 0-10, not 12"),
        (request("flux-dev", negative_prompt="blur"), "flux-dev does not take a negative prompt"),
        (request("flux-schnell", 1000, 1000), "flux-schnell cannot make 1000x1000"),
        (request("flux-1.1-pro", 1000, 1024), "each side must be 256-1440 and a multiple of 32"),
        (request("flux-schnell", kind="variation", source_image=b"x"), "flux-schnell cannot do variation"),
        (request("flux-dev", options={"go_fast": "true"}), "flux-dev has no option 'go_fast'"),
    ],
)
async def test_flux_capabilities_are_checked_before_the_call(replicate_fake, replicate_gen, req, message):
    with pytest.raises(UnsupportedRequest, match=message):
        await replicate_gen.generate(req)
    assert replicate_fake.requests == []


async def test_replicate_prices():
    gen = ReplicateFlux("t", prices={"flux-dev": 0.03})
    assert gen.estimate_cost(request("flux")) == 0.003
    assert gen.estimate_cost(request("flux-dev")) == 0.03
    assert gen.estimate_cost(request("flux-pro")) == 0.04
    assert [m.name for m in ReplicateFlux("t", enabled_models=["flux-pro"]).models()] == ["flux-1.1-pro"]


async def test_the_fake_replicate_holds_a_prefer_wait_request_as_replicate_does(replicate_fake):
    """The fake's fidelity: the SDK's own `async_run` (Prefer: wait) gets a finished prediction."""
    import replicate

    client = replicate.Client(api_token=replicate_fake.api_key, base_url=replicate_fake.base_url)
    try:
        output = await client.async_run("black-forest-labs/flux-schnell", input={"prompt": PROMPT})
    finally:
        await client._async_client.aclose()
    [create] = replicate_fake.calls("POST", "/v1/models/")
    assert create.headers["prefer"] == "wait"
    # The SDK turns only https: and data: URLs into file objects; the fake's http: URL stays a string.
    assert isinstance(output, list) and output[0].startswith(f"{replicate_fake.base_url}/files/")


# --- Together -------------------------------------------------------------------------------


async def test_together_sends_its_own_fields_and_bills_per_megapixel(together_fake, together_gen):
    result = await together_gen.generate(request("together/flux-schnell", 1024, 768, seed=7))

    [call] = together_fake.calls("POST", "/v1/images/generations")
    assert call.json == {
        "model": "black-forest-labs/FLUX.1-schnell",
        "prompt": PROMPT,
        "n": 1,
        "response_format": "b64_json",
        "width": 1024,
        "height": 768,
        "steps": 4,
        "seed": 7,
        "output_format": "png",
    }
    assert (result.width, result.height) == (1024, 768) == decoded_size(result.data)
    assert (result.model, result.provider, result.seed) == ("together/flux-schnell", "together", 7)
    assert result.cost_usd == pytest.approx(0.0027 * 1024 * 768 / 1e6)
    estimate = together_gen.estimate_cost(request("together/flux-schnell", 1024, 768))
    assert estimate == pytest.approx(result.cost_usd)


async def test_together_url_output_is_fetched_before_it_expires(together_fake, together_gen):
    together_fake.force_url = True
    together_fake.output_policy = HostPolicy(expire_after=1)
    result = await together_gen.generate(request("together/flux-schnell", 512, 512, seed=1, steps=2))
    assert decoded_size(result.data) == (512, 512)
    assert together_fake.calls("POST", "/v1/images/generations")[0].json["steps"] == 2


async def test_a_jpeg_output_is_stored_as_png(together_fake, together_gen):
    together_fake.make_output = lambda w, h: image_bytes(w, h, "JPEG")
    result = await together_gen.generate(request("together/flux-schnell", 512, 512, seed=1))
    assert result.format == "png"
    assert decoded_size(result.data) == (512, 512)


async def test_together_errors_are_translated(together_fake, together_gen):
    together_fake.script("generations", openai_error(429, "Slow down", headers={"Retry-After": "4"}))
    with pytest.raises(TransientGeneratorError) as caught:
        await together_gen.generate(request("together/flux-schnell", seed=1))
    assert caught.value.retry_after == 4.0

    together_fake.script("generations", openai_error(422, "NSFW content detected in the generated image"))
    with pytest.raises(ContentPolicyError):
        await together_gen.generate(request("together/flux-schnell", seed=1))


@pytest.mark.parametrize(
    ("req", "message"),
    [
        (request("together/flux-schnell", 1000, 1024), "multiple of 16"),
        (request("together/flux-schnell", steps=5), "takes steps 1-4, not 5"),
        (request("together/flux-schnell", 2048, 1024), "each side must be 256-1440"),
    ],
)
async def test_together_capabilities_are_checked_before_the_call(together_fake, together_gen, req, message):
    with pytest.raises(UnsupportedRequest, match=message):
        await together_gen.generate(req)
    assert together_fake.requests == []


async def test_together_base_url_defaults_to_together_or_its_environment_variable(together_fake, monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/never-used")  # OpenAI's, not Together's
    monkeypatch.setenv("TOGETHER_BASE_URL", f"{together_fake.base_url}/v1")
    async with opened(TogetherFlux(together_fake.api_key, timeout_s=2)) as gen:
        result = await gen.generate(request("together/flux-schnell", seed=3))
    assert decoded_size(result.data) == (1024, 1024)

    monkeypatch.delenv("TOGETHER_BASE_URL")
    async with opened(TogetherFlux("k")) as gen:
        assert str(gen._sdk().base_url) == "https://api.together.xyz/v1/"


# --- All providers: answers that trickle in, answers that are not JSON ----------------------

# A whole answer, sent one byte every 0.5 s: each read is well within the SDKs' read timeouts.
TRICKLE = 0.5
IMAGES_ANSWER = {"created": 1, "data": [{"b64_json": "iVBORw0KGgo="}]}


async def test_openai_an_answer_trickling_in_fails_at_timeout_s_in_all(openai_fake):
    openai_fake.script("generations", Reply(json=IMAGES_ANSWER, trickle_s=TRICKLE))
    async with opened(openai_at(openai_fake, timeout_s=1)) as gen:
        gen._sdk()  # built (and its SDK imported) before the clock starts
        started = time.monotonic()
        with pytest.raises(TransientGeneratorError, match="^OpenAI did not answer within 1 s$"):
            await gen.generate(request("dall-e-3"))
    assert time.monotonic() - started < 2


async def test_openai_an_edit_trickling_in_fails_at_timeout_s_in_all(openai_fake):
    openai_fake.script("edits", Reply(json=IMAGES_ANSWER, trickle_s=TRICKLE))
    edit = request("gpt-image-1", kind="edit", source_image=image_bytes(64, 64))
    async with opened(openai_at(openai_fake, timeout_s=1)) as gen:
        gen._sdk()  # built (and its SDK imported) before the clock starts
        started = time.monotonic()
        with pytest.raises(TransientGeneratorError, match="^OpenAI did not answer within 1 s$"):
            await gen.generate(edit)
    assert time.monotonic() - started < 2


async def test_together_an_answer_trickling_in_fails_at_timeout_s_in_all(together_fake):
    together_fake.script("generations", Reply(json=IMAGES_ANSWER, trickle_s=TRICKLE))
    async with opened(together_at(together_fake, timeout_s=1)) as gen:
        gen._sdk()  # built (and its SDK imported) before the clock starts
        started = time.monotonic()
        with pytest.raises(TransientGeneratorError, match="^Together did not answer within 1 s$"):
            await gen.generate(request("together/flux-schnell", seed=1))
    assert time.monotonic() - started < 2


async def test_replicate_a_create_trickling_in_fails_at_timeout_s_in_all(replicate_fake):
    answer = {"id": "q1", "status": "starting", "urls": {}}
    replicate_fake.script("create", Reply(status=201, json=answer, trickle_s=TRICKLE))
    async with opened(replicate_at(replicate_fake, timeout_s=1)) as gen:
        gen._sdk()  # built (and its SDK imported) before the clock starts
        started = time.monotonic()
        with pytest.raises(TransientGeneratorError, match=r"^Replicate did not answer within 1 s \(creating"):
            await gen.generate(request("flux-schnell", seed=1))
    assert time.monotonic() - started < 2


async def test_replicate_a_poll_trickling_in_fails_at_timeout_s_and_cancels(replicate_fake):
    replicate_fake.script("get", Reply(json={"id": "q1", "status": "processing"}, trickle_s=TRICKLE))
    async with opened(replicate_at(replicate_fake, timeout_s=1)) as gen:
        gen._sdk()  # built (and its SDK imported) before the clock starts
        started = time.monotonic()
        with pytest.raises(TransientGeneratorError, match="did not finish within 1 s; the prediction was cancelled"):
            await gen.generate(request("flux-schnell", seed=1))
    assert time.monotonic() - started < 2
    assert replicate_fake.cancelled == list(replicate_fake.predictions)


NOT_JSON = [
    pytest.param(html_page(), "text/html, 84 bytes", id="html"),
    pytest.param(Reply(body=b'{"data": [{"b64_json": "iVBO', headers={"Content-Type": "application/json"}),
                 "application/json, 28 bytes", id="cut-off-json"),
]


@pytest.mark.parametrize(("reply", "what"), NOT_JSON)
async def test_openai_an_answer_that_is_not_json_is_a_clear_error(openai_fake, openai_gen, reply, what):
    openai_fake.script("generations", reply)
    with pytest.raises(GeneratorError) as caught:
        await openai_gen.generate(request("dall-e-3"))
    assert str(caught.value) == f"OpenAI answered with something that is not JSON ({what})"
    assert not caught.value.transient  # the image may have been made and billed: not retried
    assert_secret_absent(caught.value, openai_fake.api_key)


async def test_openai_a_proxy_error_page_is_transient_and_says_what_came(openai_fake, openai_gen):
    openai_fake.script("generations", html_page(502))
    with pytest.raises(TransientGeneratorError) as caught:
        await openai_gen.generate(request("gpt-image-1"))
    assert str(caught.value) == "OpenAI failed with HTTP 502: an answer that is not JSON (text/html, 84 bytes)"
    assert_secret_absent(caught.value, openai_fake.api_key)


@pytest.mark.parametrize(("reply", "what"), NOT_JSON)
async def test_together_an_answer_that_is_not_json_is_a_clear_error(together_fake, together_gen, reply, what):
    together_fake.script("generations", reply)
    with pytest.raises(GeneratorError) as caught:
        await together_gen.generate(request("together/flux-schnell", seed=1))
    assert str(caught.value) == f"Together answered with something that is not JSON ({what})"
    assert not caught.value.transient
    assert_secret_absent(caught.value, together_fake.api_key)


async def test_together_a_proxy_error_page_is_transient_and_says_what_came(together_fake, together_gen):
    together_fake.script("generations", html_page(502))
    with pytest.raises(TransientGeneratorError) as caught:
        await together_gen.generate(request("together/flux-schnell", seed=1))
    assert str(caught.value) == "Together failed with HTTP 502: an answer that is not JSON (text/html, 84 bytes)"


@pytest.mark.parametrize(("reply", "what"), NOT_JSON)
async def test_replicate_an_answer_that_is_not_json_is_a_clear_error(replicate_fake, replicate_gen, reply, what):
    replicate_fake.script("create", reply)
    with pytest.raises(GeneratorError) as caught:
        await replicate_gen.generate(request("flux-schnell", seed=1))
    assert str(caught.value) == f"Replicate answered with something that is not JSON ({what})"
    assert not caught.value.transient
    assert_secret_absent(caught.value, replicate_fake.api_key)


async def test_replicate_a_proxy_error_page_is_transient_and_says_what_came(replicate_fake, replicate_gen):
    replicate_fake.script("create", html_page(502))
    with pytest.raises(TransientGeneratorError) as caught:
        await replicate_gen.generate(request("flux-schnell", seed=1))
    assert str(caught.value) == (
        "Replicate failed with HTTP 502 and answered with something that is not JSON (text/html, 84 bytes)"
    )
    assert replicate_fake.predictions == {}


# --- All providers: bad outputs -------------------------------------------------------------

BAD_OUTPUTS = [
    pytest.param(lambda w, h: HTML_ERROR_PAGE, "an HTML page, not an image", id="html"),
    pytest.param(truncated_png, "corrupt or truncated", id="truncated"),
    pytest.param(lambda w, h: decompression_bomb_png(), "9000x9000 .* over the limit", id="bomb"),
]


@pytest.mark.parametrize(("make_output", "message"), BAD_OUTPUTS)
async def test_openai_bad_image_bytes_are_rejected(openai_fake, openai_gen, make_output, message):
    openai_fake.make_output = make_output
    with pytest.raises(InvalidProviderImage, match=message) as caught:
        await openai_gen.generate(request("gpt-image-1"))
    assert not caught.value.transient


@pytest.mark.parametrize(("make_output", "message"), BAD_OUTPUTS)
async def test_replicate_bad_downloads_are_rejected(replicate_fake, replicate_gen, make_output, message):
    replicate_fake.make_output = make_output
    with pytest.raises(InvalidProviderImage, match=message) as caught:
        await replicate_gen.generate(request("flux-schnell", seed=1))
    assert not caught.value.transient


@pytest.mark.parametrize(("make_output", "message"), BAD_OUTPUTS)
async def test_together_bad_image_bytes_are_rejected(together_fake, together_gen, make_output, message):
    together_fake.make_output = make_output
    with pytest.raises(InvalidProviderImage, match=message):
        await together_gen.generate(request("together/flux-schnell", seed=1))


async def test_an_image_of_the_wrong_size_is_rejected(openai_fake, openai_gen):
    openai_fake.make_output = lambda w, h: image_bytes(512, 512)
    with pytest.raises(InvalidProviderImage, match="the image is 512x512, but 1024x1024 was asked for"):
        await openai_gen.generate(request("dall-e-3"))


# --- fetch_image ----------------------------------------------------------------------------


@pytest.fixture
async def file_host():
    async with FakeOpenAI() as fake:  # any fake: only its file hosting is used
        yield fake


async def test_fetch_image_reads_data_urls_and_reencodes_other_formats_as_png():
    webp = image_bytes(64, 48, "WEBP")
    fetched = await fetch_image(f"data:image/webp;base64,{base64.b64encode(webp).decode()}")
    assert (fetched.source_format, fetched.width, fetched.height) == ("WEBP", 64, 48)
    assert decoded_size(fetched.png) == (64, 48)

    png = image_bytes(32, 32)
    assert (await fetch_image(f"data:image/png;base64,{base64.b64encode(png).decode()}")).png == png
    with pytest.raises(InvalidProviderImage, match="not valid base64"):
        await fetch_image("data:image/png;base64,@@@@")
    with pytest.raises(ImageDownloadFailed, match="unsupported scheme 'ftp'"):
        await fetch_image("ftp://example.com/x.png")


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_fetch_image_stops_reading_past_the_size_cap(file_host, chunked):
    url = file_host.host(image_bytes(512, 512), HostPolicy(chunked=chunked))
    with pytest.raises(ImageDownloadFailed, match="over the 100-byte limit"):
        async with aiohttp.ClientSession() as session:
            await fetch_image(url, session=session, max_bytes=100)
    assert file_host.hosted_at(url).requests == 1


async def test_fetch_image_retries_timeouts_then_reports_them_as_transient(file_host):
    url = file_host.host(image_bytes(16, 16), HostPolicy(delay_s=5))
    started = time.monotonic()
    with pytest.raises(TransientGeneratorError, match=r"2 times \(last: no complete answer within 0.2 s\)"):
        await fetch_image(url, timeout_s=0.2, attempts=2)
    assert time.monotonic() - started < 2
    assert file_host.hosted_at(url).requests == 2


async def test_fetch_image_gives_a_trickling_download_timeout_s_in_all(file_host):
    url = file_host.host(image_bytes(16, 16), HostPolicy(trickle_s=TRICKLE))
    started = time.monotonic()
    with pytest.raises(TransientGeneratorError, match=r"1 times \(last: no complete answer within 1 s\)"):
        await fetch_image(url, timeout_s=1, attempts=1)
    assert time.monotonic() - started < 2


async def test_fetch_image_passes_on_retry_after_when_it_gives_up(file_host):
    url = file_host.host(image_bytes(16, 16), HostPolicy(fail_first=(503, 503), retry_after="12"))
    with pytest.raises(TransientGeneratorError, match="last: HTTP 503") as caught:
        await fetch_image(url, attempts=2)
    assert caught.value.retry_after == 12.0


def test_parse_retry_after_reads_seconds_milliseconds_and_dates():
    assert parse_retry_after({"Retry-After": "30"}) == 30.0
    assert parse_retry_after({"retry-after-ms": "250"}) == 0.25
    in_a_minute = formatdate(time.time() + 60, usegmt=True)
    assert parse_retry_after({"Retry-After": in_a_minute}) == pytest.approx(60, abs=2)
    assert parse_retry_after({"Retry-After": "soon"}) is None
    assert parse_retry_after({}) is None


# --- Availability and import cost ----------------------------------------------------------


def test_unavailable_reason_names_the_missing_extra_or_key(monkeypatch):
    assert OpenAIImages("k").unavailable_reason() is None
    assert ReplicateFlux("k").unavailable_reason() is None
    assert TogetherFlux("k").unavailable_reason() is None
    assert "no OpenAI API key" in OpenAIImages("").unavailable_reason()

    monkeypatch.setitem(sys.modules, "openai", None)  # as if the package were not installed
    monkeypatch.setitem(sys.modules, "replicate", None)
    for generator in (OpenAIImages("k"), ReplicateFlux("k"), TogetherFlux("k")):
        assert "pip install 'easel[cloud]'" in generator.unavailable_reason()


def test_importing_the_cloud_generators_loads_no_sdk():
    code = (
        "import sys, generators.openai_images, generators.replicate_flux, generators.together_flux;"
        "print([m for m in ('openai', 'replicate', 'httpx', 'httpx2', 'aiohttp') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
