"""LoRA, ControlNet, batching and family defaults of the local generator, on tiny random-weight
components built offline (a peft LoRA on the tiny UNet, a ControlNet made from it)."""
from __future__ import annotations

import asyncio
import dataclasses
import io
from pathlib import Path

import pytest

pytest.importorskip("peft", reason="LoRA needs peft (the 'local' extra)")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from bot.core.flags import FlagError, parse_flags  # noqa: E402
from bot.core.models import UnsupportedRequest  # noqa: E402
from generators.batching import batch_key  # noqa: E402
from generators.local import DiffusersGenerator  # noqa: E402
from generators.local_control import canny  # noqa: E402
from generators.local_models import model_config  # noqa: E402
from generators.tiny import build_tiny_pipeline  # noqa: E402
from tests.helpers import generation_request  # noqa: E402


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data")
    build_tiny_pipeline(path / "models" / "tiny")
    return path


@pytest.fixture(scope="module")
def lora_dir(data_dir) -> Path:
    """A LoRA for the tiny UNet, with random (non-zero) weights, saved as diffusers saves one."""
    import torch
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = StableDiffusionPipeline.from_pretrained(data_dir / "models" / "tiny")
    torch.manual_seed(1)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
    out = data_dir / "loras" / "ink"
    StableDiffusionPipeline.save_lora_weights(out, unet_lora_layers=layers)
    return out


@pytest.fixture(scope="module")
def controlnet_dir(data_dir) -> Path:
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(data_dir / "models" / "tiny" / "unet")
    torch.manual_seed(2)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16, 16, 32))
    # Four stages: the tiny VAE downscales 8x. A fresh ControlNet's output layers are zero (it changes nothing): give them weights.
    with torch.no_grad():
        for block in (*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block):
            block.weight.normal_(0, 0.5)
    out = data_dir / "controlnets" / "canny"
    controlnet.save_pretrained(out)
    return out


@pytest.fixture
async def generator(data_dir, lora_dir, controlnet_dir):
    gen = DiffusersGenerator(
        {"tiny": "tiny"}, data_dir=data_dir, device="cpu",
        loras={"ink": {"source": str(lora_dir / "pytorch_lora_weights.safetensors"), "weight": 0.8,
                       "triggers": ["ink style"]}},
        controlnets={"canny": str(controlnet_dir)},
    )
    yield gen
    await gen.close()


def request(**params):
    params.setdefault("model", "tiny")
    params.setdefault("prompt", "a lighthouse")
    params.setdefault("seed", 7)
    return generation_request(**params)


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def control_png() -> bytes:
    image = Image.new("RGB", (64, 64), "black")
    for x in range(16, 48):
        for y in (16, 47):
            image.putpixel((x, y), (255, 255, 255))
            image.putpixel((y, x), (255, 255, 255))
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


async def test_lora_changes_the_image_reproducibly_and_weight_zero_is_no_lora(generator):
    plain = pixels((await generator.generate(request())).data)
    styled = await generator.generate(request(options={"lora": "ink:0.8"}))
    again = await generator.generate(request(options={"lora": "ink:0.8"}))
    zero = await generator.generate(request(options={"lora": "ink:0"}))
    assert not np.array_equal(pixels(styled.data), plain)
    assert np.array_equal(pixels(styled.data), pixels(again.data))
    # Weight 0 and the trigger word left out: exactly the image without the LoRA.
    assert np.array_equal(pixels(zero.data), plain)
    # Switched off again (not reloaded): the base model is unchanged.
    assert np.array_equal(pixels((await generator.generate(request())).data), plain)
    text = Image.open(io.BytesIO(styled.data)).text
    assert text["lora"] == "ink:0.8" and text["prompt"] == "a lighthouse"


async def test_a_lora_is_loaded_once_and_its_default_weight_applies(generator):
    default = await generator.generate(request(options={"lora": "ink"}))
    explicit = await generator.generate(request(options={"lora": "ink:0.8"}))
    assert np.array_equal(pixels(default.data), pixels(explicit.data))
    entry = generator._models.loaded.get("tiny")
    assert entry["adapters"] == {"ink"}


async def test_controlnet_changes_the_image_and_is_reproducible(generator):
    plain = pixels((await generator.generate(request())).data)
    control = {"options": {"control": "canny"}}
    a = await generator.generate(dataclasses.replace(request(**control), control_image=control_png()))
    b = await generator.generate(dataclasses.replace(request(**control), control_image=control_png()))
    weak = await generator.generate(dataclasses.replace(
        request(options={"control": "canny", "control_scale": "0"}), control_image=control_png()))
    assert np.array_equal(pixels(a.data), pixels(b.data))
    assert not np.array_equal(pixels(a.data), plain)
    assert np.array_equal(pixels(weak.data), plain)  # scale 0: the ControlNet adds nothing
    assert Image.open(io.BytesIO(a.data)).text["control"] == "canny"


def _batch_jobs(**params) -> list:
    # Different prompts and seeds, the same prompt twice: each row among different neighbours.
    return [request(seed=s, prompt=p, **params) for s, p in ((1, "a cat"), (2, "a dog"), (3, "a cat"), (4, "x"))]


BATCHES = {
    "no guidance": lambda: _batch_jobs(),
    "guidance and negatives": lambda: [request(seed=s, prompt="a cat", guidance=5.0, negative_prompt=n)
                                       for s, n in ((1, "fog"), (2, None), (3, "rain"), (4, "fog"))],
    "lora": lambda: _batch_jobs(options={"lora": "ink:0.8"}),
    "controlnet": lambda: [dataclasses.replace(j, control_image=control_png())
                           for j in _batch_jobs(options={"control": "canny"})],
}


