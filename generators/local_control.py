"""LoRA adapters and ControlNets for the local generator. LoRAs are loaded once per base model
as named peft adapters and switched per call with set_adapters; a ControlNet pipeline is made from
the loaded base with from_pipe, so no base weights are loaded twice. Worker thread only."""
from __future__ import annotations

import importlib.util
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from bot.core.models import (
    CONTROL_OPTION,
    CONTROL_SCALE_OPTION,
    LORA_OPTION,
    GenerationRequest,
    GeneratorUnavailable,
    UnsupportedRequest,
    parse_loras,
)

log = logging.getLogger(__name__)

DEFAULT_CONTROL_SCALE = 1.0
# Preprocessors other than canny, and the optional package each needs.
PREPROCESSOR_PACKAGES = {"depth": "transformers", "openpose": "controlnet_aux", "scribble": "controlnet_aux",
                         "lineart": "controlnet_aux", "softedge": "controlnet_aux"}
PREPROCESSORS = ("none", "canny", *PREPROCESSOR_PACKAGES)


@dataclass(frozen=True)
class Lora:
    name: str
    source: str  # a .safetensors file, a folder holding one, or a hub id
    weight: float = 1.0
    triggers: tuple[str, ...] = ()  # words added to the prompt when the LoRA is used


@dataclass(frozen=True)
class ControlNet:
    name: str
    source: str  # a diffusers ControlNetModel folder or hub id
    preprocessor: str = "none"  # what turns the request's image into the control image


def loras_from(table: Mapping[str, Any]) -> dict[str, Lora]:
    """[generators.local.loras]: name -> source, or -> {source, weight, triggers}."""
    out = {}
    for name, value in table.items():
        value = {"source": value} if isinstance(value, str) else dict(value)
        triggers = value.get("triggers", ())
        out[name] = Lora(name, value["source"], float(value.get("weight", 1.0)),
                         (triggers,) if isinstance(triggers, str) else tuple(triggers))
    return out


def controlnets_from(table: Mapping[str, Any]) -> dict[str, ControlNet]:
    """[generators.local.controlnets]: name -> source, or -> {source, preprocessor}; the
    preprocessor defaults to the name's when it names one (canny, depth...), else none."""
    out = {}
    for name, value in table.items():
        value = {"source": value} if isinstance(value, str) else dict(value)
        pre = value.get("preprocessor") or (name if name in PREPROCESSORS else "none")
        if pre not in PREPROCESSORS:
            raise ValueError(f"ControlNet {name!r}: preprocessor must be one of {', '.join(PREPROCESSORS)}")
        out[name] = ControlNet(name, value["source"], pre)
    return out


def chosen_loras(options: Mapping[str, str], loras: Mapping[str, Lora]) -> list[tuple[Lora, float]]:
    """The request's LoRAs with their weights (a LoRA's own default where none is given)."""
    picked = parse_loras(options.get(LORA_OPTION, ""))
    return [(loras[name], loras[name].weight if w is None else w) for name, w in picked]


def with_triggers(prompt: str, chosen: list[tuple[Lora, float]]) -> str:
    """The prompt with the chosen LoRAs' trigger words it does not already hold."""
    lower = prompt.lower()
    extra = [t for lora, w in chosen if w != 0 for t in lora.triggers if t.lower() not in lower]
    return ", ".join([prompt, *extra]) if extra else prompt


def use_loras(pipe: Any, loaded: set[str], chosen: list[tuple[Lora, float]]) -> None:
    """Make `chosen` the active adapters of `pipe` (the base, whose components every derived
    pipeline shares), loading any not loaded yet; with none chosen, adapters are switched off."""
    for lora, _ in chosen:
        if lora.name not in loaded:
            _load_lora(pipe, lora)
            loaded.add(lora.name)
    if chosen:
        pipe.enable_lora()
        pipe.set_adapters([lora.name for lora, _ in chosen], [w for _, w in chosen])
    elif loaded:
        pipe.disable_lora()


