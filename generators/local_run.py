"""The local generator's worker-thread side: the loaded models and one pipeline call per batch.
Everything here runs in the generator's single worker thread."""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from PIL import Image

from bot.core.models import CONTROL_OPTION, LORA_OPTION, GeneratorUnavailable, UnsupportedRequest
from generators.images import ImageRejected, decode_image
from generators.local_batch import Call
from generators.local_control import (
    ControlNet,
    Lora,
    chosen_loras,
    control_args,
    control_pipeline,
    control_text,
    use_loras,
    with_triggers,
)
from generators.local_exact import make_batch_invariant
from generators.local_models import (
    HUB_ID_PATTERN,
    TINY_SOURCE,
    DeviceOptions,
    LoadedModels,
    ModelConfig,
    files_bytes,
    load_pipeline,
    pipeline_bytes,
)
from generators.local_preview import load_taesd, preview

log = logging.getLogger(__name__)

EDIT_STRENGTH = 0.75  # an edit without a mask redraws the whole image from the prompt
INPAINT_STRENGTH = 1.0  # with a mask, the masked area is drawn afresh
SAMPLERS = {
    "default": None,
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "ddim": "DDIMScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "heun": "HeunDiscreteScheduler",
    "unipc": "UniPCMultistepScheduler",
}


FLAGGED = "flagged by the model's safety checker"  # the note of an image the pipeline blacked out


class Interrupted(Exception):
    """Raised from the step callback to stop a diffusion whose callers have all gone."""


class Models:
    """The configured models, loaded on demand into an LRU bounded by a memory budget."""

    def __init__(self, configs: Mapping[str, ModelConfig], *, tiny_dir: Path, options: DeviceOptions,
                 budget_bytes: int, allow_download: bool, loras: Mapping[str, Lora],
                 controlnets: Mapping[str, ControlNet]):
        self.configs, self.tiny_dir, self.options = configs, tiny_dir, options
        self.allow_download, self.loras, self.controlnets = allow_download, loras, controlnets
        self.loaded = LoadedModels(budget_bytes)

    def entry(self, name: str) -> dict[str, Any]:
        """The model's entry (pipelines by task, adapters, scheduler, previewer), loading it."""
        entry = self.loaded.get(name)
        if entry is not None:
            return entry
        config = self.configs[name]
        location = self._location(config)
        self.loaded.make_room(files_bytes(location), keep=name)
        log.info("loading local model %r from %s on %s", name, location, self.options.device)
        try:
            pipe = load_pipeline(config, location, self.options, allow_download=self.allow_download)
        except GeneratorUnavailable:
            raise
        except Exception as exc:
            advice = (f"download it first while online (hf download {config.source}) or set its source to a "
                      f"local directory" if HUB_ID_PATTERN.fullmatch(location)
                      else "check that it holds a complete diffusers model")
            line = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise GeneratorUnavailable(
                f"local model {name!r} could not be loaded from {config.source!r} ({line}); {advice}"
            ) from None
        taesd = None
        if config.preview:
            taesd = load_taesd(config.preview, self.options.dtype, self.options.device)
        entry = {"pipes": {"imagine": pipe}, "adapters": set(), "scheduler": pipe.scheduler,
                 "taesd": taesd, "controls": {}}
        self.loaded.add(name, entry, pipeline_bytes(pipe), self.options.device)
        return entry

    def _location(self, config: ModelConfig) -> str:
        if config.source == TINY_SOURCE:
            if not (self.tiny_dir / "model_index.json").is_file():
                from generators.tiny import build_tiny_pipeline

                log.info("building the tiny random model in %s", self.tiny_dir)
                build_tiny_pipeline(self.tiny_dir)
            return str(self.tiny_dir)
        local = Path(config.source).expanduser()
        if local.exists():
            return str(local)
        if HUB_ID_PATTERN.fullmatch(config.source):
            return config.source
        raise GeneratorUnavailable(
            f"local model {config.name!r}: there is no model directory at {config.source!r}; point it at a "
            f"directory saved with diffusers (holding model_index.json), a .safetensors file or a Hugging "
            f"Face model id"
        )

    def pipeline(self, name: str, task: str, control: str | None = None) -> Any:
        """The pipeline for `task` (imagine, img2img, inpaint), or the base's ControlNet variant."""
        entry = self.entry(name)
        base = entry["pipes"]["imagine"]
        if control is not None:
            return control_pipeline(base, self.controlnets[control], entry["controls"],
                                    self.options.dtype, self.options.device)
        if task not in entry["pipes"]:
            from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting

            auto = AutoPipelineForImage2Image if task == "img2img" else AutoPipelineForInpainting
            try:
                pipe = auto.from_pipe(base)  # shares the loaded weights: no second copy
            except (ValueError, KeyError) as exc:
                raise UnsupportedRequest(
                    f"local model {name!r} ({type(base).__name__}) has no {task} pipeline: {exc}"
                ) from None
            pipe.set_progress_bar_config(disable=True)
            entry["pipes"][task] = pipe
        return entry["pipes"][task]

    def prepare(self, name: str, pipe: Any, options: Mapping[str, str]) -> list[tuple[Lora, float]]:
        """Set the call's sampler and LoRAs on the model's shared components."""
        import diffusers

        entry = self.entry(name)
        original = entry["scheduler"]
        sampler = SAMPLERS[options.get("sampler", "default")]
        pipe.scheduler = original if sampler is None else getattr(diffusers, sampler).from_config(original.config)
        chosen = chosen_loras(options, self.loras)
        use_loras(entry["pipes"]["imagine"], entry["adapters"], chosen)
        return chosen


