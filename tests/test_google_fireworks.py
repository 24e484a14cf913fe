"""Google (Imagen 4, Gemini image) through the real google-genai SDK, and Fireworks Flux through
easel's aiohttp client, against local fakes speaking their wire formats
(tests/fakes/google_fireworks.py); then jobs end to end through the app, the router choosing
among them by price and capability and falling back from and to them."""
from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest

from bot.config import settings_from_dict
from bot.core.models import (
    ContentPolicyError,
    GeneratorError,
    GeneratorUnavailable,
    TransientGeneratorError,
    UnsupportedRequest,
    usd_to_micros,
)
from generators.download import InvalidProviderImage
from generators.fireworks_flux import FireworksFlux
from generators.google_imagen import GoogleImagen
from moderation import NoImageScreen
from tests.fakes.google_fireworks import FakeFireworks, FakeGoogle, fireworks_error, google_error
from tests.fakes.providers import (
    FakeReplicate,
    FakeTogether,
    Reply,
    html_page,
    replicate_error,
    truncated_png,
)
from tests.helpers import generation_request, job_request, start_app

PROMPT = "a red fox asleep in fresh snow, watercolour"
REPO = Path(__file__).resolve().parent.parent
GOOGLE_ENV = ("GOOGLE_API_KEY", "GEMINI_API_KEY", "GOOGLE_GENAI_USE_VERTEXAI", "GOOGLE_CLOUD_PROJECT",
              "GOOGLE_CLOUD_LOCATION", "GOOGLE_VERTEX_BASE_URL", "GOOGLE_GEMINI_BASE_URL",
              "GOOGLE_APPLICATION_CREDENTIALS", "FIREWORKS_API_KEY", "FIREWORKS_BASE_URL")


@pytest.fixture(autouse=True)
def _no_provider_environment(monkeypatch):
    """Nothing from the shell may point the SDK anywhere but the fakes."""
    for name in GOOGLE_ENV:
        monkeypatch.delenv(name, raising=False)


def request(model: str, width: int = 1024, height: int = 1024, **fields):
    kind, prompt = fields.pop("kind", "imagine"), fields.pop("prompt", PROMPT)
    return generation_request(kind, model=model, prompt=prompt, width=width, height=height, **fields)


def assert_secret_absent(exc: BaseException, secret: str) -> None:
    assert secret not in str(exc) and secret not in repr(exc)
    assert secret not in "".join(traceback.format_exception(exc))


@contextlib.asynccontextmanager
async def opened(generator):
    try:
        yield generator
    finally:
        await generator.close()


def google_at(fake: FakeGoogle, *, vertex: bool = True, api_key: str | None = None, timeout_s: float = 3, **kw):
    return GoogleImagen(api_key or fake.api_key, base_url=fake.base_url, vertex=vertex, timeout_s=timeout_s, **kw)


def fireworks_at(fake: FakeFireworks, *, api_key: str | None = None, timeout_s: float = 3, **kw):
    return FireworksFlux(api_key or fake.api_key, base_url=f"{fake.base_url}/inference/v1", timeout_s=timeout_s, **kw)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
async def google_fake():
    async with FakeGoogle() as fake:
        yield fake


@pytest.fixture
async def vertex_gen(google_fake):
    async with opened(google_at(google_fake)) as gen:
        yield gen


@pytest.fixture
async def fireworks_fake():
    async with FakeFireworks() as fake:
        yield fake


@pytest.fixture
async def fireworks_gen(fireworks_fake):
    async with opened(fireworks_at(fireworks_fake)) as gen:
        yield gen


IMAGEN_PATH = "/v1beta1/publishers/google/models/imagen-4.0-generate-001:predict"

# --- Google: Imagen ---------------------------------------------------------------------------


