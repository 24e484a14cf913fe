"""The local diffusers generator, run for real on the tiny random model (built offline)."""
from __future__ import annotations

import asyncio
import io
import time
from pathlib import Path

import pytest

pytest.importorskip("diffusers", reason="the 'local' extra is not installed")

import numpy as np  # noqa: E402  (comes with torch)
from PIL import Image  # noqa: E402

from bot.core.models import (  # noqa: E402
    GenerationRequest,
    GeneratorError,
    GeneratorUnavailable,
    UnsupportedRequest,
)
from bot.core.ports import Generator  # noqa: E402
from generators.local import LANCZOS_NOTE, SAMPLERS, DiffusersGenerator  # noqa: E402
from generators.tiny import build_tiny_pipeline  # noqa: E402
from tests.helpers import generation_request  # noqa: E402
from tests.helpers import pixels as pixel_hash  # noqa: E402

WEIGHT_FILES = (
    "text_encoder/model.safetensors",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """A data directory whose tiny model is built once per session."""
    path = tmp_path_factory.mktemp("data")
    build_tiny_pipeline(path / "models" / "tiny")
    return path


@pytest.fixture(scope="session")
def tiny_dir(data_dir) -> Path:
    return data_dir / "models" / "tiny"


@pytest.fixture
async def generator(data_dir, tiny_dir):
    # The "tiny" source with the session's model already in place: nothing is rebuilt.
    gen = DiffusersGenerator({"tiny": "tiny"}, data_dir=data_dir, device="cpu")
    assert gen.tiny_model_dir == tiny_dir
    yield gen
    await gen.close()


@pytest.fixture(scope="session")
def tiny_upscaler_dir(tiny_dir, tmp_path_factory) -> Path:
    """A tiny StableDiffusionUpscalePipeline (x4: its VAE has 3 blocks), with the tiny text side."""
    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        DDPMScheduler,
        StableDiffusionUpscalePipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    pipe = StableDiffusionUpscalePipeline(
        vae=AutoencoderKL(
            block_out_channels=(8, 16, 32),
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            latent_channels=4,
            norm_num_groups=8,
            scaling_factor=0.08333,
        ),
        text_encoder=CLIPTextModel.from_pretrained(tiny_dir / "text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(tiny_dir / "tokenizer"),
        unet=UNet2DConditionModel(
            block_out_channels=(32, 64),
            layers_per_block=1,
            in_channels=7,  # 4 latent channels + the 3 channels of the low-resolution image
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            num_class_embeds=1000,  # the noise level is passed as a class label
        ),
        low_res_scheduler=DDPMScheduler(),
        scheduler=DDIMScheduler(prediction_type="v_prediction"),
    )
    path = tmp_path_factory.mktemp("tiny-upscaler")
    pipe.save_pretrained(path)
    return path


def request(kind: str = "imagine", **fields) -> GenerationRequest:
    values = dict(model="tiny", prompt="a lighthouse at dusk", width=64, height=64, seed=1, steps=2)
    values.update(fields)
    return generation_request(kind, **values)


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)


def png_of(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array.astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def patterned_image(width: int, height: int) -> bytes:
    y, x = np.mgrid[0:height, 0:width]
    return png_of(np.stack([x * 255 // width, y * 255 // height, (x + y) % 256], axis=-1))


async def test_tiny_model_is_built_on_first_use_and_loaded_from_disk(tmp_path, tiny_dir):
    gen = DiffusersGenerator({"tiny": "tiny"}, data_dir=tmp_path, device="cpu")
    try:
        assert not gen.tiny_model_dir.exists()
        built = await gen.generate(request())
    finally:
        await gen.close()
    model_dir = tmp_path / "models" / "tiny"
    assert (model_dir / "model_index.json").is_file()
    configs = ("tokenizer/tokenizer_config.json", "scheduler/scheduler_config.json")
    for name in WEIGHT_FILES + configs:
        assert (model_dir / name).is_file(), name
    # Written atomically: no temporary build directory is left beside it.
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["tiny"]
    # Seeded: this build and the session's are the same model, byte for byte.
    for name in WEIGHT_FILES:
        assert (model_dir / name).read_bytes() == (tiny_dir / name).read_bytes(), name

    # The same directory given as a plain path loads through the same from_pretrained route.
    from_path = DiffusersGenerator(
        {"from-path": str(model_dir)}, data_dir=tmp_path / "unused", device="cpu"
    )
    try:
        again = await from_path.generate(request(model="from-path"))
    finally:
        await from_path.close()
    assert np.array_equal(pixels(again.data), pixels(built.data))
    assert not (tmp_path / "unused").exists()


async def test_same_seed_same_bytes_and_another_seed_differs(generator):
    first = await generator.generate(request(seed=7))
    second = await generator.generate(request(seed=7))
    other = await generator.generate(request(seed=8))
    assert first.data == second.data
    assert other.data != first.data
    assert not np.array_equal(pixels(other.data), pixels(first.data))


async def test_output_has_the_requested_size_and_describes_itself(generator):
    result = await generator.generate(
        request(width=128, height=64, seed=42, negative_prompt="fog", guidance=2.5)
    )
    assert (result.width, result.height) == (128, 64)
    assert (result.model, result.provider, result.seed) == ("tiny", "local", 42)
    assert result.format == "png"
    image = Image.open(io.BytesIO(result.data))
    assert image.format == "PNG" and image.size == (128, 64)
    assert image.info["seed"] == "42"
    assert image.info["prompt"] == "a lighthouse at dusk"
    assert image.info["negative_prompt"] == "fog"
    assert image.info["model"] == "tiny"
    assert image.info["steps"] == "2"
    assert image.info["guidance"] == "2.5"
    assert image.info["size"] == "128x64"
    assert result.note is None


async def test_negative_prompt_steers_the_image_only_with_guidance(generator):
    plain = await generator.generate(request(guidance=3.0))
    steered = await generator.generate(request(guidance=3.0, negative_prompt="fog"))
    assert steered.data != plain.data
    unguided = await generator.generate(request(guidance=0.0, negative_prompt="fog"))
    assert "negative prompt had no effect" in unguided.note


async def test_variation_is_deterministic_and_changes_the_source(generator):
    source = patterned_image(64, 64)
    first = await generator.generate(request("variation", source_image=source, strength=0.5))
    second = await generator.generate(request("variation", source_image=source, strength=0.5))
    assert first.data == second.data
    assert (first.width, first.height) == (64, 64)
    assert not np.array_equal(pixels(first.data), pixels(source))
    assert Image.open(io.BytesIO(first.data)).info["strength"] == "0.5"


async def test_variation_resizes_the_source_to_the_requested_size(generator):
    result = await generator.generate(
        request("variation", source_image=patterned_image(96, 80), width=64, height=128)
    )
    assert (result.width, result.height) == (64, 128)
    assert Image.open(io.BytesIO(result.data)).size == (64, 128)


async def test_edit_with_a_mask_keeps_every_pixel_outside_it(generator):
    source_png = patterned_image(64, 64)
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[16:48, 8:40] = 255  # white: repaint
    mask_png = png_of(mask)
    result = await generator.generate(request("edit", source_image=source_png, mask_image=mask_png))
    out, source = pixels(result.data), pixels(source_png)
    outside = mask == 0
    assert np.array_equal(out[outside], source[outside])
    assert np.abs(out[~outside] - source[~outside]).mean() > 5


async def test_edit_without_a_mask_redraws_the_whole_image(generator):
    source = patterned_image(64, 64)
    result = await generator.generate(request("edit", source_image=source))
    assert np.abs(pixels(result.data) - pixels(source)).mean() > 5
    assert Image.open(io.BytesIO(result.data)).info["strength"] == "0.75"


async def test_upscale_without_an_upscaler_resamples_and_says_so(generator):
    source = patterned_image(64, 48)
    fractions = []
    result = await generator.generate(
        request("upscale", source_image=source, upscale_factor=2),
        lambda fraction, preview: fractions.append(fraction),
    )
    assert (result.width, result.height) == (128, 96)
    assert Image.open(io.BytesIO(result.data)).size == (128, 96)
    assert result.note == LANCZOS_NOTE
    assert result.seed is None  # a resample uses no seed, so none is recorded
    assert fractions == [1.0]
    tripled = await generator.generate(request("upscale", source_image=source, upscale_factor=3))
    assert (tripled.width, tripled.height) == (192, 144)


async def test_upscale_with_an_upscaler_model(data_dir, tiny_upscaler_dir):
    gen = DiffusersGenerator(
        {"tiny": "tiny"}, data_dir=data_dir, device="cpu", upscaler=str(tiny_upscaler_dir)
    )
    try:
        source = patterned_image(32, 32)
        fractions: list[float] = []
        first = await gen.generate(
            request("upscale", source_image=source, upscale_factor=4, steps=2),
            lambda fraction, preview: fractions.append(fraction),
        )
        second = await gen.generate(
            request("upscale", source_image=source, upscale_factor=4, steps=2)
        )
        # The model makes 4x; a 2x request is resampled down from it.
        halved = await gen.generate(
            request("upscale", source_image=source, upscale_factor=2, steps=2)
        )
    finally:
        await gen.close()
    assert (first.width, first.height) == (128, 128)
    assert first.data == second.data
    assert first.note == f"upscaled with {tiny_upscaler_dir}"
    assert fractions == [0.5, 1.0]
    assert (halved.width, halved.height) == (64, 64)
    assert "resampled (Lanczos) to 64x64" in halved.note


async def test_progress_rises_to_one_with_previews_on_the_way(generator):
    calls: list[tuple[float, bytes | None]] = []
    await generator.generate(request(steps=4), lambda f, preview: calls.append((f, preview)))
    fractions = [f for f, _ in calls]
    assert fractions == [0.25, 0.5, 0.75, 1.0]
    for _, preview in calls[:-1]:
        assert Image.open(io.BytesIO(preview)).format == "PNG"

    calls.clear()
    await generator.generate(
        request("variation", source_image=patterned_image(64, 64), steps=3, strength=0.6),
        lambda f, preview: calls.append((f, preview)),
    )
    fractions = [f for f, _ in calls]
    assert len(fractions) == 3  # the steps asked for, not num_inference_steps x strength
    assert fractions == sorted(fractions) and fractions[-1] == 1.0


async def test_the_event_loop_stays_responsive_while_generating(data_dir):
    # A fresh generator, so loading the model also happens during the measurement.
    gen = DiffusersGenerator({"tiny": "tiny"}, data_dir=data_dir, device="cpu")
    stop = asyncio.Event()
    max_lag = 0.0
    ticks = 0

    async def ticker() -> None:
        nonlocal max_lag, ticks
        while not stop.is_set():
            before = time.perf_counter()
            await asyncio.sleep(0.01)
            max_lag = max(max_lag, time.perf_counter() - before - 0.01)
            ticks += 1

    ticker_task = asyncio.create_task(ticker())
    try:
        started = time.perf_counter()
        await gen.generate(request(width=512, height=512, steps=8))
        elapsed = time.perf_counter() - started
    finally:
        stop.set()
        await ticker_task
        await gen.close()
    assert elapsed > 0.3  # long enough for the measurement to mean something
    # Had the work run on the loop, the ticker would have stalled for all of it. Relative bounds,
    # so that a busy machine (GIL contention while the model loads) does not fail the test.
    assert ticks >= elapsed / 0.05
    assert max_lag < elapsed / 2


async def test_cancelling_stops_the_diffusion_and_frees_the_worker(generator):
    loop = asyncio.get_running_loop()
    first_step = asyncio.Event()
    fractions: list[float] = []

    def progress(fraction: float, preview: bytes | None) -> None:
        fractions.append(fraction)
        loop.call_soon_threadsafe(first_step.set)

    long_job = asyncio.create_task(
        generator.generate(request(width=512, height=512, steps=50), progress)
    )
    await asyncio.wait_for(first_step.wait(), timeout=30)
    cancelled_at = time.perf_counter()
    long_job.cancel()
    with pytest.raises(asyncio.CancelledError):
        await long_job
    assert time.perf_counter() - cancelled_at < 0.2

    # The next job runs on the same single worker, so it finishing means the long one stopped.
    after = await asyncio.wait_for(generator.generate(request()), timeout=30)
    assert after.width == 64
    assert len(fractions) < 10, "the cancelled diffusion kept running"


async def test_estimate_is_an_upper_bound_on_the_reported_cost(generator):
    small, large = request(), request(width=256, height=256, steps=4)
    assert generator.estimate_cost(large) > generator.estimate_cost(small) > 0
    for req in (small, large, request("variation", source_image=patterned_image(64, 64))):
        estimate = generator.estimate_cost(req)
        result = await generator.generate(req)
        assert 0 < result.cost_usd <= estimate
    # Learned from the jobs run: still above what the next one costs.
    again = await generator.generate(large)
    assert again.cost_usd <= generator.estimate_cost(large)


async def test_a_missing_model_directory_is_reported_clearly(tmp_path):
    gen = DiffusersGenerator(
        {"gone": str(tmp_path / "no-such-model")}, data_dir=tmp_path, device="cpu"
    )
    try:
        with pytest.raises(GeneratorUnavailable) as info:
            await gen.generate(request(model="gone"))
    finally:
        await gen.close()
    message = str(info.value)
    assert "'gone'" in message and "no-such-model" in message and "no model directory" in message


async def test_an_incomplete_model_directory_is_reported_clearly(tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    gen = DiffusersGenerator({"broken": str(broken)}, data_dir=tmp_path, device="cpu")
    try:
        with pytest.raises(GeneratorUnavailable, match="complete diffusers model"):
            await gen.generate(request(model="broken"))
    finally:
        await gen.close()


async def test_an_undownloaded_hub_model_is_reported_clearly(tmp_path):
    gen = DiffusersGenerator(
        {"turbo": "easel-tests/not-a-real-model"},
        data_dir=tmp_path,
        device="cpu",
        allow_download=False,
    )
    try:
        with pytest.raises(GeneratorUnavailable) as info:
            await gen.generate(request(model="turbo"))
    finally:
        await gen.close()
    message = str(info.value)
    assert "'turbo'" in message
    assert "hf download easel-tests/not-a-real-model" in message
    assert "Traceback" not in message


async def test_bad_requests_are_refused_before_any_work(generator):
    with pytest.raises(ValueError, match="seed"):
        await generator.generate(request(seed=None))
    with pytest.raises(UnsupportedRequest, match="no local model 'other'"):
        await generator.generate(request(model="other"))
    with pytest.raises(UnsupportedRequest, match="multiple of 8"):
        await generator.generate(request(width=100))
    with pytest.raises(UnsupportedRequest, match="needs a source image"):
        await generator.generate(request("variation"))
    with pytest.raises(UnsupportedRequest, match="upscale factor"):
        await generator.generate(
            request("upscale", source_image=patterned_image(8, 8), upscale_factor=8)
        )
    with pytest.raises(UnsupportedRequest, match="strength"):
        await generator.generate(
            request("variation", source_image=patterned_image(8, 8), strength=1.5)
        )
    with pytest.raises(UnsupportedRequest, match="source image cannot be used"):
        await generator.generate(request("variation", source_image=b"<html>not an image</html>"))


def test_settings_are_checked_when_constructed(tmp_path):
    with pytest.raises(ValueError, match="device"):
        DiffusersGenerator({"tiny": "tiny"}, data_dir=tmp_path, device="gpu")
    with pytest.raises(ValueError, match="dtype"):
        DiffusersGenerator({"tiny": "tiny"}, data_dir=tmp_path, dtype="half")
    with pytest.raises(ValueError, match="at least one model"):
        DiffusersGenerator({}, data_dir=tmp_path)
    with pytest.raises(ValueError, match="price_per_second_usd"):
        DiffusersGenerator({"tiny": "tiny"}, data_dir=tmp_path, price_per_second_usd=float("inf"))


async def test_a_cuda_device_without_a_gpu_is_reported_clearly(data_dir):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    gen = DiffusersGenerator({"tiny": "tiny"}, data_dir=data_dir, device="cuda")
    try:
        with pytest.raises(GeneratorUnavailable, match="sees no CUDA GPU"):
            await gen.generate(request())
    finally:
        await gen.close()


async def test_models_and_availability(generator, tmp_path):
    assert isinstance(generator, Generator)
    assert generator.unavailable_reason() is None
    (spec,) = generator.models()
    assert spec.name == "tiny" and spec.provider == "local"
    assert spec.kinds == {"imagine", "variation", "edit", "upscale"}
    assert spec.honours_seed and spec.negative_prompt and spec.sizes is None
    assert spec.default_size == (512, 512)

    xl = tmp_path / "xl"
    xl.mkdir()
    (xl / "model_index.json").write_text('{"_class_name": "StableDiffusionXLPipeline"}')
    gen = DiffusersGenerator({"xl": str(xl)}, data_dir=tmp_path, device="cpu")
    assert gen.models()[0].default_size == (1024, 1024)
    await gen.close()


async def test_a_closed_generator_refuses_work(data_dir):
    gen = DiffusersGenerator({"tiny": "tiny"}, data_dir=data_dir, device="cpu")
    await gen.generate(request())
    await gen.close()
    with pytest.raises(GeneratorUnavailable, match="closed"):
        await gen.generate(request())


async def test_closing_interrupts_a_running_job(data_dir):
    gen = DiffusersGenerator({"tiny": "tiny"}, data_dir=data_dir, device="cpu")
    loop = asyncio.get_running_loop()
    first_step = asyncio.Event()
    job = asyncio.create_task(
        gen.generate(
            request(width=512, height=512, steps=50),
            lambda f, p: loop.call_soon_threadsafe(first_step.set),
        )
    )
    await asyncio.wait_for(first_step.wait(), timeout=30)
    await asyncio.wait_for(gen.close(), timeout=5)
    with pytest.raises(GeneratorError, match="closed during the generation"):
        await job


@pytest.mark.parametrize("sampler", sorted(set(SAMPLERS) - {"default"}))
async def test_every_sampler_runs_and_is_reproducible(generator, sampler):
    first = await generator.generate(request(seed=7, options={"sampler": sampler}))
    again = await generator.generate(request(seed=7, options={"sampler": sampler}))
    assert first.data == again.data


async def test_a_sampler_changes_the_image_and_default_comes_back(generator):
    default = await generator.generate(request(seed=7))
    ancestral = await generator.generate(request(seed=7, options={"sampler": "euler_a"}))
    # The pipelines of one model share their scheduler: a later default call is not left with
    # the previous request's sampler.
    default_again = await generator.generate(request(seed=7, options={"sampler": "default"}))
    assert not np.array_equal(pixels(default.data), pixels(ancestral.data))
    assert default_again.data == default.data


async def test_an_unknown_sampler_is_refused_before_any_work(generator):
    with pytest.raises(UnsupportedRequest, match="sampler must be one of"):
        await generator.generate(request(options={"sampler": "warp_drive"}))


async def test_the_default_negative_prompt_reaches_the_local_model_and_is_recorded(generator, tmp_path):
    """The tiny model is an SD 1.x pipeline: with guidance above 1 it gets the sd1 default, which
    is recorded, and the image is the one an explicit negative prompt of the same text makes."""
    from bot.config import settings_from_dict
    from bot.core.negatives import BUILTIN
    from tests.helpers import job_request, start_app

    def app(name: str, **prompts):
        return start_app(settings_from_dict({
            "storage": {"database": str(tmp_path / name / "e.db"), "images_dir": str(tmp_path / name / "img")},
            "moderation": {"image_classifier": "none"}, "prompts": prompts}), generators=[generator])

    fields = {"seed": 3, "size": (64, 64), "steps": 2, "guidance": 3.0}
    on, off = app("on"), app("off", builtin_negatives=False)
    try:
        by_default = await on.service.submit(job_request("imagine", "u1", "a castle", **fields))
        explicit = await off.service.submit(job_request("imagine", "u1", "a castle", negative_prompt=BUILTIN["sd1"],
                                                        **fields))
        without = await off.service.submit(job_request("imagine", "u1", "a castle", **fields))
    finally:
        await on.close()
        await off.close()
    assert by_default.job.negative_prompt == BUILTIN["sd1"] and without.job.negative_prompt is None
    made = [pixel_hash(app.blobs.get(o.job.sha256)) for app, o in ((on, by_default), (off, explicit), (off, without))]
    assert made[0] == made[1] != made[2]