def diffuse(models: Models, batch: list[Call], config: ModelConfig) -> tuple[list[Image.Image], dict[str, str],
                                                                             list[str | None], float]:
    """Make the batch's images in one pipeline call: one seeded generator per image, so each is
    the image its request would give alone. Returns the images, the shared text fields, a note
    per image and the seconds the call took."""
    import torch

    first = batch[0].request
    w, h = first.width, first.height
    steps = first.steps or config.steps
    guidance = config.guidance if first.guidance is None else first.guidance
    control = first.options.get(CONTROL_OPTION)
    text = {"model": first.model, "kind": first.kind, "steps": str(steps), "guidance": f"{guidance:g}",
            "size": f"{w}x{h}", "sampler": first.options.get("sampler", "default")}
    args: dict[str, Any] = {"num_inference_steps": steps, "guidance_scale": guidance,
                            "callback_on_step_end": step_callback(batch, steps, models.entry(first.model))}
    source = mask = None
    if control is not None:
        pipe = models.pipeline(first.model, "imagine", control)
        cn = models.controlnets[control]
        images = [control_args(c.request, cn, _decode(c.request.control_image, "control")) for c in batch]
        args.update(width=w, height=h, image=[a["image"] for a in images],
                    controlnet_conditioning_scale=images[0]["controlnet_conditioning_scale"])
        text.update(control_text(first, cn))
    elif first.kind == "imagine":
        pipe = models.pipeline(first.model, "imagine")
        args.update(width=w, height=h)
    else:
        source = _decode(first.source_image, "source").convert("RGB")
        source = source.resize((w, h), Image.LANCZOS) if source.size != (w, h) else source
        if first.kind == "edit" and first.mask_image:
            mask = _decode(first.mask_image, "mask").convert("L")
            # Bilinear, not Lanczos: Lanczos rings, leaking faint mask into the kept area.
            mask = mask.resize((w, h), Image.BILINEAR) if mask.size != (w, h) else mask
            strength = first.strength or INPAINT_STRENGTH
            pipe = models.pipeline(first.model, "inpaint")
            args.update(image=source, mask_image=mask, width=w, height=h)
        else:
            strength = first.strength or EDIT_STRENGTH
            pipe = models.pipeline(first.model, "img2img")
            args.update(image=source)
        # The pipeline runs only int(num_inference_steps * strength) steps: ask for enough.
        args["num_inference_steps"] = steps_for_strength(steps, strength)
        args["strength"] = strength
        text["strength"] = f"{strength:g}"
    chosen = models.prepare(first.model, pipe, first.options)
    if models.options.batch_exact:
        make_batch_invariant(pipe)  # after prepare: a LoRA just loaded brings Linears of its own
    text |= {LORA_OPTION: ",".join(f"{lora.name}:{weight:g}" for lora, weight in chosen)} if chosen else {}
    args["prompt"] = [with_triggers(c.request.prompt, chosen) for c in batch]
    negatives = [c.request.negative_prompt or "" for c in batch]
    if any(negatives) and config.negative_prompt:
        args["negative_prompt"] = negatives  # "" is what the pipeline uses for none
    device = "cpu" if models.options.device == "mps" else models.options.device  # MPS noise varies
    args["generator"] = [torch.Generator(device).manual_seed(c.request.seed or 0) for c in batch]
    started = time.perf_counter()
    output = pipe(**args)
    seconds = time.perf_counter() - started
    flagged = getattr(output, "nsfw_content_detected", None) or [False] * len(batch)
    images = [Image.composite(image, source, mask) if mask is not None else image for image in output.images]
    return images, text, [_note(c.request.negative_prompt, guidance, bool(f)) for c, f in zip(batch, flagged,
                                                                                           strict=True)], seconds


def _note(negative: str | None, guidance: float, flagged: bool) -> str | None:
    if flagged:
        return FLAGGED
    if negative and guidance <= 1:
        return (f"the negative prompt had no effect: it needs guidance above 1, and this image was made "
                f"with guidance {guidance:g}")
    return None


def step_callback(batch: list[Call], steps: int, entry: dict[str, Any]):
    """A diffusers callback_on_step_end: stops when every caller has gone, reports progress."""

    def on_step_end(pipe: Any, i: int, t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        if all(c.cancel.is_set() for c in batch):
            raise Interrupted()
        total = getattr(pipe, "num_timesteps", None) or steps
        done = min(1.0, (i + 1) / total)
        for index, call in enumerate(batch):
            if call.progress is not None and not call.cancel.is_set():
                # No preview for the last step: the finished image follows at once.
                shot = preview(tensors.get("latents"), index, entry["taesd"]) if done < 1.0 else None
                call.progress(done, shot)
        return {}

    return on_step_end


def steps_for_strength(steps: int, strength: float) -> int:
    total = math.ceil(steps / strength)
    while int(total * strength) < steps:  # float rounding can leave it one short
        total += 1
    return total


def _decode(data: bytes | None, what: str) -> Image.Image:
    try:
        return decode_image(data or b"").image
    except ImageRejected as exc:
        raise UnsupportedRequest(f"the {what} image cannot be used: {exc}") from None
