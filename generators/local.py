"""The local generator: Stable Diffusion-family models run with diffusers on this machine.

All torch work (the torch import itself, loading, diffusion) runs in one dedicated worker thread,
so the event loop never blocks and jobs take the GPU one at a time.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import importlib.util
import io
import json
import logging
import math
import re
import sys
import threading
import time
from pathlib import Path
from typing import Any

from PIL import Image

from bot.core.models import (
    GeneratedImage,
    GenerationRequest,
    GeneratorError,
    GeneratorUnavailable,
    ModelSpec,
    ProgressCallback,
    TransientGeneratorError,
    UnsupportedRequest,
)
from generators.images import ImageRejected, decode_image, encode_png

log = logging.getLogger(__name__)

PROVIDER = "local"
TINY_SOURCE = "tiny"  # a model source that names the built-in tiny random model
KINDS = frozenset({"imagine", "variation", "edit", "upscale"})
MISSING_EXTRA = (
    "the local generator needs the 'local' extra: pip install 'easel[local]' "
    "(install torch==2.13.0 first)"
)
DTYPES = ("auto", "float16", "bfloat16", "float32")
_DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
# owner/name, as on the Hugging Face hub; anything else is taken for a local path.
_HUB_ID_PATTERN = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")

# A variation's strength always comes with the request (the settings hold its default).
EDIT_STRENGTH = 0.75  # an edit without a mask redraws the whole image from the prompt
INPAINT_STRENGTH = 1.0  # with a mask, the masked area is drawn afresh
MAX_STEPS = 200  # as bot/config.py allows
UPSCALER_STEPS = 20
UPSCALE_FACTORS = (2, 3, 4)
MAX_UPSCALED_SIDE = 4096
PREVIEW_SIDE = 128
LANCZOS_NOTE = "upscaled by Lanczos resampling; no upscaler model is configured"
# Samplers a request may choose (`--sampler`): diffusers scheduler classes, made from the model's
# own scheduler config. "default" keeps the scheduler the model was saved with.
SAMPLERS = {
    "default": None,
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "ddim": "DDIMScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "heun": "HeunDiscreteScheduler",
    "unipc": "UniPCMultistepScheduler",
}

# Cost estimate (an upper bound): FIXED_ALLOWANCE_S + ESTIMATE_MARGIN x rate x megapixels x steps
# x (2 with classifier-free guidance, which runs the UNet twice). The rate, in seconds per
# megapixel-step, starts at a conservative default for the device and then follows the measured
# jobs of each model as an exponential moving average. Until torch has been loaded an "auto" device
# is costed as a CPU.
DEFAULT_SECONDS_PER_MP_STEP = {"cpu": 1.0, "mps": 0.3, "cuda": 0.05}
ESTIMATE_MARGIN = 2.0
FIXED_ALLOWANCE_S = 2.0  # text encoding, VAE decode, PNG encoding
RATE_SMOOTHING = 0.3  # weight of the newest job in the moving average

# Projects the 4 Stable Diffusion latent channels to RGB: a rough preview without the VAE.
_LATENT_RGB = (
    (0.3512, 0.2297, 0.3227),
    (0.3250, 0.4974, 0.2350),
    (-0.2829, 0.1762, 0.2721),
    (-0.2120, -0.2616, -0.7177),
)


class _Interrupted(Exception):
    """Raised from the step callback to stop a diffusion whose caller has gone."""


class DiffusersGenerator:
    """Serves diffusers pipelines. `models` maps a model name to "tiny", a directory or a hub id."""

    provider = PROVIDER

    def __init__(
        self,
        models: dict[str, str],
        *,
        data_dir: Path,
        device: str = "auto",
        dtype: str = "auto",
        default_steps: int = 4,
        default_guidance: float = 0.0,
        price_per_second_usd: float = 0.001,
        upscaler: str | None = None,
        allow_download: bool = True,
    ):
        if not models:
            raise ValueError("the local generator needs at least one model")
        for name, source in models.items():
            if not name or not isinstance(source, str) or not source.strip():
                raise ValueError(
                    f"local model {name!r} needs a source: 'tiny', a directory or a hub id"
                )
        if not _DEVICE_PATTERN.fullmatch(device):
            raise ValueError(f"device must be auto, cpu, mps, cuda or cuda:N, not {device!r}")
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
        if not 1 <= default_steps <= MAX_STEPS:
            raise ValueError(f"default_steps must be 1-{MAX_STEPS}, not {default_steps}")
        if not (math.isfinite(default_guidance) and default_guidance >= 0):
            raise ValueError(f"default_guidance must be 0 or more, not {default_guidance}")
        if not (math.isfinite(price_per_second_usd) and price_per_second_usd >= 0):
            raise ValueError(
                f"price_per_second_usd must be finite and 0 or more, not {price_per_second_usd}"
            )
        self._sources = dict(models)
        self._data_dir = Path(data_dir)
        self._device_choice = device
        self._dtype_choice = dtype
        self._default_steps = default_steps
        self._default_guidance = default_guidance
        self._price = price_per_second_usd
        self._upscaler = upscaler
        self._allow_download = allow_download
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="easel-diffusers"
        )
        # Touched only in the worker thread.
        self._pipelines: dict[tuple[str, str], Any] = {}
        self._schedulers: dict[str, Any] = {}  # model -> the scheduler it was loaded with
        self._device: str | None = None
        self._torch_dtype: Any = None
        # Read by estimate_cost on the event loop, written by the worker (dict stores are atomic).
        self._seconds_per_mp_step: dict[str, float] = {}
        self._in_flight: set[threading.Event] = set()
        self._specs: list[ModelSpec] | None = None
        self._closed = False

    @property
    def tiny_model_dir(self) -> Path:
        """Where the "tiny" source is built on first use."""
        return self._data_dir / "models" / "tiny"

    # --- the Generator protocol ---

    def models(self) -> list[ModelSpec]:
        if self._specs is None:
            self._specs = [
                ModelSpec(
                    name=name,
                    provider=PROVIDER,
                    kinds=KINDS,
                    honours_seed=True,
                    negative_prompt=True,
                    sizes=None,
                    size_step=8,
                    min_side=64,
                    max_side=2048,
                    default_size=self._default_size(source),
                    description="runs on this machine (diffusers)",
                    family=_family(source),
                    default_guidance=self._default_guidance,
                    options={"sampler": tuple(SAMPLERS)},
                )
                for name, source in self._sources.items()
            ]
        return list(self._specs)

    def unavailable_reason(self) -> str | None:
        # find_spec, not import: importing torch takes seconds.
        if all(importlib.util.find_spec(m) for m in ("torch", "diffusers", "transformers")):
            return None
        return MISSING_EXTRA

    def estimate_cost(self, request: GenerationRequest) -> float:
        return self._price * self._estimate_seconds(request)

    async def generate(
        self, request: GenerationRequest, progress: ProgressCallback | None = None
    ) -> GeneratedImage:
        if request.seed is None:
            raise ValueError("local models always take a seed; the caller must choose one")
        self._check_request(request)
        if self._closed:
            raise GeneratorUnavailable("the local generator has been closed")
        reason = self.unavailable_reason()
        if reason:
            raise GeneratorUnavailable(reason)
        estimate = self.estimate_cost(request)
        cancel = threading.Event()
        self._in_flight.add(cancel)
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(
                self._executor, self._run, request, progress, cancel, estimate
            )
        except asyncio.CancelledError:
            # The diffusion stops at its next step; the caller need not wait for it.
            cancel.set()
            raise
        except _Interrupted:
            raise GeneratorError("the local generator was closed during the generation") from None
        finally:
            self._in_flight.discard(cancel)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for cancel in list(self._in_flight):
            cancel.set()
        # Queued behind any job still running, so no pipeline is freed while in use.
        await asyncio.get_running_loop().run_in_executor(self._executor, self._release)
        self._executor.shutdown(wait=False)

    # --- checks and estimates (event loop) ---

    def _check_request(self, request: GenerationRequest) -> None:
        if request.model not in self._sources:
            raise UnsupportedRequest(
                f"there is no local model {request.model!r} "
                f"(local models: {', '.join(self._sources)})"
            )
        self._spec(request.model).check(request)
        if request.steps is not None and not 1 <= request.steps <= MAX_STEPS:
            raise UnsupportedRequest(f"steps must be 1-{MAX_STEPS}, not {request.steps}")
        if request.guidance is not None and not (
            math.isfinite(request.guidance) and request.guidance >= 0
        ):
            raise UnsupportedRequest(f"guidance must be 0 or more, not {request.guidance}")
        if request.strength is not None and not 0 < request.strength <= 1:
            raise UnsupportedRequest(
                f"strength must be above 0 and at most 1, not {request.strength}"
            )
        if request.kind in ("variation", "edit", "upscale") and not request.source_image:
            raise UnsupportedRequest(f"{request.kind} needs a source image")
        if request.kind == "upscale":
            if request.upscale_factor not in UPSCALE_FACTORS:
                raise UnsupportedRequest(
                    f"the upscale factor must be one of {', '.join(map(str, UPSCALE_FACTORS))}, "
                    f"not {request.upscale_factor}"
                )
            w, h = _source_size(request)
            if max(w, h) * request.upscale_factor > MAX_UPSCALED_SIDE:
                raise UnsupportedRequest(
                    f"a {w}x{h} image upscaled {request.upscale_factor}x would be over "
                    f"{MAX_UPSCALED_SIDE} pixels a side"
                )

    def _spec(self, name: str) -> ModelSpec:
        return next(spec for spec in self.models() if spec.name == name)

    def _default_size(self, source: str) -> tuple[int, int]:
        """1024 for SDXL- and Flux-type models whose model_index.json is on disk; else 512."""
        class_name = _pipeline_class(source)
        return (1024, 1024) if "XL" in class_name or "Flux" in class_name else (512, 512)

    def _estimate_seconds(self, request: GenerationRequest) -> float:
        if request.kind == "upscale":
            if self._upscaler is None:
                return FIXED_ALLOWANCE_S
            w, h = _source_size(request)
            pixels = w * h * request.upscale_factor**2
            steps = request.steps or UPSCALER_STEPS
            guided = request.guidance is None or request.guidance > 1
            rate_key = _upscaler_key(self._upscaler)
        else:
            pixels = request.width * request.height
            steps = request.steps or self._default_steps
            guidance = self._default_guidance if request.guidance is None else request.guidance
            guided = guidance > 1
            rate_key = request.model
        rate = self._seconds_per_mp_step.get(rate_key, self._default_rate())
        work = pixels / 1e6 * steps * (2 if guided else 1)
        return FIXED_ALLOWANCE_S + ESTIMATE_MARGIN * rate * work

    def _default_rate(self) -> float:
        device = self._device or self._device_choice
        cpu = DEFAULT_SECONDS_PER_MP_STEP["cpu"]
        return DEFAULT_SECONDS_PER_MP_STEP.get(device.split(":")[0], cpu)

    def _learn_rate(self, key: str, seconds: float, work: float) -> None:
        observed = seconds / work
        old = self._seconds_per_mp_step.get(key)
        self._seconds_per_mp_step[key] = (
            observed if old is None else (1 - RATE_SMOOTHING) * old + RATE_SMOOTHING * observed
        )

    # --- the worker thread ---

    def _run(
        self,
        request: GenerationRequest,
        progress: ProgressCallback | None,
        cancel: threading.Event,
        estimate: float,
    ) -> GeneratedImage:
        if cancel.is_set():
            raise _Interrupted()
        try:
            if request.kind == "upscale":
                image, text, note, seconds = self._upscale(request, progress, cancel)
            else:
                image, text, note, seconds = self._diffuse(request, progress, cancel)
        except (GeneratorError, _Interrupted):
            raise
        except Exception as exc:
            # The traceback goes to the operator's log; the caller gets one clear line.
            log.exception("local model %r failed on a %s request", request.model, request.kind)
            raise _as_generator_error(exc, request.model) from None
        return GeneratedImage(
            data=encode_png(image, text),
            width=image.width,
            height=image.height,
            model=request.model,
            provider=PROVIDER,
            # A resample uses no seed: recording one would suggest it mattered.
            seed=None if note == LANCZOS_NOTE else request.seed,
            cost_usd=min(seconds * self._price, estimate),
            note=note,
        )

    def _diffuse(
        self, request: GenerationRequest, progress: ProgressCallback | None, cancel: threading.Event
    ) -> tuple[Image.Image, dict[str, str], str | None, float]:
        import torch

        w, h = request.width, request.height
        steps = request.steps or self._default_steps
        guidance = self._default_guidance if request.guidance is None else request.guidance
        text = {
            "prompt": request.prompt,
            "seed": str(request.seed),
            "model": request.model,
            "kind": request.kind,
            "steps": str(steps),
            "guidance": f"{guidance:g}",
            "size": f"{w}x{h}",
        }
        if request.negative_prompt:
            text["negative_prompt"] = request.negative_prompt
        args: dict[str, Any] = {
            "prompt": request.prompt,
            "num_inference_steps": steps,
            "guidance_scale": guidance,
            "callback_on_step_end": _step_callback(progress, cancel, steps),
        }
        if request.negative_prompt:
            args["negative_prompt"] = request.negative_prompt
        source = mask = None
        sampler = request.options.get("sampler", "default")
        text["sampler"] = sampler
        if request.kind == "imagine":
            pipe = self._pipeline(request.model, "imagine")
            args.update(width=w, height=h)
        else:
            source = _decode(request.source_image, "source").convert("RGB")
            source = source.resize((w, h), Image.LANCZOS) if source.size != (w, h) else source
            if request.kind == "edit" and request.mask_image:
                mask = _decode(request.mask_image, "mask").convert("L")
                # Bilinear, not Lanczos: Lanczos rings, leaking faint mask into the kept area.
                mask = mask.resize((w, h), Image.BILINEAR) if mask.size != (w, h) else mask
                strength = request.strength or INPAINT_STRENGTH
                pipe = self._pipeline(request.model, "inpaint")
                args.update(image=source, mask_image=mask, width=w, height=h)
            else:
                strength = request.strength or EDIT_STRENGTH
                pipe = self._pipeline(request.model, "img2img")
                args.update(image=source)
            # The pipeline runs only int(num_inference_steps * strength) steps; ask for enough
            # that the number actually run is the one requested.
            args["num_inference_steps"] = _steps_for_strength(steps, strength)
            args["strength"] = strength
            text["strength"] = f"{strength:g}"
        self._use_sampler(pipe, request.model, sampler)
        args["generator"] = torch.Generator(self._generator_device()).manual_seed(request.seed)

        started = time.perf_counter()
        image = pipe(**args).images[0]
        if mask is not None:
            # A 4-channel UNet and the VAE round trip alter pixels outside the mask: restore them.
            image = Image.composite(image, source, mask)
        seconds = time.perf_counter() - started
        self._learn_rate(request.model, seconds, w * h / 1e6 * steps * (2 if guidance > 1 else 1))

        note = None
        if request.negative_prompt and guidance <= 1:
            note = (
                f"the negative prompt had no effect: it needs guidance above 1, and this image "
                f"was made with guidance {guidance:g}"
            )
        return image, text, note, seconds

    def _upscale(
        self, request: GenerationRequest, progress: ProgressCallback | None, cancel: threading.Event
    ) -> tuple[Image.Image, dict[str, str], str | None, float]:
        source = _decode(request.source_image, "source").convert("RGB")
        factor = request.upscale_factor
        size = (source.width * factor, source.height * factor)
        text = {
            "prompt": request.prompt,
            "model": request.model,
            "kind": "upscale",
            "size": f"{size[0]}x{size[1]}",
        }
        if self._upscaler is None:
            started = time.perf_counter()
            image = source.resize(size, Image.LANCZOS)
            seconds = time.perf_counter() - started
            text["upscaler"] = "lanczos"
            if progress is not None:
                progress(1.0, None)
            return image, text, LANCZOS_NOTE, seconds

        import torch

        text["seed"] = str(request.seed)
        key = _upscaler_key(self._upscaler)
        pipe = self._pipeline(key, "upscale")
        steps = request.steps or UPSCALER_STEPS
        args: dict[str, Any] = {
            "prompt": request.prompt,
            "image": source,
            "num_inference_steps": steps,
            "generator": torch.Generator(self._generator_device()).manual_seed(request.seed),
            # The upscale pipelines take only the older per-step callback.
            "callback": _legacy_step_callback(progress, cancel, steps),
            "callback_steps": 1,
        }
        if request.guidance is not None:
            args["guidance_scale"] = request.guidance
        if request.negative_prompt:
            args["negative_prompt"] = request.negative_prompt
        started = time.perf_counter()
        image = pipe(**args).images[0]
        made = image.size
        if made != size:
            image = image.resize(size, Image.LANCZOS)
        seconds = time.perf_counter() - started
        guided = request.guidance is None or request.guidance > 1
        self._learn_rate(key, seconds, size[0] * size[1] / 1e6 * steps * (2 if guided else 1))
        text["upscaler"] = self._upscaler
        text["steps"] = str(steps)
        note = f"upscaled with {self._upscaler}"
        if made != size:
            note += f" to {made[0]}x{made[1]}, then resampled (Lanczos) to {size[0]}x{size[1]}"
        return image, text, note, seconds

    def _use_sampler(self, pipe: Any, model: str, sampler: str) -> None:
        """Set the scheduler for this call. Every call sets it, since the pipelines of one model
        share components and a previous call may have chosen another."""
        import diffusers

        original = self._schedulers.setdefault(model, pipe.scheduler)
        name = SAMPLERS[sampler]
        pipe.scheduler = original if name is None else \
            getattr(diffusers, name).from_config(original.config)

    def _pipeline(self, name: str, task: str) -> Any:
        """The pipeline for `task` (imagine, img2img, inpaint, upscale), loaded on first use."""
        if (name, task) in self._pipelines:
            return self._pipelines[(name, task)]
        if task == "upscale":
            pipe = self._load(name, self._upscaler, upscaler=True)
        elif task == "imagine":
            pipe = self._load(name, self._sources[name], upscaler=False)
        else:
            from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting

            base = self._pipeline(name, "imagine")
            auto = AutoPipelineForImage2Image if task == "img2img" else AutoPipelineForInpainting
            try:
                # Shares the loaded weights: no second copy in memory.
                pipe = auto.from_pipe(base)
            except (ValueError, KeyError) as exc:
                raise UnsupportedRequest(
                    f"local model {name!r} ({type(base).__name__}) has no {task} pipeline: {exc}"
                ) from None
            pipe.set_progress_bar_config(disable=True)
        self._pipelines[(name, task)] = pipe
        return pipe

    def _load(self, name: str, source: str, *, upscaler: bool) -> Any:
        _quiet_libraries()
        from diffusers import AutoPipelineForText2Image, DiffusionPipeline

        device, dtype = self._resolve_device()
        what = "the upscaler" if upscaler else f"local model {name!r}"
        local = Path(source).expanduser()
        if source == TINY_SOURCE and not upscaler:
            local = self.tiny_model_dir
            if not (local / "model_index.json").is_file():
                from generators.tiny import build_tiny_pipeline

                log.info("building the tiny random model in %s", local)
                build_tiny_pipeline(local)
        is_hub_id = not local.exists() and _HUB_ID_PATTERN.fullmatch(source) is not None
        if not local.exists() and not is_hub_id:
            raise GeneratorUnavailable(
                f"{what}: there is no model directory at {source!r}; point it at a directory "
                f"saved with diffusers (holding model_index.json) or at a Hugging Face model id"
            )
        loader = DiffusionPipeline if upscaler else AutoPipelineForText2Image
        location = source if is_hub_id else str(local)
        log.info("loading %s from %s on %s", what, location, device)
        try:
            try:
                pipe = loader.from_pretrained(location, torch_dtype=dtype, local_files_only=True)
            except OSError:
                if not (is_hub_id and self._allow_download):
                    raise
                log.info("%s is not in the Hugging Face cache; downloading it", source)
                pipe = loader.from_pretrained(location, torch_dtype=dtype)
        except Exception as exc:
            if is_hub_id:
                advice = (
                    f"download it first while online (hf download {source}) or set its source "
                    f"to a local directory"
                )
            else:
                advice = "check that the directory holds a complete diffusers model"
            raise GeneratorUnavailable(
                f"{what} could not be loaded from {source!r} ({_first_line(exc)}); {advice}"
            ) from None
        if upscaler and type(pipe).__name__ not in (
            "StableDiffusionUpscalePipeline",
            "StableDiffusionLatentUpscalePipeline",
        ):
            raise GeneratorUnavailable(
                f"the upscaler {source!r} is a {type(pipe).__name__}, not a Stable Diffusion "
                f"upscale pipeline"
            )
        pipe = pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def _resolve_device(self) -> tuple[str, Any]:
        if self._device is not None:
            return self._device, self._torch_dtype
        import torch

        choice = self._device_choice
        if choice == "auto":
            if torch.cuda.is_available():
                choice = "cuda"
            elif torch.backends.mps.is_available():
                choice = "mps"
            else:
                choice = "cpu"
        elif choice.startswith("cuda") and not torch.cuda.is_available():
            raise GeneratorUnavailable(
                f"the local generator is set to device {choice!r}, but this torch "
                f"({torch.__version__}) sees no CUDA GPU"
            )
        elif choice == "mps" and not torch.backends.mps.is_available():
            raise GeneratorUnavailable(
                "the local generator is set to device 'mps', but MPS is not available"
            )
        if self._dtype_choice == "auto":
            dtype = torch.float32 if choice == "cpu" else torch.float16
        else:
            dtype = getattr(torch, self._dtype_choice)
        self._device, self._torch_dtype = choice, dtype
        return choice, dtype

    def _generator_device(self) -> str:
        # Seeded noise on MPS is not reproducible across torch versions; the CPU's is.
        return "cpu" if self._device == "mps" else self._device

    def _release(self) -> None:
        self._pipelines.clear()
        self._schedulers.clear()
        if "torch" in sys.modules:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def _quiet_libraries() -> None:
    """diffusers and transformers print progress bars and advice meant for notebooks; easel
    reports its own progress, and their warnings go to the log at error level only."""
    import os
    import warnings

    # Read by transformers when it is first imported (its import-time advice goes to stderr).
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for lib in (diffusers_logging, transformers_logging):
        lib.set_verbosity_error()
        lib.disable_progress_bar()
    # `torch_dtype` works on every diffusers this project allows; `dtype` only on the newest.
    warnings.filterwarnings("ignore", message="`torch_dtype` is deprecated", category=FutureWarning)


def _step_callback(progress: ProgressCallback | None, cancel: threading.Event, steps: int):
    """A diffusers callback_on_step_end: stops a cancelled job and reports progress."""

    def on_step_end(pipe: Any, i: int, t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        if cancel.is_set():
            raise _Interrupted()
        if progress is not None:
            total = getattr(pipe, "num_timesteps", None) or steps
            done = min(1.0, (i + 1) / total)
            # No preview for the last step: the finished image follows at once.
            preview = _latent_preview(tensors.get("latents")) if done < 1.0 else None
            progress(done, preview)
        return {}

    return on_step_end


def _legacy_step_callback(progress: ProgressCallback | None, cancel: threading.Event, steps: int):
    def on_step(i: int, t: Any, latents: Any) -> None:
        if cancel.is_set():
            raise _Interrupted()
        if progress is not None:
            progress(min(1.0, (i + 1) / steps), None)

    return on_step


def _latent_preview(latents: Any) -> bytes | None:
    """A small PNG projected straight from SD-style latents (4 channels); None for other layouts."""
    if latents is None or latents.ndim != 4 or latents.shape[1] != 4:
        return None
    import torch

    factors = torch.tensor(_LATENT_RGB, dtype=torch.float32, device=latents.device)
    rgb = torch.einsum("chw,cr->hwr", latents[0].float(), factors)
    pixels = ((rgb + 1) * 127.5).clamp(0, 255).to(torch.uint8).cpu().numpy()
    image = Image.fromarray(pixels, "RGB")
    scale = PREVIEW_SIDE / max(image.size)
    image = image.resize(
        (max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BILINEAR
    )
    return encode_png(image)


def _steps_for_strength(steps: int, strength: float) -> int:
    total = math.ceil(steps / strength)
    while int(total * strength) < steps:  # float rounding can leave it one short
        total += 1
    return total


def _decode(data: bytes | None, what: str) -> Image.Image:
    try:
        return decode_image(data or b"").image
    except ImageRejected as exc:
        raise UnsupportedRequest(f"the {what} image cannot be used: {exc}") from None


def _source_size(request: GenerationRequest) -> tuple[int, int]:
    """The source image's size from its header alone (no pixel decode)."""
    try:
        with Image.open(io.BytesIO(request.source_image or b"")) as img:
            return img.size
    except (OSError, ValueError):
        raise UnsupportedRequest("the source image cannot be read") from None