async def test_imagen_sends_the_predict_request_the_sdk_builds_and_records_the_seed(google_fake, vertex_gen):
    result = await vertex_gen.generate(request("imagen", 1408, 768, seed=42))

    [call] = google_fake.calls("POST", "/v1beta1/")
    assert call.path == IMAGEN_PATH
    assert call.json == {
        "instances": [{"prompt": PROMPT}],
        "parameters": {
            "sampleCount": 1,
            "aspectRatio": "16:9",
            "seed": 42,
            "addWatermark": False,  # a seed is taken only without the watermark
            "includeRaiReason": True,
            "outputOptions": {"mimeType": "image/png"},
        },
    }
    assert google_fake.keys_seen == [google_fake.api_key]  # x-goog-api-key, express mode
    assert "authorization" not in call.headers
    assert (result.model, result.provider, result.seed) == ("imagen-4", "google", 42)
    assert (result.width, result.height, result.cost_usd) == (1408, 768, 0.04)
    assert result.data.startswith(b"\x89PNG")


@pytest.mark.parametrize(("model", "model_id", "price"), [
    ("imagen-4-fast", "imagen-4.0-fast-generate-001", 0.02),
    ("imagen-4-ultra", "imagen-4.0-ultra-generate-001", 0.06),
])
async def test_each_imagen_model_goes_to_its_id_at_its_price(google_fake, vertex_gen, model, model_id, price):
    assert vertex_gen.estimate_cost(request(model, 896, 1280, seed=1)) == price
    result = await vertex_gen.generate(request(model, 896, 1280, seed=1))
    [call] = google_fake.calls("POST", "/v1beta1/")
    assert call.path == f"/v1beta1/publishers/google/models/{model_id}:predict"
    assert call.json["parameters"]["aspectRatio"] == "3:4"
    assert (result.width, result.height, result.cost_usd) == (896, 1280, price)


async def test_imagen_with_the_watermark_on_sends_no_seed_and_records_none(google_fake, vertex_gen):
    result = await vertex_gen.generate(request("imagen-4", seed=7, options={"watermark": "on"}))
    params = google_fake.calls("POST", "/v1beta1/")[0].json["parameters"]
    assert "seed" not in params and params["addWatermark"] is True
    assert result.seed is None
    assert "watermark" in vertex_gen.models()[0].description


@pytest.mark.parametrize(("req", "message"), [
    (request("imagen-4", 1344, 768), "imagen-4 cannot make 1344x768"),
    (request("imagen-4", negative_prompt="blur"), "imagen-4 does not take a negative prompt"),
    (request("imagen-4", steps=4), "imagen-4 takes no steps"),
    (request("imagen-4", kind="variation", source_image=b"x"), "imagen-4 cannot do variation"),
    (request("gemini-image", seed=3), "gemini-image does not take a seed"),
])
async def test_google_capabilities_are_checked_before_the_call(google_fake, vertex_gen, req, message):
    with pytest.raises(UnsupportedRequest, match=message):
        await vertex_gen.generate(req)
    assert google_fake.requests == []


# --- Google: Gemini image ---------------------------------------------------------------------


async def test_gemini_image_on_the_gemini_api_maps_the_aspect_ratio(google_fake):
    async with opened(google_at(google_fake, vertex=False)) as gen:
        assert [m.name for m in gen.models()] == ["gemini-image"]  # Imagen is Vertex-only
        result = await gen.generate(request("gemini-image", 832, 1248))
    [call] = google_fake.calls("POST", "/v1/models/")
    assert call.path == "/v1/models/gemini-2.5-flash-image:generateContent"
    assert call.json == {
        "contents": [{"parts": [{"text": PROMPT}], "role": "user"}],
        "generationConfig": {"responseModalities": ["IMAGE"], "imageConfig": {"aspectRatio": "2:3"}},
    }
    assert (result.width, result.height, result.seed, result.cost_usd) == (832, 1248, None, 0.039)


async def test_gemini_image_on_vertex_uses_the_publisher_path(google_fake, vertex_gen):
    result = await vertex_gen.generate(request("nano-banana", 1344, 768))
    [call] = google_fake.calls("POST", "/v1beta1/")
    assert call.path == "/v1beta1/publishers/google/models/gemini-2.5-flash-image:generateContent"
    assert (result.model, result.width, result.height) == ("gemini-image", 1344, 768)


