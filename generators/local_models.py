"""The local generator's models: families and their defaults, loading (a diffusers folder, a
single-file checkpoint or a hub id), device options, and the LRU of loaded models bounded by a
memory budget. Everything here but the family rules runs in the generator's worker thread."""
from __future__ import annotations

import gc
import importlib.util
import json
import logging
import re
import sys
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bot.core.models import GeneratorUnavailable

log = logging.getLogger(__name__)

TINY_SOURCE = "tiny"  # a model source that names the built-in tiny random model
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
# owner/name, as on the Hugging Face hub; anything else is taken for a local path.
HUB_ID_PATTERN = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
ATTENTION = ("sdpa", "default")


@dataclass(frozen=True)
class Family:
    """Defaults for one architecture: what a request gets when it says nothing."""

    size: tuple[int, int]
    steps: int
    guidance: float
    negative_prompt: bool
    pipeline: str  # the diffusers class a single-file checkpoint of this family loads with


FAMILIES: dict[str, Family] = {
    # The tiny random model (generators/tiny.py): its steps and guidance come from the settings.
    "tiny": Family((512, 512), 4, 0.0, True, "StableDiffusionPipeline"),
    "sd1": Family((512, 512), 25, 7.5, True, "StableDiffusionPipeline"),
    "sd2": Family((768, 768), 25, 7.5, True, "StableDiffusionPipeline"),
    "sdxl": Family((1024, 1024), 30, 5.0, True, "StableDiffusionXLPipeline"),
    # Distilled: 1-4 steps without classifier-free guidance, so a negative prompt does nothing.
    "sd-turbo": Family((512, 512), 1, 0.0, False, "StableDiffusionPipeline"),
    "sdxl-turbo": Family((512, 512), 1, 0.0, False, "StableDiffusionXLPipeline"),
    "flux": Family((1024, 1024), 4, 0.0, False, "FluxPipeline"),  # schnell
    "flux-dev": Family((1024, 1024), 28, 3.5, False, "FluxPipeline"),
}


@dataclass(frozen=True)
class ModelConfig:
    """One configured model: its source and what the settings override of its family."""

    name: str
    source: str
    family: str
    size: tuple[int, int]
    steps: int
    guidance: float
    negative_prompt: bool
    safety_checker: bool = False
    preview: str | None = None  # an AutoencoderTiny (TAESD) folder or hub id for step previews

    @property
    def pipeline_class(self) -> str:
        return FAMILIES.get(self.family, FAMILIES["sd1"]).pipeline


def model_config(
    name: str, source: str, overrides: Mapping[str, Any], *, steps: int, guidance: float
) -> ModelConfig:
    """The model's settings: its family's defaults (the tiny family: `steps` and `guidance`), with
    `overrides` (family, size, steps, guidance, negative_prompt, safety_checker, preview) on top."""
    unknown = set(overrides) - {"family", "size", "steps", "guidance", "negative_prompt",
                                "safety_checker", "preview"}
    if unknown:
        raise ValueError(f"local model {name!r} has no setting {', '.join(sorted(unknown))}")
    family = overrides.get("family") or detect_family(source)
    if family not in FAMILIES:
        raise ValueError(f"local model {name!r}: family must be one of {', '.join(FAMILIES)}")
    base = FAMILIES[family]
    config = ModelConfig(name, source, family, base.size, base.steps, base.guidance, base.negative_prompt)
    if family == "tiny":
        config = replace(config, steps=steps, guidance=guidance)
    given = {k: v for k, v in overrides.items() if v is not None and k != "family"}
    if isinstance(given.get("size"), str):
        w, _, h = given["size"].lower().partition("x")
        given["size"] = (int(w), int(h))
    return replace(config, **given)


def pipeline_class(source: str) -> str:
    """The pipeline class named by the model's model_index.json, where it is on disk ("" if not)."""
    if source == TINY_SOURCE:
        return "StableDiffusionPipeline"  # the tiny model is built as an SD 1.x pipeline
    index: Path | None = None
    local = Path(source).expanduser()
    if (local / "model_index.json").is_file():
        index = local / "model_index.json"
    elif HUB_ID_PATTERN.fullmatch(source) and importlib.util.find_spec("huggingface_hub"):
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(source, "model_index.json")
        index = Path(cached) if isinstance(cached, str) else None
    if index is None:
        return ""
    try:
        return str(json.loads(index.read_text(encoding="utf-8")).get("_class_name", ""))
    except (OSError, ValueError):
        return ""


def detect_family(source: str) -> str:
    """sd1, sd2, sdxl, sd-turbo, sdxl-turbo, flux or flux-dev: from the pipeline class, else the name."""
    from generators.tiny import TINY_MARKER

    if source == TINY_SOURCE or (Path(source).expanduser() / TINY_MARKER).is_file():
        return "tiny"
    name, class_name = source.lower(), pipeline_class(source)
    if "Flux" in class_name or "flux" in name:
        return "flux-dev" if "dev" in name else "flux"
    xl = "XL" in class_name or "xl" in name
    if "turbo" in name:
        return "sdxl-turbo" if xl else "sd-turbo"
    if xl:
        return "sdxl"
    if re.search(r"stable-diffusion-2|sd-?2|2[-.]1", name):
        return "sd2"
    return "sd1"


@dataclass(frozen=True)
class DeviceOptions:
    """How pipelines are placed and sped up (see [generators.local] in the settings)."""

    device: str = "cpu"
    dtype: Any = None  # a torch dtype
    cpu_offload: bool = False
    vae_tiling: bool = False
    vae_slicing: bool = False
    attention: str = "sdpa"
    compile: bool = False
    channels_last: bool = False
    batch_exact: bool = False  # batch-invariant kernels (generators.local_exact), set with batching on