def _upscaler_key(source: str) -> str:
    return f"upscaler:{source}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line if len(line) <= 300 else line[:297] + "..."


def _as_generator_error(exc: Exception, model: str) -> GeneratorError:
    if type(exc).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError
        return TransientGeneratorError(
            f"local model {model!r} ran out of GPU memory; try a smaller size"
        )
    return GeneratorError(f"local model {model!r} failed: {type(exc).__name__}: {_first_line(exc)}")


def _pipeline_class(source: str) -> str:
    """The pipeline class named by the model's model_index.json, where it is on disk ("" if not)."""
    if source == TINY_SOURCE:
        return "StableDiffusionPipeline"  # the tiny model is built as an SD 1.x pipeline
    index: Path | None = None
    local = Path(source).expanduser()
    if (local / "model_index.json").is_file():
        index = local / "model_index.json"
    elif _HUB_ID_PATTERN.fullmatch(source) and importlib.util.find_spec("huggingface_hub"):
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(source, "model_index.json")
        index = Path(cached) if isinstance(cached, str) else None
    if index is None:
        return ""
    try:
        return str(json.loads(index.read_text(encoding="utf-8")).get("_class_name", ""))
    except (OSError, ValueError):
        return ""


def _family(source: str) -> str:
    """sd1, sd2, sdxl, sd-turbo, sdxl-turbo or flux: from the pipeline class, else the name."""
    name, class_name = source.lower(), _pipeline_class(source)
    if "Flux" in class_name or "flux" in name:
        return "flux"
    xl = "XL" in class_name or "xl" in name
    if "turbo" in name:
        return "sdxl-turbo" if xl else "sd-turbo"
    if xl:
        return "sdxl"
    if re.search(r"stable-diffusion-2|sd-?2|2[-.]1", name):
        return "sd2"
    return "sd1"