def test_imagen_models_need_vertex_and_names_are_checked():
    with pytest.raises(ValueError, match="imagen-4 need Vertex AI"):
        GoogleImagen("k", vertex=False, enabled_models=["imagen-4"])
    with pytest.raises(ValueError, match="unknown google model"):
        GoogleImagen("k", vertex=True, enabled_models=["imagen-9"])
    with pytest.raises(ValueError, match="unknown google price"):
        GoogleImagen("k", vertex=True, prices={"imagen-9": 1.0})
    gen = GoogleImagen("k", vertex=True, prices={"imagen-4": 0.05}, enabled_models=["imagen", "gemini-image"])
    assert [m.name for m in gen.models()] == ["imagen-4", "gemini-image"]
    assert gen.estimate_cost(request("imagen-4", seed=1)) == 0.05


# --- Google: refusals and errors --------------------------------------------------------------

BLOCKED = [
    pytest.param("imagen-4", None, "Your current safety filter threshold", id="imagen-rai-reason"),
    pytest.param("imagen-4", Reply(json={}), "no image came back", id="imagen-no-predictions"),
    pytest.param("imagen-4", google_error(
        400, "Image generation failed with the following error: The prompt could not be submitted. This "
        "prompt contains sensitive words that violate Google's Responsible AI practices.", "INVALID_ARGUMENT"),
        "Responsible AI", id="imagen-prompt-refused"),
    pytest.param("gemini-image", None, "IMAGE_SAFETY", id="gemini-image-safety"),
    pytest.param("gemini-image", Reply(json={"promptFeedback": {"blockReason": "PROHIBITED_CONTENT"}}),
                 "PROHIBITED_CONTENT", id="gemini-prompt-blocked"),
    pytest.param("gemini-image", Reply(json={"candidates": [{"content": {"role": "model", "parts": [
        {"text": "I can't make that image."}]}, "finishReason": "STOP"}]}), "no image", id="gemini-text-only"),
]


@pytest.mark.parametrize(("model", "reply", "message"), BLOCKED)
async def test_a_safety_filtered_answer_is_a_content_policy_error(google_fake, vertex_gen, model, reply, message):
    route = "predict" if model.startswith("imagen") else "generateContent"
    if reply is not None:
        google_fake.script(route, reply)
    seed = 1 if model.startswith("imagen") else None
    with pytest.raises(ContentPolicyError, match=message) as caught:
        await vertex_gen.generate(request(model, prompt="a forbidden thing", seed=seed))
    assert not caught.value.transient


async def test_google_rate_limit_is_transient_with_retry_after_and_not_retried_by_the_sdk(google_fake, vertex_gen):
    limited = google_error(429, "Quota exceeded for aiplatform.googleapis.com/online_prediction_requests_per_"
                           "base_model with base model: imagen-4.0-generate.", "RESOURCE_EXHAUSTED",
                           headers={"Retry-After": "7"})
    google_fake.script("predict", limited)
    with pytest.raises(TransientGeneratorError, match="rate limiting") as caught:
        await vertex_gen.generate(request("imagen-4", seed=1))
    assert caught.value.retry_after == 7.0
    assert len(google_fake.calls("POST", "/v1beta1/")) == 1


async def test_google_server_errors_are_transient(google_fake, vertex_gen):
    google_fake.script("predict", google_error(503, "The service is currently unavailable.", "UNAVAILABLE"))
    with pytest.raises(TransientGeneratorError, match=r"HTTP 503: The service is currently unavailable"):
        await vertex_gen.generate(request("imagen-4", seed=1))
    assert len(google_fake.calls("POST", "/v1beta1/")) == 1
    assert (await vertex_gen.generate(request("imagen-4", seed=1))).width == 1024  # the router's retry


async def test_google_a_proxy_error_page_is_transient_and_says_what_came(google_fake, vertex_gen):
    google_fake.script("predict", html_page(502))
    with pytest.raises(TransientGeneratorError) as caught:
        await vertex_gen.generate(request("imagen-4", seed=1))
    assert str(caught.value) == "Google failed with HTTP 502: an answer that is not JSON (text/html, 84 bytes)"
    assert_secret_absent(caught.value, google_fake.api_key)


