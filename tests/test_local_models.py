"""The local generator's previews and its LRU of loaded models, on the tiny random model: step
previews never cost a full VAE decode, and a memory budget unloads the least recently used model."""
from __future__ import annotations

import io
from pathlib import Path

import pytest

pytest.importorskip("diffusers", reason="the 'local' extra is not installed")

from PIL import Image  # noqa: E402

from generators.local import DiffusersGenerator  # noqa: E402
from generators.local_models import files_bytes  # noqa: E402
from generators.tiny import build_tiny_pipeline  # noqa: E402
from tests.helpers import generation_request  # noqa: E402


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("models") / "tiny"
    build_tiny_pipeline(path)
    return path


@pytest.fixture(scope="module")
def taesd_dir(tmp_path_factory) -> Path:
    """A tiny AutoencoderTiny (TAESD) with random weights: 8x, as the tiny VAE."""
    import torch
    from diffusers import AutoencoderTiny

    torch.manual_seed(3)
    taesd = AutoencoderTiny(encoder_block_out_channels=(8,) * 4, decoder_block_out_channels=(8,) * 4,
                            num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1))
    path = tmp_path_factory.mktemp("taesd") / "taesd"
    taesd.save_pretrained(path)
    return path


def request(model: str = "tiny", **params):
    return generation_request(model=model, prompt="a lighthouse", seed=7, **params)


def count_calls(module) -> list[int]:
    """A list that grows by one each time the torch module runs."""
    calls: list[int] = []
    module.register_forward_hook(lambda *_: calls.append(1))
    return calls


async def generate_with_progress(gen: DiffusersGenerator, steps: int) -> list[bytes | None]:
    previews: list[bytes | None] = []
    await gen.generate(request(steps=steps), lambda fraction, preview: previews.append(preview))
    return previews


@pytest.mark.parametrize("batch_size", [1, 4])
async def test_previews_come_from_the_latents_not_a_vae_decode_per_step(tiny_dir, tmp_path, batch_size):
    gen = DiffusersGenerator({"tiny": str(tiny_dir)}, data_dir=tmp_path, device="cpu", batch_size=batch_size,
                             batch_window_s=0.0)
    try:
        await gen.generate(request(steps=1))  # loads the model
        decodes = count_calls(gen._models.entry("tiny")["pipes"]["imagine"].vae.decoder)
        previews = await generate_with_progress(gen, steps=5)
    finally:
        await gen.close()
    assert [Image.open(io.BytesIO(p)).size for p in previews[:-1]] == [(128, 128)] * 4
    assert previews[-1] is None  # the finished image follows at once
    assert len(decodes) == 1  # the final image only


async def test_a_configured_taesd_makes_the_previews(tiny_dir, taesd_dir, tmp_path):
    gen = DiffusersGenerator({"tiny": str(tiny_dir)}, data_dir=tmp_path, device="cpu",
                             overrides={"tiny": {"preview": str(taesd_dir)}})
    try:
        await gen.generate(request(steps=1))
        entry = gen._models.entry("tiny")
        decodes, tiny_decodes = count_calls(entry["pipes"]["imagine"].vae.decoder), count_calls(entry["taesd"].decoder)
        previews = await generate_with_progress(gen, steps=4)
    finally:
        await gen.close()
    assert all(Image.open(io.BytesIO(p)).format == "PNG" for p in previews[:-1])
    assert (len(tiny_decodes), len(decodes)) == (3, 1)


async def test_the_memory_budget_unloads_the_least_recently_used_model(tiny_dir, tmp_path):
    size = files_bytes(str(tiny_dir))
    models = {name: str(tiny_dir) for name in ("a", "b", "c")}
    gen = DiffusersGenerator(models, data_dir=tmp_path, device="cpu", memory_budget_gb=2.5 * size / 1e9)
    try:
        for name in ("a", "b", "a"):
            await gen.generate(request(name, steps=1))
        assert set(gen.loaded()) == {"a", "b"}  # two fit
        await gen.generate(request("c", steps=1))
        assert set(gen.loaded()) == {"a", "c"}  # b was used least recently, not a (loaded first)
        await gen.generate(request("b", steps=1))
        assert set(gen.loaded()) == {"b", "c"}
        assert all(where.startswith("loaded on cpu, 0.0") for where in gen.loaded().values())
    finally:
        await gen.close()