def resolve_device(choice: str, dtype_choice: str, options: Mapping[str, Any]) -> DeviceOptions:
    """The device ("auto": cuda, then mps, then cpu) and dtype ("auto": float16 on a GPU)."""
    import torch

    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    elif choice.startswith("cuda") and not torch.cuda.is_available():
        raise GeneratorUnavailable(
            f"the local generator is set to device {choice!r}, but this torch ({torch.__version__}) "
            f"sees no CUDA GPU"
        )
    elif choice == "mps" and not torch.backends.mps.is_available():
        raise GeneratorUnavailable("the local generator is set to device 'mps', but MPS is not available")
    if dtype_choice == "auto":
        dtype = torch.float32 if choice == "cpu" else torch.float16
    else:
        dtype = getattr(torch, dtype_choice)
    return DeviceOptions(device=choice, dtype=dtype, **options)


def load_pipeline(config: ModelConfig, location: str, options: DeviceOptions, *, allow_download: bool) -> Any:
    """Load a text-to-image pipeline from a folder, a single file or a hub id, then apply the
    device options. `location` is the folder, file or hub id to read."""
    from diffusers import AutoPipelineForText2Image

    kwargs: dict[str, Any] = {"torch_dtype": options.dtype}
    if not config.safety_checker:
        kwargs["safety_checker"] = None  # easel screens every image itself
    if location.endswith(SINGLE_FILE_SUFFIXES):
        import diffusers

        loader: Callable[..., Any] = getattr(diffusers, config.pipeline_class).from_single_file
    else:
        loader = AutoPipelineForText2Image.from_pretrained
    try:
        pipe = loader(location, local_files_only=True, **kwargs)
    except OSError:
        if not (HUB_ID_PATTERN.fullmatch(location) and allow_download):
            raise
        log.info("%s is not in the Hugging Face cache; downloading it", location)
        pipe = loader(location, **kwargs)
    if config.safety_checker and getattr(pipe, "safety_checker", None) is None:
        raise GeneratorUnavailable(
            f"local model {config.name!r} is set to use its safety checker, but it has none"
        )
    place(pipe, options)
    return pipe


def place(pipe: Any, options: DeviceOptions) -> None:
    """Move the pipeline to its device and apply the memory and speed options."""
    import torch

    if options.cpu_offload and options.device.startswith("cuda"):
        pipe.enable_model_cpu_offload(device=options.device)  # each component on the GPU in turn
    else:
        pipe.to(options.device)
    vae = getattr(pipe, "vae", None)
    if vae is not None and options.vae_tiling:
        vae.enable_tiling()
    if vae is not None and options.vae_slicing:
        vae.enable_slicing()
    denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    if denoiser is not None and options.attention == "sdpa" and hasattr(denoiser, "set_attn_processor"):
        from diffusers.models.attention_processor import AttnProcessor2_0

        if getattr(pipe, "unet", None) is not None:  # Flux has its own SDPA processors already
            denoiser.set_attn_processor(AttnProcessor2_0())
    if denoiser is not None and options.channels_last:
        denoiser.to(memory_format=torch.channels_last)
    if denoiser is not None and options.compile:
        # Compiled once per shape; a LoRA switch only changes weights (peft layers stay in place).
        denoiser.forward = torch.compile(denoiser.forward, mode="max-autotune-no-cudagraphs")
    pipe.set_progress_bar_config(disable=True)


def pipeline_bytes(pipe: Any) -> int:
    """The memory the pipeline's weights take (parameters and buffers of every component)."""
    total = 0
    for component in getattr(pipe, "components", {}).values():
        for tensor in (*_tensors(component, "parameters"), *_tensors(component, "buffers")):
            total += tensor.numel() * tensor.element_size()
    return total


def _tensors(component: Any, what: str) -> list[Any]:
    method = getattr(component, what, None)
    return list(method()) if callable(method) else []


def files_bytes(location: str) -> int:
    """The size of a model's weight files on disk (0 when unknown): a first guess of its memory."""
    path = Path(location).expanduser()
    if path.is_file():
        return path.stat().st_size
    if not path.is_dir():
        return 0
    return sum(f.stat().st_size for f in path.rglob("*") if f.suffix in (".safetensors", ".bin"))


class LoadedModels:
    """The loaded models, least recently used first, kept within `budget_bytes` (0: no bound).
    Each entry holds a model's pipelines (by task) and whatever else belongs to it."""

    def __init__(self, budget_bytes: int):
        self.budget = budget_bytes
        self._entries: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._bytes: dict[str, int] = {}
        self.where: dict[str, str] = {}  # model -> "cuda, 2.1 GB": read from any thread

    def get(self, name: str) -> dict[str, Any] | None:
        entry = self._entries.get(name)
        if entry is not None:
            self._entries.move_to_end(name)
        return entry

    def make_room(self, incoming: int, keep: str) -> None:
        """Unload least recently used models until `incoming` more bytes fit the budget."""
        if not self.budget:
            return
        while self._entries and sum(self._bytes.values()) + incoming > self.budget:
            oldest = next(iter(self._entries))
            if oldest == keep:
                return
            log.info("unloading local model %r to stay within the memory budget", oldest)
            self.drop(oldest)

    def add(self, name: str, entry: dict[str, Any], size: int, device: str) -> None:
        self._entries[name] = entry
        self._bytes[name] = size
        self.where[name] = f"loaded on {device}, {size / 1e9:.2f} GB"
        self.make_room(0, keep=name)

    def drop(self, name: str) -> None:
        self._entries.pop(name, None)
        self._bytes.pop(name, None)
        self.where.pop(name, None)
        free_memory()

    def clear(self) -> None:
        for name in list(self._entries):
            self.drop(name)


def free_memory() -> None:
    gc.collect()
    if "torch" in sys.modules:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