async def test_google_an_html_page_with_200_is_a_clear_error_not_retried(google_fake, vertex_gen):
    google_fake.script("generateContent", html_page(200))
    with pytest.raises(GeneratorError) as caught:
        await vertex_gen.generate(request("gemini-image"))
    assert str(caught.value) == "Google answered with something that is not JSON (text/html, 84 bytes)"
    assert not caught.value.transient


async def test_google_a_rejected_key_is_unavailable_and_never_shown(google_fake):
    wrong = "AIzaSy-wrongKEY0123456789"
    async with opened(google_at(google_fake, api_key=wrong)) as gen:
        with pytest.raises(GeneratorUnavailable, match="rejected the API key") as caught:
            await gen.generate(request("imagen-4", seed=1))
    assert_secret_absent(caught.value, wrong)


async def test_google_a_hanging_server_fails_at_timeout_s_in_all(google_fake):
    google_fake.script("predict", Reply(delay_s=30))
    async with opened(google_at(google_fake, timeout_s=0.5)) as gen:
        gen._sdk()  # built (and its SDK imported) before the clock starts
        started = time.monotonic()
        with pytest.raises(TransientGeneratorError, match="^Google did not answer within 0.5 s$"):
            await gen.generate(request("imagen-4", seed=1))
    assert time.monotonic() - started < 2


async def test_google_an_unreachable_server_is_transient_at_once():
    gen = GoogleImagen("k", base_url=f"http://127.0.0.1:{closed_port()}", vertex=True, timeout_s=3)
    async with opened(gen):
        started = time.monotonic()
        with pytest.raises(TransientGeneratorError, match="could not connect to Google"):
            await gen.generate(request("imagen-4", seed=1))
    assert time.monotonic() - started < 1  # not the SDK's own reconnect-after-a-pause


async def test_google_a_truncated_image_is_rejected(google_fake, vertex_gen):
    google_fake.make_output = truncated_png
    with pytest.raises(InvalidProviderImage, match="corrupt or truncated"):
        await vertex_gen.generate(request("imagen-4", seed=1))


# --- Google: configuration --------------------------------------------------------------------


def test_google_without_credentials_says_which_variable_to_set():
    assert "GOOGLE_API_KEY or GEMINI_API_KEY" in GoogleImagen("", vertex=False).unavailable_reason()
    assert "GOOGLE_CLOUD_PROJECT" in GoogleImagen("", vertex=True).unavailable_reason()
    assert GoogleImagen("k", vertex=True).unavailable_reason() is None
    s = settings_from_dict({"generators": {"local": {"enabled": False}}})
    assert s.generators.google.generator_kwargs(s) is None  # no key: not built


async def test_google_follows_the_sdks_environment_variables(google_fake, monkeypatch):
    monkeypatch.setenv("GEMINI_API_KEY", google_fake.api_key)
    monkeypatch.setenv("GOOGLE_GENAI_USE_VERTEXAI", "true")
    monkeypatch.setenv("GOOGLE_VERTEX_BASE_URL", google_fake.base_url)
    s = settings_from_dict({"generators": {"google": {"timeout_s": 3}}})
    kwargs = s.generators.google.generator_kwargs(s)
    assert kwargs is not None and kwargs["vertex"] is True and kwargs["base_url"] is None
    async with opened(GoogleImagen(**kwargs)) as gen:
        result = await gen.generate(request("imagen-4", seed=3))
    assert result.seed == 3 and google_fake.keys_seen == [google_fake.api_key]

    off = settings_from_dict({"generators": {"google": {"vertex": False}}})
    assert off.generators.google.generator_kwargs(off)["vertex"] is False
    with pytest.raises(Exception, match=r"'generators.google.vertex' must be true, false or \"auto\""):
        settings_from_dict({"generators": {"google": {"vertex": "maybe"}}})


# --- Fireworks --------------------------------------------------------------------------------

FIREWORKS_PATH = "/inference/v1/workflows/accounts/fireworks/models/{}/text_to_image"


