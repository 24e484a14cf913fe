"""Step previews for the local generator: a tiny autoencoder (TAESD, when configured) or a linear
projection of the latents to RGB. Never a full VAE decode per step: that costs as much as a step."""
from __future__ import annotations

from typing import Any

from PIL import Image

from generators.images import encode_png

PREVIEW_SIDE = 128
# Projects the 4 Stable Diffusion latent channels to RGB: a rough preview without the VAE.
_LATENT_RGB = (
    (0.3512, 0.2297, 0.3227),
    (0.3250, 0.4974, 0.2350),
    (-0.2829, 0.1762, 0.2721),
    (-0.2120, -0.2616, -0.7177),
)


def load_taesd(source: str, dtype: Any, device: str) -> Any:
    """An AutoencoderTiny (TAESD) from a folder or hub id."""
    from diffusers import AutoencoderTiny

    return AutoencoderTiny.from_pretrained(source, torch_dtype=dtype).to(device)


def preview(latents: Any, index: int, taesd: Any = None) -> bytes | None:
    """A small PNG of image `index` of a batch of SD-style latents (4 channels, NCHW); None for
    other layouts (Flux packs its latents)."""
    if latents is None or latents.ndim != 4 or latents.shape[1] != 4:
        return None
    import torch

    with torch.no_grad():
        if taesd is not None:
            # TAESD decodes the pipeline's scaled latents directly (its scaling factor is 1).
            decoded = taesd.decode(latents[index : index + 1].to(taesd.dtype)).sample[0]
            rgb = decoded.float().permute(1, 2, 0)
        else:
            factors = torch.tensor(_LATENT_RGB, dtype=torch.float32, device=latents.device)
            rgb = torch.einsum("chw,cr->hwr", latents[index].float(), factors)
    pixels = ((rgb + 1) * 127.5).clamp(0, 255).to(torch.uint8).cpu().numpy()
    image = Image.fromarray(pixels, "RGB")
    scale = PREVIEW_SIDE / max(image.size)
    image = image.resize(
        (max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BILINEAR
    )
    return encode_png(image)
