"""/imagine, /edit, /variation and /upscale: each parses its options into one JobRequest and
hands it, with the member's defaults, to one service call."""
from __future__ import annotations

import discord
from discord import app_commands
from discord.ext import commands

from ...core.flags import FlagError, parse_aspect
from ...core.models import MAX_SEED, GenerationParams, JobRequest, Kind, UserSettings, size_text
from ..context import job_reference, of_interaction
from ..delivery import Delivery
from ..errors import Refused

ASPECTS = ["1:1", "16:9", "9:16", "3:2", "2:3", "4:3", "3:4", "21:9"]
QUALITIES = ["standard", "hd", "low", "medium", "high"]


async def model_autocomplete(interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
    names = sorted(s.name for s in interaction.client.app.router.healthy_models())  # type: ignore[attr-defined]
    return [app_commands.Choice(name=n, value=n) for n in names if current.lower() in n.lower()][:25]


async def sampler_autocomplete(interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
    """The samplers some usable model takes."""
    models = interaction.client.app.router.healthy_models()  # type: ignore[attr-defined]
    values = sorted({v for s in models for v in s.options.get("sampler", ())})
    return [app_commands.Choice(name=v, value=v) for v in values if current.lower() in v][:25]


async def lora_autocomplete(interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
    """The LoRAs of the chosen model (else of every usable one), 25 at a time, completing the last
    of a comma-separated list ("style-a:0.8, sty" -> "style-a:0.8, style-b")."""
    models = interaction.client.app.router.healthy_models()  # type: ignore[attr-defined]
    chosen = getattr(interaction.namespace, "model", None)
    names = sorted({n for s in models if not chosen or chosen in (s.name, *s.aliases) for n in s.loras})
    done, _, last = current.rpartition(",")
    prefix = f"{done}, " if done else ""
    return [app_commands.Choice(name=(prefix + n)[:100], value=(prefix + n)[:100])
            for n in names if last.strip().lower() in n.lower()][:25]


async def control_autocomplete(interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
    models = interaction.client.app.router.healthy_models()  # type: ignore[attr-defined]
    names = sorted({n for s in models for n in s.controlnets})
    return [app_commands.Choice(name=n, value=n) for n in names if current.lower() in n.lower()][:25]


class Generate(commands.Cog):
    def __init__(self, delivery: Delivery):
        self.delivery = delivery
        self.app, self.settings = delivery.app, delivery.settings

    @app_commands.command(description="Make an image from a prompt (inline --seed, --no, --ar work too)")
    @app_commands.describe(prompt="what to draw", negative="what to keep out", seed="for a reproducible image",
                           model="which model", aspect="width:height", quality="for models that have it",
                           sampler="the sampler, for models that take one (local models)",
                           count="how many images", enhance="let a chat model expand the prompt first",
                           lora="LoRA styles, NAME[:WEIGHT] separated by commas (up to 3; local models)",
                           control="a ControlNet (canny, depth...) that follows control_image",
                           control_image="the image the ControlNet follows",
                           control_job="or an earlier result's image: a job number or a link to it",
                           control_scale="how strongly it follows it (0-2)")
    @app_commands.autocomplete(model=model_autocomplete, sampler=sampler_autocomplete, lora=lora_autocomplete,
                               control=control_autocomplete)
    @app_commands.choices(aspect=[app_commands.Choice(name=a, value=a) for a in ASPECTS],
                          quality=[app_commands.Choice(name=q, value=q) for q in QUALITIES])
    async def imagine(self, interaction: discord.Interaction, prompt: app_commands.Range[str, 1, 4000],
                      negative: str | None = None, seed: app_commands.Range[int, 0, MAX_SEED] | None = None,
                      model: str | None = None, aspect: str | None = None, quality: str | None = None,
                      sampler: str | None = None, count: app_commands.Range[int, 1, 4] = 1,
                      enhance: bool | None = None, lora: str | None = None, control: str | None = None,
                      control_image: discord.Attachment | None = None,
                      control_scale: app_commands.Range[float, 0.0, 2.0] | None = None,
                      control_job: str | None = None) -> None:
        begun = await self.delivery.begin(interaction)
        if begun is None:
            return
        prefs, started = begun
        if count > self.settings.max_count:
            raise Refused(f"at most {self.settings.max_count} images at once")
        scale = None if control_scale is None else f"{control_scale:g}"
        options = {k: v for k, v in {"quality": quality, "sampler": sampler, "lora": lora, "control": control,
                                     "control_scale": scale}.items() if v}
        try:
            ratio = parse_aspect(aspect) if aspect else None
        except FlagError as exc:
            raise Refused(str(exc)) from None
        params = GenerationParams(prompt=prompt, negative_prompt=negative, seed=seed, model=model, options=options)
        if control_image is not None and control_job is not None:
            raise Refused("give control_image or control_job, not both")
        request = JobRequest(Kind.IMAGINE, of_interaction(interaction), params, defaults=prefs,
                             aspect=ratio, group=f"interaction:{interaction.id}", enhance=enhance,
                             image=await self._read(control_image, "control image"),
                             source_job_id=await self._job_id(control_job) if control_job else None)

        async def run(on_event):
            return await self.app.service.imagine(request, count, on_event)

        outcomes = await self.delivery.for_interaction(interaction, run, private=prefs.private, started=started,
                                                       grid=count > 1)
        await self.delivery.advise(interaction, outcomes)

    @app_commands.command(description="Repaint an image from a prompt (where the mask is white)")
    @app_commands.describe(image="the image to edit", mask="white: repaint, black: keep", prompt="what to paint")
    @app_commands.autocomplete(model=model_autocomplete)
    async def edit(self, interaction: discord.Interaction, image: discord.Attachment, prompt: str,
                   mask: discord.Attachment | None = None, model: str | None = None) -> None:
        begun = await self.delivery.begin(interaction)
        if begun is None:
            return
        prefs, started = begun
        request = JobRequest(Kind.EDIT, of_interaction(interaction), GenerationParams(prompt=prompt, model=model),
                             image=await self._read(image, "image"), mask=await self._read(mask, "mask"),
                             defaults=prefs)
        await self._submit(interaction, request, prefs, started)

    @app_commands.command(description="A variation of an earlier result (default: your last) or of an image")
    @app_commands.describe(job="a job number or a link to a result message", image="or an image of yours",
                           seed="for a reproducible variation", strength="0-1: how far from the source")
    async def variation(self, interaction: discord.Interaction, job: str | None = None,
                        image: discord.Attachment | None = None,
                        seed: app_commands.Range[int, 0, MAX_SEED] | None = None,
                        strength: app_commands.Range[float, 0.05, 1.0] | None = None) -> None:
        await self._from_earlier(interaction, Kind.VARIATION, job, image, GenerationParams(seed=seed, strength=strength))

    @app_commands.command(description="Enlarge an earlier result (default: your last)")
    @app_commands.describe(job="a job number or a link to a result message")
    async def upscale(self, interaction: discord.Interaction, job: str | None = None) -> None:
        await self._from_earlier(interaction, Kind.UPSCALE, job, None, GenerationParams())

    async def _from_earlier(self, interaction: discord.Interaction, kind: Kind, job: str | None,
                            image: discord.Attachment | None, params: GenerationParams) -> None:
        begun = await self.delivery.begin(interaction)
        if begun is None:
            return
        prefs, started = begun
        request = JobRequest(kind, of_interaction(interaction), params, source_job_id=await self._job_id(job),
                             image=await self._read(image, "image"))
        await self._submit(interaction, request, prefs, started)

    async def _submit(self, interaction: discord.Interaction, request: JobRequest, prefs: UserSettings,
                      started: float) -> None:
        async def run(on_event):
            return [await self.app.service.submit(request, on_event)]

        await self.delivery.for_interaction(interaction, run, private=prefs.private, started=started)

    async def _job_id(self, text: str | None) -> int | None:
        """The job a job number or a result message link names (None: the member's last)."""
        job_id, message_id = job_reference(text)
        if message_id is not None:
            found = await self.app.results.for_message(message_id)
            if found is None:
                raise Refused("that message is not an easel result")
            job_id = found.id
        return job_id

    async def _read(self, attachment: discord.Attachment | None, what: str) -> bytes | None:
        """An upload's bytes, refused before download if it says it is no image or too large (the
        core checks what it really is)."""
        if attachment is None:
            return None
        limit = self.app.settings.generation.max_upload_bytes
        if not (attachment.content_type or "").startswith("image/"):
            raise Refused(f"the {what} must be an image (PNG, JPEG or WebP), not "
                          f"{attachment.content_type or 'an unknown type'}")
        if attachment.size > limit:
            raise Refused(f"the {what} is {size_text(attachment.size)}; the limit is {size_text(limit)}")
        return await attachment.read()
