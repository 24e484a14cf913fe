"""Upscaling for the local generator: a diffusers upscale pipeline when one is configured, else
Lanczos resampling, labelled as such. Worker thread only."""
from __future__ import annotations

import time
from typing import Any

from PIL import Image

from bot.core.models import GenerationRequest, GeneratorUnavailable
from generators.local_batch import Call
from generators.local_models import HUB_ID_PATTERN, DeviceOptions, place
from generators.local_run import Interrupted, _decode

UPSCALER_STEPS = 20
LANCZOS_NOTE = "upscaled by Lanczos resampling; no upscaler model is configured"
UPSCALE_PIPELINES = ("StableDiffusionUpscalePipeline", "StableDiffusionLatentUpscalePipeline")


def load_upscaler(source: str, options: DeviceOptions, *, allow_download: bool) -> Any:
    from diffusers import DiffusionPipeline

    try:
        try:
            pipe = DiffusionPipeline.from_pretrained(source, torch_dtype=options.dtype, local_files_only=True)
        except OSError:
            if not (HUB_ID_PATTERN.fullmatch(source) and allow_download):
                raise
            pipe = DiffusionPipeline.from_pretrained(source, torch_dtype=options.dtype)
    except Exception as exc:
        line = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise GeneratorUnavailable(
            f"the upscaler could not be loaded from {source!r} ({line}); check that it is a complete "
            f"diffusers upscaler (or download it first while online)"
        ) from None
    if type(pipe).__name__ not in UPSCALE_PIPELINES:
        raise GeneratorUnavailable(
            f"the upscaler {source!r} is a {type(pipe).__name__}, not a Stable Diffusion upscale pipeline"
        )
    place(pipe, options)
    return pipe


def upscale(call: Call, pipe: Any, upscaler: str | None, device: str) -> tuple[Image.Image, dict[str, str],
                                                                              str | None, float]:
    """The upscaled image, its text fields, a note and the seconds it took."""
    request: GenerationRequest = call.request
    source = _decode(request.source_image, "source").convert("RGB")
    factor = request.upscale_factor
    size = (source.width * factor, source.height * factor)
    text = {"prompt": request.prompt, "model": request.model, "kind": "upscale", "size": f"{size[0]}x{size[1]}"}
    started = time.perf_counter()
    if pipe is None:
        image = source.resize(size, Image.LANCZOS)
        text["upscaler"] = "lanczos"
        if call.progress is not None:
            call.progress(1.0, None)
        return image, text, LANCZOS_NOTE, time.perf_counter() - started
    import torch

    steps = request.steps or UPSCALER_STEPS

    def on_step(i: int, t: Any, latents: Any) -> None:  # upscalers take only the older callback
        if call.cancel.is_set():
            raise Interrupted()
        if call.progress is not None:
            call.progress(min(1.0, (i + 1) / steps), None)

    args: dict[str, Any] = {"prompt": request.prompt, "image": source, "num_inference_steps": steps,
                            "generator": torch.Generator(device).manual_seed(request.seed or 0),
                            "callback": on_step, "callback_steps": 1}
    if request.guidance is not None:
        args["guidance_scale"] = request.guidance
    if request.negative_prompt:
        args["negative_prompt"] = request.negative_prompt
    image = pipe(**args).images[0]
    made = image.size
    if made != size:
        image = image.resize(size, Image.LANCZOS)
    text.update(seed=str(request.seed), upscaler=str(upscaler), steps=str(steps))
    note = f"upscaled with {upscaler}"
    if made != size:
        note += f" to {made[0]}x{made[1]}, then resampled (Lanczos) to {size[0]}x{size[1]}"
    return image, text, note, time.perf_counter() - started