@pytest.fixture
async def batching(data_dir, lora_dir, controlnet_dir):
    gen = DiffusersGenerator(
        {"tiny": "tiny"}, data_dir=data_dir, device="cpu", batch_size=4, batch_window_s=0.2,
        loras={"ink": str(lora_dir / "pytorch_lora_weights.safetensors")}, controlnets={"canny": str(controlnet_dir)})
    yield gen
    await gen.close()


@pytest.mark.parametrize("kind", BATCHES)
async def test_a_batched_image_is_bit_identical_to_its_solo_run(batching, kind):
    jobs = BATCHES[kind]()
    batched = await asyncio.gather(*(batching.generate(j) for j in jobs))
    trio = await asyncio.gather(*(batching.generate(j) for j in jobs[1:]))  # other positions and neighbours
    alone = [await batching.generate(j) for j in jobs]
    for a, b in zip(batched, alone, strict=True):
        assert np.array_equal(pixels(a.data), pixels(b.data))
    for a, b in zip(trio, alone[1:], strict=True):
        assert np.array_equal(pixels(a.data), pixels(b.data))
    assert len({pixels(a.data).tobytes() for a in batched}) == 4
    assert len({a.cost_usd for a in batched}) == 1  # one pipeline call, its seconds shared


def test_the_batching_rule():
    base = request()
    assert batch_key(base) == batch_key(request(seed=9, prompt="other", negative_prompt="fog"))
    for other in (request(steps=3), request(width=128), request(options={"lora": "ink"}),
                  request(guidance=2.0), request(model="other")):
        assert batch_key(other) != batch_key(base)
    assert batch_key(request(kind="variation", source_image=b"x")) is None


async def test_unknown_loras_and_controlnets_are_refused_before_any_work(generator):
    with pytest.raises(UnsupportedRequest, match="no LoRA 'nope'.*ink"):
        await generator.generate(request(options={"lora": "nope"}))
    with pytest.raises(UnsupportedRequest, match="no ControlNet 'depth'"):
        await generator.generate(dataclasses.replace(request(options={"control": "depth"}),
                                                     control_image=control_png()))
    with pytest.raises(UnsupportedRequest, match="needs a control image"):
        await generator.generate(request(options={"control": "canny"}))
    with pytest.raises(UnsupportedRequest, match="at most 3 LoRAs"):
        await generator.generate(request(options={"lora": "a,b,c,d"}))


def test_inline_lora_flags():
    parsed = parse_flags("a castle --lora ink --lora detail:0.5")
    assert parsed.prompt == "a castle" and parsed.options == {"lora": "ink,detail:0.5"}
    with pytest.raises(FlagError, match="LoRA weight"):
        parse_flags("a castle --lora ink:9")


def test_family_defaults_are_read_and_overridable():
    xl = model_config("xl", "stabilityai/stable-diffusion-xl-base-1.0", {}, steps=4, guidance=0.0)
    assert (xl.family, xl.size, xl.negative_prompt) == ("sdxl", (1024, 1024), True)
    turbo = model_config("t", "stabilityai/sd-turbo", {"steps": 2}, steps=4, guidance=0.0)
    assert (turbo.family, turbo.steps, turbo.guidance, turbo.negative_prompt) == ("sd-turbo", 2, 0.0, False)
    flux = model_config("f", "black-forest-labs/FLUX.1-schnell", {"size": "768x768"}, steps=4, guidance=0.0)
    assert (flux.family, flux.size) == ("flux", (768, 768))
    with pytest.raises(ValueError, match="no setting"):
        model_config("x", "tiny", {"stpes": 3}, steps=4, guidance=0.0)


def test_canny_finds_the_edges_of_a_square():
    edges = np.asarray(canny(Image.open(io.BytesIO(control_png()))).convert("L"))
    assert edges[:8].max() == 0 and edges[28:36, 28:36].max() == 0  # flat areas have no edges
    assert edges[12:20, 20:44].max() == 255  # the square's top side


def _easel(root: Path, *args: str):
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "EASEL_CONFIG"} | {"HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "bot.cli", "--config", str(root / "easel.toml"), *args, "--json"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=120)
    return done.returncode, (json.loads(done.stdout) if done.stdout.strip() else {}), done.stderr


def test_the_cli_takes_loras_and_controlnets_and_refuses_unknown_names(tmp_path, data_dir, lora_dir,
                                                                     controlnet_dir):
    from tests.helpers import write_workspace_config

    root = tmp_path / "ws"
    write_workspace_config(root, image_classifier="none", **{
        "generators.local.models": {"tiny": str(data_dir / "models" / "tiny")},
        "generators.local.loras": {"ink": str(lora_dir)},
        "generators.local.controlnets": {"canny": str(controlnet_dir)},
    })
    (root / "edges.png").write_bytes(control_png())
    small = ("--size", "64x64", "--seed", "5", "--model", "tiny")
    code, out, _ = _easel(root, "imagine", "a cat --lora nope", *small)
    assert code == 2 and "no LoRA 'nope'" in out["error"] and out["job_id"] is None
    code, out, _ = _easel(root, "imagine", "a cat", "--control", "depth", "--control-image",
                          str(root / "edges.png"), *small)
    assert code == 2 and "no ControlNet 'depth'" in out["error"] and out["job_id"] is None
    code, out, err = _easel(root, "imagine", "a cat --lora ink:0.5", "--control", "canny", "--control-image",
                            str(root / "edges.png"), "--control-scale", "0.9", *small)
    assert code == 0, err
    text = Image.open(root / out["image_path"]).text  # the job's image records how it was made
    assert (text["lora"], text["control"], text["control_scale"]) == ("ink:0.5", "canny", "0.9")
