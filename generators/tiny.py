"""A tiny Stable Diffusion pipeline with random weights, built offline.

It makes noise, not pictures, but it runs the real diffusers code paths (text encoder, UNet, VAE,
scheduler, img2img, inpainting) in about a second on a CPU, so the bot and its tests can exercise
the local generator end to end with no download. The weights are seeded: every build is the same.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

TINY_SEED = 0
TINY_MARKER = "easel-tiny.txt"  # marks a folder as the tiny model
CLIP_MAX_TOKENS = 77  # the tokenizer's default max length is effectively infinite: OverflowError


def _bytes_to_unicode() -> list[str]:
    """The 256 printable stand-ins for bytes that byte-level BPE (GPT-2, CLIP) uses."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


def write_tokenizer_files(folder: Path) -> None:
    """A byte-level vocabulary with no merges: every character is a token, so any prompt encodes."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = _bytes_to_unicode()
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(tokens)}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")


def build_tiny_pipeline(path: Path) -> None:
    """Build the tiny pipeline and save it to `path` (a directory), replacing it atomically."""
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Built beside `path`, on the same filesystem, so the final rename is atomic.
    work = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        write_tokenizer_files(work / "tokenizer-source")
        tokenizer = CLIPTokenizer.from_pretrained(
            work / "tokenizer-source", model_max_length=CLIP_MAX_TOKENS
        )
        # A private RNG stream: the weights are the same every time, and the caller's global
        # torch RNG is left as it was.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(TINY_SEED)
            text_encoder = CLIPTextModel(
                CLIPTextConfig(
                    vocab_size=len(tokenizer),
                    hidden_size=32,
                    intermediate_size=37,
                    num_attention_heads=4,
                    num_hidden_layers=2,
                    max_position_embeddings=CLIP_MAX_TOKENS,
                    bos_token_id=tokenizer.bos_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id,
                )
            )
            unet = UNet2DConditionModel(
                block_out_channels=(32, 64),
                layers_per_block=1,
                sample_size=64,
                in_channels=4,
                out_channels=4,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                cross_attention_dim=32,
                attention_head_dim=8,
            )
            # Four blocks give the usual 8x latent downscale; with two, a 512x512 image means a
            # 256x256 latent and a UNet pass ~80x slower.
            vae = AutoencoderKL(
                block_out_channels=(8, 16, 32, 32),
                in_channels=3,
                out_channels=3,
                down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4,
                latent_channels=4,
                norm_num_groups=8,
                sample_size=512,
            )
            scheduler = EulerDiscreteScheduler(
                beta_start=0.00085,
                beta_end=0.012,
                beta_schedule="scaled_linear",
                num_train_timesteps=1000,
                timestep_spacing="trailing",
                steps_offset=1,
            )
        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        model_dir = work / "model"
        pipe.save_pretrained(model_dir)
        # Read by generators.local_models: the tiny model's defaults are few steps, no guidance.
        (model_dir / TINY_MARKER).write_text("built by easel's generators/tiny.py\n", encoding="utf-8")
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}-old-", dir=path.parent))
            path.rename(old / "model")
            model_dir.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            model_dir.rename(path)
    finally:
        shutil.rmtree(work, ignore_errors=True)