def _load_lora(pipe: Any, lora: Lora) -> None:
    path = Path(lora.source).expanduser()
    kwargs: dict[str, Any] = {"adapter_name": lora.name}
    location = lora.source
    if path.is_file():
        location, kwargs["weight_name"] = str(path.parent), path.name
    elif path.is_dir():
        location = str(path)
    log.info("loading LoRA %r from %s", lora.name, lora.source)
    try:
        pipe.load_lora_weights(location, **kwargs)
    except Exception as exc:  # a missing file, a LoRA for another architecture...
        raise GeneratorUnavailable(f"the LoRA {lora.name!r} could not be loaded from {lora.source!r}: "
                                   f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None


def control_pipeline(base: Any, controlnet: ControlNet, cache: dict[str, Any], dtype: Any, device: str) -> Any:
    """The ControlNet variant of `base` (cached by ControlNet name), sharing the base's weights."""
    if controlnet.name in cache:
        return cache[controlnet.name]
    from diffusers import AutoPipelineForText2Image, ControlNetModel

    try:
        model = ControlNetModel.from_pretrained(controlnet.source, torch_dtype=dtype).to(device)
    except Exception as exc:
        raise GeneratorUnavailable(
            f"the ControlNet {controlnet.name!r} could not be loaded from {controlnet.source!r}: "
            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        ) from None
    try:
        pipe = AutoPipelineForText2Image.from_pipe(base, controlnet=model)
    except (ValueError, KeyError) as exc:
        raise UnsupportedRequest(f"{type(base).__name__} has no ControlNet pipeline: {exc}") from None
    pipe.set_progress_bar_config(disable=True)
    cache[controlnet.name] = pipe
    return pipe


def control_args(request: GenerationRequest, controlnet: ControlNet, image: Image.Image) -> dict[str, Any]:
    """The pipeline arguments for the request's control: the preprocessed image and the scale."""
    size = (request.width, request.height)
    control = preprocess(image.convert("RGB"), controlnet.preprocessor)
    if control.size != size:
        control = control.resize(size, Image.BILINEAR)
    scale = float(request.options.get(CONTROL_SCALE_OPTION, DEFAULT_CONTROL_SCALE))
    return {"image": control, "controlnet_conditioning_scale": scale}


def control_text(request: GenerationRequest, controlnet: ControlNet) -> dict[str, str]:
    scale = float(request.options.get(CONTROL_SCALE_OPTION, DEFAULT_CONTROL_SCALE))
    return {CONTROL_OPTION: controlnet.name, CONTROL_SCALE_OPTION: f"{scale:g}",
            "preprocessor": controlnet.preprocessor}


def preprocess(image: Image.Image, preprocessor: str) -> Image.Image:
    """Turn an ordinary picture into what the ControlNet reads (edges, depth, a pose...)."""
    if preprocessor == "none":
        return image
    if preprocessor == "canny":
        return canny(image)
    package = PREPROCESSOR_PACKAGES[preprocessor]
    if importlib.util.find_spec(package) is None:
        raise UnsupportedRequest(
            f"the {preprocessor} preprocessor needs the optional package {package!r} "
            f"(pip install {package.replace('_', '-')}); or send a ready {preprocessor} map and "
            f"set the ControlNet's preprocessor to \"none\""
        )
    return _optional_preprocess(image, preprocessor)


def _optional_preprocess(image: Image.Image, preprocessor: str) -> Image.Image:
    if preprocessor == "depth":
        from transformers import pipeline

        return pipeline("depth-estimation")(image)["depth"].convert("RGB")
    import controlnet_aux

    detector = {"openpose": "OpenposeDetector", "scribble": "HEDdetector", "lineart": "LineartDetector",
                "softedge": "PidiNetDetector"}[preprocessor]
    model = getattr(controlnet_aux, detector).from_pretrained("lllyasviel/Annotators")
    return model(image, scribble=True) if preprocessor == "scribble" else model(image)


def canny(image: Image.Image, low: float = 100.0, high: float = 200.0) -> Image.Image:
    """Canny edges (white on black, RGB), as ControlNet's canny models were trained on: Sobel
    gradients, thinning to local maxima, and hysteresis between the two thresholds."""
    import numpy as np

    grey = np.asarray(image.convert("L").filter(_gaussian()), dtype=np.float32)
    padded = np.pad(grey, 1, mode="edge")
    gx = (padded[:-2, 2:] + 2 * padded[1:-1, 2:] + padded[2:, 2:]
          - padded[:-2, :-2] - 2 * padded[1:-1, :-2] - padded[2:, :-2])
    gy = (padded[2:, :-2] + 2 * padded[2:, 1:-1] + padded[2:, 2:]
          - padded[:-2, :-2] - 2 * padded[:-2, 1:-1] - padded[:-2, 2:])
    magnitude = np.hypot(gx, gy)
    # Each pixel's gradient direction rounded to 0, 45, 90 or 135 degrees.
    sector = (np.round(np.arctan2(gy, gx) / (np.pi / 4)) % 4).astype(np.int8)
    m = np.pad(magnitude, 1)
    h, w = magnitude.shape
    keep = np.zeros_like(magnitude, dtype=bool)
    for s, (dy, dx) in enumerate(((0, 1), (1, 1), (1, 0), (1, -1))):
        ahead = m[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
        behind = m[1 - dy:1 - dy + h, 1 - dx:1 - dx + w]
        keep |= (sector == s) & (magnitude >= ahead) & (magnitude >= behind)
    strong = keep & (magnitude >= high)
    weak = keep & (magnitude >= low)
    edges = strong
    for _ in range(max(h, w)):  # grow strong edges along connected weak ones
        grown = np.pad(edges, 1)
        near = np.zeros_like(edges)
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                near |= grown[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
        grown_edges = weak & near
        if (grown_edges == edges).all():
            break
        edges = grown_edges | strong
    return Image.fromarray((edges * 255).astype(np.uint8), "L").convert("RGB")


def _gaussian() -> Any:
    from PIL import ImageFilter

    return ImageFilter.GaussianBlur(radius=1.0)