async def test_fireworks_sends_the_documented_request_and_records_the_seed(fireworks_fake, fireworks_gen):
    result = await fireworks_gen.generate(request("fireworks/flux-dev", 832, 1216, seed=11, steps=20, guidance=4.0))

    [call] = fireworks_fake.calls("POST", "/inference/v1/")
    assert call.path == FIREWORKS_PATH.format("flux-1-dev-fp8")
    assert call.json == {"prompt": PROMPT, "aspect_ratio": "2:3", "num_inference_steps": 20, "seed": 11,
                         "guidance_scale": 4.0}
    assert call.headers["accept"] == "image/png"
    assert (result.model, result.provider, result.seed) == ("fireworks/flux-dev", "fireworks", 11)
    assert (result.width, result.height) == (832, 1216)
    assert result.cost_usd == pytest.approx(0.0005 * 20)


async def test_fireworks_schnell_costs_per_image_and_a_seed_is_chosen_when_none_is_given(fireworks_fake, fireworks_gen):
    assert fireworks_gen.estimate_cost(request("fireworks/flux-schnell")) == 0.0014
    assert fireworks_gen.estimate_cost(request("fireworks/flux-dev")) == pytest.approx(0.0005 * 28)
    result = await fireworks_gen.generate(request("fireworks/flux-schnell", 1536, 640))
    [call] = fireworks_fake.calls("POST", "/inference/v1/")
    assert call.path == FIREWORKS_PATH.format("flux-1-schnell-fp8")
    assert call.json["aspect_ratio"] == "21:9" and call.json["num_inference_steps"] == 4
    assert "guidance_scale" not in call.json
    assert isinstance(result.seed, int) and result.seed == call.json["seed"]
    assert result.cost_usd == 0.0014


@pytest.mark.parametrize(("req", "message"), [
    (request("fireworks/flux-schnell", 1152, 896), "cannot make 1152x896"),  # 4:3 is not one of its ratios
    (request("fireworks/flux-schnell", steps=8), "takes steps 1-4, not 8"),
    (request("fireworks/flux-schnell", guidance=3.0), "takes no guidance"),
    (request("fireworks/flux-dev", negative_prompt="blur"), "does not take a negative prompt"),
])
async def test_fireworks_capabilities_are_checked_before_the_call(fireworks_fake, fireworks_gen, req, message):
    with pytest.raises(UnsupportedRequest, match=message):
        await fireworks_gen.generate(req)
    assert fireworks_fake.requests == []


async def test_fireworks_content_filter_is_a_content_policy_error(fireworks_fake, fireworks_gen):
    with pytest.raises(ContentPolicyError, match="safety checker") as caught:
        await fireworks_gen.generate(request("fireworks/flux-schnell", prompt="a forbidden thing", seed=1))
    assert not caught.value.transient


async def test_fireworks_errors_are_translated(fireworks_fake, fireworks_gen):
    fireworks_fake.script("text_to_image", fireworks_error(429, "Too many requests", "rate_limit",
                                                           headers={"Retry-After": "4"}))
    with pytest.raises(TransientGeneratorError, match="rate limiting") as caught:
        await fireworks_gen.generate(request("fireworks/flux-schnell", seed=1))
    assert caught.value.retry_after == 4.0

    fireworks_fake.script("text_to_image", fireworks_error(500, "Internal server error", "internal_error"))
    with pytest.raises(TransientGeneratorError, match="HTTP 500: Internal server error"):
        await fireworks_gen.generate(request("fireworks/flux-schnell", seed=1))

    fireworks_fake.script("text_to_image", html_page(502))
    with pytest.raises(TransientGeneratorError) as caught:
        await fireworks_gen.generate(request("fireworks/flux-schnell", seed=1))
    assert str(caught.value) == "Fireworks failed with HTTP 502: an answer that is not JSON (text/html, 84 bytes)"

    fireworks_fake.script("text_to_image", html_page(200))
    with pytest.raises(GeneratorError) as caught:
        await fireworks_gen.generate(request("fireworks/flux-schnell", seed=1))
    assert str(caught.value) == "Fireworks answered with something that is not an image (text/html, 84 bytes)"
    assert not caught.value.transient

    fireworks_fake.script("text_to_image", fireworks_error(400, "Prompt flagged by the NSFW content filter"))
    with pytest.raises(ContentPolicyError):
        await fireworks_gen.generate(request("fireworks/flux-schnell", seed=1))

    fireworks_fake.script("text_to_image", fireworks_error(400, f"bad request for {fireworks_fake.api_key}"))
    with pytest.raises(GeneratorError, match=r"HTTP 400\): bad request for \[redacted\]") as caught:
        await fireworks_gen.generate(request("fireworks/flux-schnell", seed=1))
    assert_secret_absent(caught.value, fireworks_fake.api_key)
    assert len(fireworks_fake.requests) == 6  # nothing retried here: the router retries


