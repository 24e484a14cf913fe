"""The local generator on a tiny SDXL pipeline (two text encoders, the text-time embedding) built
from configs with random weights: its family is detected and its defaults applied, it reproduces,
a batched image equals its solo run, and a LoRA is switched per request."""
from __future__ import annotations

import asyncio
import io
from pathlib import Path

import pytest

pytest.importorskip("peft", reason="LoRA needs peft (the 'local' extra)")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from generators.local import DiffusersGenerator  # noqa: E402
from generators.tiny import CLIP_MAX_TOKENS, write_tokenizer_files  # noqa: E402
from tests.helpers import generation_request  # noqa: E402


def _text_encoders(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_attention_heads=4,
                            num_hidden_layers=2, projection_dim=32, max_position_embeddings=CLIP_MAX_TOKENS,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)
    return CLIPTextModel(config), CLIPTextModelWithProjection(config)


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory) -> Path:
    """A tiny StableDiffusionXLPipeline, saved in a folder whose name says nothing of its family."""
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTokenizer

    root = tmp_path_factory.mktemp("sdxl")
    write_tokenizer_files(root / "tokenizer-source")
    tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer-source", model_max_length=CLIP_MAX_TOKENS)
    torch.manual_seed(0)
    text_encoder, text_encoder_2 = _text_encoders(tokenizer)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + 32,  # six size/crop values, and the pooled text
        cross_attention_dim=64, norm_num_groups=8)  # both encoders' hidden states side by side
    vae = AutoencoderKL(block_out_channels=(8, 16, 32, 32), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        norm_num_groups=8, sample_size=128)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       timestep_spacing="leading", steps_offset=1)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=scheduler)
    pipe.save_pretrained(root / "little")
    return root / "little"


@pytest.fixture(scope="module")
def sdxl_lora(sdxl_dir) -> Path:
    import torch
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(sdxl_dir / "unet")
    torch.manual_seed(1)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    out = sdxl_dir.parent / "loras" / "ink"
    StableDiffusionXLPipeline.save_lora_weights(
        out, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)))
    return out / "pytorch_lora_weights.safetensors"


@pytest.fixture
async def generator(sdxl_dir, sdxl_lora, tmp_path):
    gen = DiffusersGenerator({"xl": str(sdxl_dir)}, data_dir=tmp_path, device="cpu", batch_size=4,
                             batch_window_s=0.2, loras={"ink": {"source": str(sdxl_lora), "weight": 0.8}})
    yield gen
    await gen.close()


def request(**params):
    params = {"model": "xl", "prompt": "a lighthouse", "seed": 7, "steps": 3, **params}
    return generation_request(**params)


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


async def test_the_sdxl_family_is_detected_and_its_defaults_applied(generator):
    (spec,) = generator.models()
    assert (spec.family, spec.default_size, spec.default_guidance, spec.negative_prompt) == ("sdxl", (1024, 1024),
                                                                                              5.0, True)
    image = await generator.generate(request(steps=None))  # the family's 30 steps, guidance 5
    text = Image.open(io.BytesIO(image.data)).text
    assert (text["steps"], text["guidance"], text["size"]) == ("30", "5", "64x64")
    assert (image.width, image.height) == (64, 64)


async def test_sdxl_reproduces_a_seed_and_takes_a_negative_prompt(generator):
    a, b = (await asyncio.gather(generator.generate(request()), generator.generate(request(seed=8))))
    again = await generator.generate(request())
    negative = await generator.generate(request(negative_prompt="fog"))
    assert np.array_equal(pixels(a.data), pixels(again.data))
    assert not np.array_equal(pixels(a.data), pixels(b.data))
    assert not np.array_equal(pixels(a.data), pixels(negative.data))  # guidance 5: the negative counts


async def test_a_batched_sdxl_image_is_bit_identical_to_its_solo_run(generator):
    jobs = [request(seed=s, prompt=p, guidance=g) for g in (0.0, 5.0) for s, p in ((1, "a cat"), (2, "a dog"),
                                                                                  (3, "a cat"))]
    for group in (jobs[:3], jobs[3:]):
        batched = await asyncio.gather(*(generator.generate(j) for j in group))
        alone = [await generator.generate(j) for j in group]
        assert len({image.cost_usd for image in batched}) == 1  # one pipeline call
        for x, y in zip(batched, alone, strict=True):
            assert np.array_equal(pixels(x.data), pixels(y.data))


async def test_a_lora_switches_per_request_on_sdxl(generator):
    plain = pixels((await generator.generate(request())).data)
    styled = await generator.generate(request(options={"lora": "ink:0.8"}))
    zero = await generator.generate(request(options={"lora": "ink:0"}))
    assert not np.array_equal(pixels(styled.data), plain)
    assert np.array_equal(pixels(zero.data), plain)
    assert np.array_equal(pixels((await generator.generate(request())).data), plain)
    assert Image.open(io.BytesIO(styled.data)).text["lora"] == "ink:0.8"
    assert generator._models.loaded.get("xl")["adapters"] == {"ink"}
