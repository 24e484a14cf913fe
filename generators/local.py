"""The local generator: Stable Diffusion-family and Flux models run with diffusers on this machine.

All torch work (the torch import itself, loading, diffusion) runs in one dedicated worker thread,
so the event loop never blocks. Calls that arrive together and are compatible run as one batched
pipeline call (generators.local_batch); models, LoRAs and ControlNets live in local_models,
local_control and local_run.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import importlib.util
import io
import logging
import math
import re
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from PIL import Image

from bot.core.models import (
    ContentPolicyError,
    GeneratedImage,
    GenerationRequest,
    GeneratorError,
    GeneratorUnavailable,
    ModelSpec,
    ProgressCallback,
    TransientGeneratorError,
    UnsupportedRequest,
)
from generators.images import encode_png
from generators.local_batch import Batcher, Call
from generators.local_control import controlnets_from, loras_from
from generators.local_models import ATTENTION, ModelConfig, model_config, resolve_device
from generators.local_run import FLAGGED, SAMPLERS, Interrupted, Models, diffuse
from generators.local_upscale import LANCZOS_NOTE, UPSCALER_STEPS, load_upscaler, upscale

log = logging.getLogger(__name__)

__all__ = ["LANCZOS_NOTE", "SAMPLERS", "DiffusersGenerator"]

PROVIDER = "local"
KINDS = frozenset({"imagine", "variation", "edit", "upscale"})
MISSING_EXTRA = (
    "the local generator needs the 'local' extra: pip install 'easel[local]' "
    "(install torch==2.13.0 first)"
)
DTYPES = ("auto", "float16", "bfloat16", "float32")
_DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
MAX_STEPS = 200  # as bot/config.py allows
UPSCALE_FACTORS = (2, 3, 4)
MAX_UPSCALED_SIDE = 4096

# Cost estimate (an upper bound): FIXED_ALLOWANCE_S + ESTIMATE_MARGIN x rate x megapixels x steps
# x (2 with classifier-free guidance, which runs the UNet twice). The rate, in seconds per
# megapixel-step, starts at a conservative default for the device and then follows the measured
# jobs of each model as an exponential moving average. Until torch has been loaded an "auto" device
# is costed as a CPU.
DEFAULT_SECONDS_PER_MP_STEP = {"cpu": 1.0, "mps": 0.3, "cuda": 0.05}
ESTIMATE_MARGIN = 2.0
FIXED_ALLOWANCE_S = 2.0  # text encoding, VAE decode, PNG encoding
RATE_SMOOTHING = 0.3  # weight of the newest job in the moving average


class DiffusersGenerator:
    """Serves diffusers pipelines. `models` maps a model name to "tiny", a folder, a single-file
    checkpoint or a hub id; `overrides` maps a name to settings over its family's defaults. With a
    `batch_size` above 1, `batch_exact` makes each image bit-identical whether batched or alone
    (generators.local_exact)."""

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
        overrides: Mapping[str, Mapping[str, Any]] | None = None,
        loras: Mapping[str, Any] | None = None,
        controlnets: Mapping[str, Any] | None = None,
        memory_budget_gb: float = 0.0,
        batch_size: int = 1,
        batch_window_s: float = 0.05,
        batch_exact: bool = True,
        device_options: Mapping[str, Any] | None = None,
    ):
        _check_settings(models, device, dtype, default_steps, default_guidance, price_per_second_usd)
        unknown = set(overrides or {}) - set(models)
        if unknown:
            raise ValueError(f"settings for local models that are not configured: {', '.join(sorted(unknown))}")
        self._configs = {
            name: model_config(name, source, (overrides or {}).get(name, {}), steps=default_steps,
                               guidance=default_guidance)
            for name, source in models.items()
        }
        self._loras, self._controlnets = loras_from(loras or {}), controlnets_from(controlnets or {})
        # With batching on, every image (batched or alone) is made with batch-invariant kernels.
        self._device_options = dict(device_options or {}) | {"batch_exact": batch_exact and batch_size > 1}
        if self._device_options.get("attention", "sdpa") not in ATTENTION:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION)}")
        self._data_dir = Path(data_dir)
        self._device_choice, self._dtype_choice = device, dtype
        self._default_steps = default_steps
        self._price, self._upscaler, self._allow_download = price_per_second_usd, upscaler, allow_download
        self._budget = int(memory_budget_gb * 1e9)
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="easel-diffusers")
        self._batcher = Batcher(self._executor, self._run_batch, size=batch_size, window_s=batch_window_s)
        self._models: Models | None = None  # made in the worker once the device is known
        self._upscaler_pipe: Any = None
        # Read by estimate_cost on the event loop, written by the worker (dict stores are atomic).
        self._seconds_per_mp_step: dict[str, float] = {}
        self._device: str | None = None
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
            self._specs = [self._spec_of(config) for config in self._configs.values()]
        return list(self._specs)

    def _spec_of(self, config: ModelConfig) -> ModelSpec:
        return ModelSpec(
            name=config.name, provider=PROVIDER, kinds=KINDS, honours_seed=True,
            negative_prompt=config.negative_prompt, sizes=None, size_step=8, min_side=64, max_side=2048,
            default_size=config.size, description=f"runs on this machine (diffusers, {config.family})",
            family="sd1" if config.family == "tiny" else config.family, default_guidance=config.guidance, options={"sampler": tuple(SAMPLERS)},
            loras=tuple(self._loras), controlnets=tuple(self._controlnets),
        )

    def loaded(self) -> dict[str, str]:
        """The models loaded now, and where: {"sdxl": "loaded on cuda, 6.94 GB"}."""
        return dict(self._models.loaded.where) if self._models is not None else {}

    def unavailable_reason(self) -> str | None:
        # find_spec, not import: importing torch takes seconds.
        if all(importlib.util.find_spec(m) for m in ("torch", "diffusers", "transformers")):
            return None
        return MISSING_EXTRA

    def estimate_cost(self, request: GenerationRequest) -> float:
        return self._price * self._estimate_seconds(request)

    async def generate(self, request: GenerationRequest, progress: ProgressCallback | None = None) -> GeneratedImage:
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
        try:
            image, seconds = await self._batcher.submit(request, progress, cancel)
        except Interrupted:
            raise GeneratorError("the local generator was closed during the generation") from None
        finally:
            self._in_flight.discard(cancel)
        return dataclasses.replace(image, cost_usd=min(seconds * self._price, estimate))

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for cancel in list(self._in_flight):
            cancel.set()
        await self._batcher.close()
        # Queued behind any call still running, so no pipeline is freed while in use.
        await asyncio.get_running_loop().run_in_executor(self._executor, self._release)
        self._executor.shutdown(wait=False)

    # --- checks and estimates (event loop) ---

    def _check_request(self, request: GenerationRequest) -> None:
        if request.model not in self._configs:
            raise UnsupportedRequest(
                f"there is no local model {request.model!r} (local models: {', '.join(self._configs)})"
            )
        next(s for s in self.models() if s.name == request.model).check(request)
        if request.steps is not None and not 1 <= request.steps <= MAX_STEPS:
            raise UnsupportedRequest(f"steps must be 1-{MAX_STEPS}, not {request.steps}")
        if request.guidance is not None and not (math.isfinite(request.guidance) and request.guidance >= 0):
            raise UnsupportedRequest(f"guidance must be 0 or more, not {request.guidance}")
        if request.strength is not None and not 0 < request.strength <= 1:
            raise UnsupportedRequest(f"strength must be above 0 and at most 1, not {request.strength}")
        if request.kind in ("variation", "edit", "upscale") and not request.source_image:
            raise UnsupportedRequest(f"{request.kind} needs a source image")
        if request.control_image is not None and request.kind != "imagine":
            raise UnsupportedRequest("a ControlNet guides a new image (imagine), not a " + request.kind)
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

    def _estimate_seconds(self, request: GenerationRequest) -> float:
        if request.kind == "upscale":
            if self._upscaler is None:
                return FIXED_ALLOWANCE_S
            w, h = _source_size(request)
            pixels, steps = w * h * request.upscale_factor**2, request.steps or UPSCALER_STEPS
            guided, key = request.guidance is None or request.guidance > 1, f"upscaler:{self._upscaler}"
        else:
            config = self._configs[request.model]
            pixels, steps = request.width * request.height, request.steps or config.steps
            guided = (config.guidance if request.guidance is None else request.guidance) > 1
            key = request.model
        device = (self._device or self._device_choice).split(":")[0]
        rate = self._seconds_per_mp_step.get(key, DEFAULT_SECONDS_PER_MP_STEP.get(device, 1.0))
        return FIXED_ALLOWANCE_S + ESTIMATE_MARGIN * rate * pixels / 1e6 * steps * (2 if guided else 1)

    def _learn_rate(self, key: str, seconds: float, work: float) -> None:
        observed = seconds / work
        old = self._seconds_per_mp_step.get(key)
        self._seconds_per_mp_step[key] = (
            observed if old is None else (1 - RATE_SMOOTHING) * old + RATE_SMOOTHING * observed
        )

    # --- the worker thread ---

    def _run_batch(self, batch: list[Call]) -> list[Any]:
        """One pipeline call for the batch: per call, (image, seconds) or the error it met."""
        if all(c.cancel.is_set() for c in batch):
            return [Interrupted()] * len(batch)
        first = batch[0].request
        try:
            models = self._worker_models()
            if first.kind == "upscale":
                return [self._upscaled(batch[0], models)]
            config = self._configs[first.model]
            images, text, notes, seconds = diffuse(models, batch, config)
        except (GeneratorError, Interrupted) as exc:
            return [exc] * len(batch)
        except Exception as exc:
            # The traceback goes to the operator's log; the caller gets one clear line.
            log.exception("local model %r failed on a %s request", first.model, first.kind)
            return [_as_generator_error(exc, first.model)] * len(batch)
        steps, guidance = int(text["steps"]), float(text["guidance"])
        work = sum(c.request.width * c.request.height for c in batch) / 1e6 * steps * (2 if guidance > 1 else 1)
        self._learn_rate(first.model, seconds, work)
        results: list[Any] = []
        for call, image, note in zip(batch, images, notes, strict=True):
            if note == FLAGGED:
                results.append(ContentPolicyError(f"local model {first.model!r}: the image was {note}"))
                continue
            fields = {**text, "prompt": call.request.prompt, "seed": str(call.request.seed)}
            if call.request.negative_prompt:
                fields["negative_prompt"] = call.request.negative_prompt
            results.append((self._image(call.request, image, fields, note, call.request.seed), seconds / len(batch)))
        return results

    def _upscaled(self, call: Call, models: Models) -> tuple[GeneratedImage, float]:
        if self._upscaler is not None and self._upscaler_pipe is None:
            self._upscaler_pipe = load_upscaler(self._upscaler, models.options, allow_download=self._allow_download)
        device = "cpu" if models.options.device == "mps" else models.options.device
        image, text, note, seconds = upscale(call, self._upscaler_pipe, self._upscaler, device)
        if self._upscaler is not None:
            steps = int(text["steps"])
            guided = call.request.guidance is None or call.request.guidance > 1
            self._learn_rate(f"upscaler:{self._upscaler}", seconds,
                             image.width * image.height / 1e6 * steps * (2 if guided else 1))
        # A resample uses no seed: recording one would suggest it mattered.
        seed = None if note == LANCZOS_NOTE else call.request.seed
        return self._image(call.request, image, text, note, seed), seconds

    def _image(self, request: GenerationRequest, image: Image.Image, text: dict[str, str], note: str | None,
               seed: int | None) -> GeneratedImage:
        return GeneratedImage(data=encode_png(image, text), width=image.width, height=image.height,
                              model=request.model, provider=PROVIDER, seed=seed, cost_usd=None, note=note)

    def _worker_models(self) -> Models:
        if self._models is None:
            _quiet_libraries()
            options = resolve_device(self._device_choice, self._dtype_choice, self._device_options)
            self._device = options.device
            self._models = Models(
                self._configs, tiny_dir=self.tiny_model_dir, options=options,
                budget_bytes=self._budget, allow_download=self._allow_download, loras=self._loras,
                controlnets=self._controlnets,
            )
        return self._models

    def _release(self) -> None:
        if self._models is not None:
            self._models.loaded.clear()
        self._upscaler_pipe = None


def _check_settings(models: Mapping[str, str], device: str, dtype: str, steps: int, guidance: float,
                    price: float) -> None:
    if not models:
        raise ValueError("the local generator needs at least one model")
    for name, source in models.items():
        if not name or not isinstance(source, str) or not source.strip():
            raise ValueError(f"local model {name!r} needs a source: 'tiny', a directory or a hub id")
    if not _DEVICE_PATTERN.fullmatch(device):
        raise ValueError(f"device must be auto, cpu, mps, cuda or cuda:N, not {device!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    if not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"default_steps must be 1-{MAX_STEPS}, not {steps}")
    if not (math.isfinite(guidance) and guidance >= 0):
        raise ValueError(f"default_guidance must be 0 or more, not {guidance}")
    if not (math.isfinite(price) and price >= 0):
        raise ValueError(f"price_per_second_usd must be finite and 0 or more, not {price}")


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


def _source_size(request: GenerationRequest) -> tuple[int, int]:
    """The source image's size from its header alone (no pixel decode)."""
    try:
        with Image.open(io.BytesIO(request.source_image or b"")) as img:
            return img.size
    except (OSError, ValueError):
        raise UnsupportedRequest("the source image cannot be read") from None


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