async def test_fireworks_a_rejected_key_is_unavailable_and_never_shown(fireworks_fake):
    wrong = "fw_wrongKEY0123456789"
    async with opened(fireworks_at(fireworks_fake, api_key=wrong)) as gen:
        with pytest.raises(GeneratorUnavailable, match="rejected the API key") as caught:
            await gen.generate(request("fireworks/flux-schnell", seed=1))
    assert_secret_absent(caught.value, wrong)
    assert "FIREWORKS_API_KEY" in FireworksFlux("").unavailable_reason()
    assert FireworksFlux("k").unavailable_reason() is None


async def test_fireworks_an_answer_trickling_in_fails_at_timeout_s_in_all(fireworks_fake):
    fireworks_fake.script("text_to_image", Reply(body=b"\x89PNG\r\n\x1a\n" * 4, trickle_s=0.5,
                                                 headers={"Content-Type": "image/png"}))
    async with opened(fireworks_at(fireworks_fake, timeout_s=1)) as gen:
        started = time.monotonic()
        with pytest.raises(TransientGeneratorError, match="^Fireworks did not answer within 1 s$"):
            await gen.generate(request("fireworks/flux-schnell", seed=1))
    assert time.monotonic() - started < 2


async def test_fireworks_base_url_comes_from_its_environment_variable(fireworks_fake, monkeypatch):
    monkeypatch.setenv("FIREWORKS_BASE_URL", f"{fireworks_fake.base_url}/inference/v1")
    async with opened(FireworksFlux(fireworks_fake.api_key, timeout_s=2)) as gen:
        assert (await gen.generate(request("fireworks/flux-schnell", seed=2))).seed == 2
    monkeypatch.delenv("FIREWORKS_BASE_URL")
    assert FireworksFlux("k")._base_url == "https://api.fireworks.ai/inference/v1"


async def test_fireworks_a_truncated_image_is_rejected(fireworks_fake, fireworks_gen):
    fireworks_fake.make_output = truncated_png
    with pytest.raises(InvalidProviderImage, match="corrupt or truncated"):
        await fireworks_gen.generate(request("fireworks/flux-schnell", seed=1))


def test_importing_the_new_generators_loads_no_sdk():
    code = (
        "import sys, generators.google_imagen, generators.fireworks_flux;"
        "print([m for m in ('google.genai', 'aiohttp', 'httpx') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --- End to end: the app, the router, the money ----------------------------------------------


@pytest.fixture
async def fakes(monkeypatch):
    monkeypatch.setenv("REPLICATE_POLL_INTERVAL", "0.01")
    async with FakeGoogle() as google, FakeFireworks() as fireworks, FakeReplicate() as replicate, \
            FakeTogether() as together:
        monkeypatch.setenv("GOOGLE_API_KEY", google.api_key)
        monkeypatch.setenv("FIREWORKS_API_KEY", fireworks.api_key)
        monkeypatch.setenv("REPLICATE_API_TOKEN", replicate.api_key)
        monkeypatch.setenv("TOGETHER_API_KEY", together.api_key)
        monkeypatch.delenv("OPENAI_API_KEY", raising=False)
        yield google, fireworks, replicate, together


_APPS: list = []


@pytest.fixture(autouse=True)
async def _close_apps():
    yield
    while _APPS:
        await _APPS.pop().close()


def make_app(tmp_path, fakes, **overrides):
    google, fireworks, replicate, together = fakes
    data = {
        "storage": {"database": str(tmp_path / "easel.db"), "images_dir": str(tmp_path / "images")},
        "generation": {"default_model": "imagen-4"},
        "generators": {
            "local": {"enabled": False},
            "google": {"base_url": google.base_url, "vertex": True, "timeout_s": 3},
            "fireworks": {"base_url": f"{fireworks.base_url}/inference/v1", "timeout_s": 3},
            "replicate": {"base_url": replicate.base_url, "timeout_s": 3},
            "together": {"base_url": f"{together.base_url}/v1", "timeout_s": 3},
        },
        "routing": {"retry_base_delay_s": 0.01},
    }
    for section, values in overrides.items():
        data.setdefault(section, {}).update(values)
    app = start_app(settings_from_dict(data), image_screen=NoImageScreen())
    _APPS.append(app)
    return app


def available(app, user="u1"):
    return app.ledger.balance(user).available_micros


async def test_an_imagen_job_is_seeded_stored_and_charged(tmp_path, fakes):
    google, *_ = fakes
    app = make_app(tmp_path, fakes)
    out = await app.service.submit(job_request("imagine", "u1", "a lighthouse --seed 42 --ar 16:9"))
    assert out.ok, out.error
    job = out.job
    assert (job.model, job.provider, job.seed, job.width, job.height) == ("imagen-4", "google", 42, 1408, 768)
    assert job.cost_micros == usd_to_micros(0.04) and app.blobs.exists(job.sha256)
    params = google.calls("POST", "/v1beta1/")[0].json["parameters"]
    assert (params["seed"], params["aspectRatio"], params["addWatermark"]) == (42, "16:9", False)


@pytest.mark.parametrize("model", ["imagen-4", "gemini-image", "fireworks/flux-schnell"])
async def test_a_provider_safety_block_is_blocked_free_and_not_retried(tmp_path, fakes, model):
    google, fireworks, *_ = fakes
    app = make_app(tmp_path, fakes)
    out = await app.service.submit(job_request("imagine", "u1", "a forbidden thing", model=model))
    assert (out.status, out.error_code) == ("blocked", "blocked")
    calls = fireworks.calls("POST", "/inference/") if model.startswith("fireworks") else google.calls("POST", "/v1")
    assert len(calls) == 1
    assert available(app) == usd_to_micros(1.0) and app.ledger.balance("u1").reserved_micros == 0


@pytest.mark.parametrize("model", ["imagen-4", "gemini-image", "fireworks/flux-dev"])
async def test_a_truncated_image_fails_the_job_and_refunds(tmp_path, fakes, model):
    google, fireworks, *_ = fakes
    google.make_output = fireworks.make_output = truncated_png
    app = make_app(tmp_path, fakes, routing={"retry_attempts": 1})
    out = await app.service.submit(job_request("imagine", "u1", "a fox", model=model))
    assert out.status == "failed" and "truncated" in out.error
    assert available(app) == usd_to_micros(1.0) and app.ledger.balance("u1").reserved_micros == 0
    assert app.jobs.list()[0].sha256 is None


async def test_a_rate_limited_google_call_is_retried_after_its_retry_after(tmp_path, fakes):
    google, *_ = fakes
    google.script("predict", google_error(429, "Quota exceeded.", "RESOURCE_EXHAUSTED", headers={"Retry-After": "0"}),
                  google_error(500, "Internal error encountered.", "INTERNAL"))
    app = make_app(tmp_path, fakes)
    started = time.monotonic()
    out = await app.service.submit(job_request("imagine", "u1", "a fox --seed 1", model="imagen-4-fast"))
    assert out.ok, out.error
    assert time.monotonic() - started < 2
    assert len(google.calls("POST", "/v1beta1/")) == 3
    assert out.job.cost_micros == usd_to_micros(0.02)


async def test_the_router_picks_the_cheapest_model_that_can_serve(tmp_path, fakes):
    _, fireworks, replicate, together = fakes
    app = make_app(tmp_path, fakes)
    # "flux" leads to Flux schnell on Replicate ($0.003), Together ($0.0027/MP) and Fireworks ($0.0014).
    out = await app.service.submit(job_request("imagine", "u1", "a fox --seed 5", model="flux"))
    assert out.ok, out.error
    assert (out.job.model, out.job.provider, out.job.seed) == ("fireworks/flux-schnell", "fireworks", 5)
    assert out.job.cost_micros == usd_to_micros(0.0014)
    # 1152x896 (4:3) is not among Fireworks' sizes: the cheapest of those that make it serves.
    out = await app.service.submit(job_request("imagine", "u1", "a fox --seed 5", model="flux", size=(1152, 896)))
    assert out.ok, out.error
    assert out.job.provider == "together" and (out.job.width, out.job.height) == (1152, 896)
    assert len(fireworks.calls("POST", "/inference/")) == 1 and replicate.calls("POST", "/v1/models/") == []


async def test_a_failing_fireworks_falls_back_to_together(tmp_path, fakes):
    _, fireworks, _, together = fakes
    fireworks.script("text_to_image", fireworks_error(503, "Service unavailable", "unavailable"))
    app = make_app(tmp_path, fakes, routing={"fallbacks": {"fireworks/flux-schnell": "together/flux-schnell"},
                                             "retry_attempts": 1})
    out = await app.service.submit(job_request("imagine", "u1", "a fox --seed 8", model="fireworks/flux-schnell"))
    assert out.ok, out.error
    assert (out.job.model, out.job.provider, out.job.seed) == ("together/flux-schnell", "together", 8)
    assert together.calls("POST", "/v1/images/generations")[0].json["seed"] == 8
    assert app.ledger.spend_by_provider(0) == {"together": out.job.cost_micros}


async def test_a_throttled_replicate_falls_back_to_fireworks(tmp_path, fakes):
    _, fireworks, replicate, _ = fakes
    replicate.script("create", replicate_error(429, "Throttled", "Request was throttled.",
                                               headers={"Retry-After": "86400"}))
    app = make_app(tmp_path, fakes, routing={"fallbacks": {"flux-schnell": "fireworks/flux-schnell"}})
    out = await app.service.submit(job_request("imagine", "u1", "a fox --seed 5", model="flux-schnell"))
    assert out.ok, out.error
    assert (out.job.model, out.job.provider, out.job.seed) == ("fireworks/flux-schnell", "fireworks", 5)
    assert fireworks.calls("POST", "/inference/")[0].json["seed"] == 5


async def test_imagen_falls_back_to_flux_and_flux_to_imagen(tmp_path, fakes):
    google, fireworks, *_ = fakes
    google.script("predict", google_error(503, "Unavailable.", "UNAVAILABLE"))
    app = make_app(tmp_path, fakes, routing={"retry_attempts": 1, "fallbacks": {
        "imagen-4": "fireworks/flux-dev", "fireworks/flux-schnell": "imagen-4-ultra"}})
    out = await app.service.submit(job_request("imagine", "u1", "a fox --seed 3", model="imagen-4"))
    assert out.ok, out.error
    assert (out.job.model, out.job.provider, out.job.seed) == ("fireworks/flux-dev", "fireworks", 3)

    fireworks.script("text_to_image", fireworks_error(500, "Internal server error", "internal_error"))
    out = await app.service.submit(job_request("imagine", "u1", "a fox --seed 4", model="fireworks/flux-schnell"))
    assert out.ok, out.error
    assert (out.job.model, out.job.provider, out.job.seed) == ("imagen-4-ultra", "google", 4)
    assert out.job.cost_micros == usd_to_micros(0.06)


async def test_easel_models_lists_them_when_their_keys_are_set(tmp_path, fakes, monkeypatch, capsys):
    from bot.cli import main
    from tests.helpers import write_config

    conf = write_config(tmp_path / "easel.toml", {
        "storage": {"database": str(tmp_path / "easel.db"), "images_dir": str(tmp_path / "images")},
        "generators.local": {"enabled": False},
        "generators.google": {"vertex": True},
    })
    assert main(["--config", str(conf), "models"]) == 0
    out = capsys.readouterr().out
    for name in ("imagen-4 ", "imagen-4-fast", "imagen-4-ultra", "gemini-image", "fireworks/flux-schnell",
                 "fireworks/flux-dev"):
        assert name in out, out
    monkeypatch.delenv("GOOGLE_API_KEY")
    monkeypatch.delenv("FIREWORKS_API_KEY")
    assert main(["--config", str(conf), "models"]) == 0
    out = capsys.readouterr().out
    assert "imagen" not in out and "fireworks/" not in out
