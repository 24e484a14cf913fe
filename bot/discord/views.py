"""What members see of a result: its embed, its buttons and reactions, and progress text."""
from __future__ import annotations

import re
from collections.abc import Callable

import discord

from ..core.gallery import reproduce
from ..core.models import EventState, JobRecord, Kind
from .errors import on_command_error

REACTIONS = {"\U0001f501": "variation", "\U0001f3b2": "reroll", "\u2b06\ufe0f": "upscale",
             "\U0001f5d1\ufe0f": "delete"}
OUTPAINTS = {"zoom": "\U0001f50d", "left": "\u2b05\ufe0f", "right": "\u27a1\ufe0f", "up": "\u2b06\ufe0f",
             "down": "\u2b07\ufe0f"}
BUTTON_EMOJI = {**{a: e for e, a in REACTIONS.items()}, "enhance": "\U0001fa84", **OUTPAINTS,  # buttons only
                "subtle": "\U0001f501", "strong": "\U0001f500", "details": "\U0001f4cb", "cancel": "\u274c"}
ACTION_LABELS = {"variation": "Vary", "reroll": "Reroll", "upscale": "Upscale", "enhance": "Enhance",
                 "delete": "Delete", "zoom": "Zoom out", "left": "Pan", "right": "Pan", "up": "Pan", "down": "Pan",
                 "subtle": "Vary (Subtle)", "strong": "Vary (Strong)", "details": "Details", "cancel": "Cancel"}
# The actions a result's buttons take; a variation, reroll or vary button opens the remix modal
# for a member who has remix on.
ACTIONS = tuple(ACTION_LABELS)
REMIXABLE = ("variation", "reroll", "subtle", "strong")
TITLES = {Kind.IMAGINE: "Imagined", Kind.VARIATION: "Variation", Kind.EDIT: "Edit", Kind.UPSCALE: "Upscaled"}


def action_for_emoji(name: str) -> str | None:
    """The action of a reaction; clients send some emoji with and some without U+FE0F."""
    bare = name.replace("\ufe0f", "")
    for emoji, action in REACTIONS.items():
        if emoji.replace("\ufe0f", "") == bare:
            return action
    return None


class ResultButton(discord.ui.DynamicItem[discord.ui.Button],
                   template=r"easel:(?P<action>" + "|".join(ACTIONS) + r"):(?P<job>\d+)"):
    """A button under a result (or a waiting job's Cancel). Its custom id names the action and the
    job, so it keeps working after a restart (registered with Client.add_dynamic_items)."""

    def __init__(self, action: str, job_id: int, *, label: str | None = None, row: int | None = None):
        emoji = None if label else BUTTON_EMOJI[action]  # a grid's U1/V1 buttons go by their label
        style = discord.ButtonStyle.danger if action in ("delete", "cancel") else discord.ButtonStyle.secondary
        super().__init__(discord.ui.Button(label=label or ACTION_LABELS[action], emoji=emoji, style=style,
                                           custom_id=f"easel:{action}:{job_id}", row=row))
        self.action, self.job_id = action, job_id

    @classmethod
    async def from_custom_id(cls, interaction, item, match: re.Match) -> ResultButton:
        return cls(match["action"], int(match["job"]))

    async def callback(self, interaction: discord.Interaction) -> None:
        cog = interaction.client.get_cog("Results")  # type: ignore[attr-defined]
        try:
            await cog.on_result_action(interaction, self.action, self.job_id)
        except Exception as exc:  # a view's errors do not reach tree.on_error: the same handler
            await on_command_error(interaction, exc)


class GridButton(discord.ui.DynamicItem[discord.ui.Button], template=r"easel:rerollall:(?P<jobs>\d+(?:\.\d+){1,3})"):
    """🔁 under a grid: every image of it again with new seeds, as one new grid."""

    def __init__(self, job_ids: list[int]):
        super().__init__(discord.ui.Button(label="Reroll all", emoji="\U0001f501", row=2,
                                           custom_id="easel:rerollall:" + ".".join(map(str, job_ids))))
        self.job_ids = job_ids

    @classmethod
    async def from_custom_id(cls, interaction, item, match: re.Match) -> GridButton:
        return cls([int(j) for j in match["jobs"].split(".")])

    async def callback(self, interaction: discord.Interaction) -> None:
        cog = interaction.client.get_cog("Results")  # type: ignore[attr-defined]
        try:
            await cog.on_reroll_all(interaction, self.job_ids)
        except Exception as exc:
            await on_command_error(interaction, exc)


def result_view(job: JobRecord, *, can_enhance: bool = False) -> discord.ui.View:
    view = discord.ui.View(timeout=None)
    for action in ("subtle", "strong", "reroll", "upscale", "details", "enhance", "delete"):
        if action == "upscale" and job.kind == Kind.UPSCALE:
            continue
        if action == "enhance" and not (can_enhance and job.kind == Kind.IMAGINE and job.original_prompt is None):
            continue
        view.add_item(ResultButton(action, job.id, row=0 if action in ("subtle", "strong", "reroll", "upscale") else 1))
    if job.kind != Kind.UPSCALE:  # a last row: zoom out and pan (outpainting)
        for action in OUTPAINTS:
            view.add_item(ResultButton(action, job.id, row=2))
    return view


def grid_view(jobs: list[JobRecord]) -> discord.ui.View:
    """U1-U4 upscale and V1-V4 vary one image of a grid (numbered left to right, top to bottom);
    🔁 rerolls them all."""
    view = discord.ui.View(timeout=None)
    for row, (action, letter) in enumerate((("upscale", "U"), ("variation", "V"))):
        for i, job in enumerate(jobs, start=1):
            view.add_item(ResultButton(action, job.id, label=f"{letter}{i}", row=row))
    view.add_item(GridButton([j.id for j in jobs]))
    view.add_item(ResultButton("details", jobs[0].id, row=2))
    return view


def cancel_view(job_id: int) -> discord.ui.View:
    view = discord.ui.View(timeout=None)
    view.add_item(ResultButton("cancel", job_id))
    return view


def grid_embed(jobs: list[JobRecord], balance_usd: float | None, filename: str,
               full_url: str | None = None) -> discord.Embed:
    """One embed for a grid: the prompt, and each image's job and seed."""
    first = jobs[0]
    embed = discord.Embed(title=f"Imagined \u00b7 {len(jobs)} images", description=_clip(first.prompt, 4000) or None,
                          url=full_url, color=0x5865F2)
    if first.negative_prompt:
        embed.add_field(name="Negative", value=_clip(first.negative_prompt, 1000), inline=False)
    for i, job in enumerate(jobs, start=1):
        seed = job.seed if job.seed is not None else "not reproducible"
        full = f" \u00b7 [PNG]({job.image_url})" if job.image_url else ""  # the grid may be a JPEG
        embed.add_field(name=f"{i} \u00b7 job {job.id}", value=f"seed {seed}{full}")
    embed.add_field(name="Model", value=f"{first.model} ({first.provider})")
    embed.add_field(name="Size", value=f"{first.width}\u00d7{first.height} each")
    embed.add_field(name="Cost", value=_usd(sum(j.cost_micros for j in jobs)))
    if balance_usd is not None:
        embed.add_field(name="Balance", value=f"${balance_usd:.4f}")
    embed.set_image(url=f"attachment://{filename}")
    embed.set_footer(text="U: upscale \u00b7 V: vary \u00b7 images numbered left to right, top to bottom")
    return embed


def _usd(micros: int) -> str:
    return f"${micros / 1e6:.4f}".rstrip("0").rstrip(".") if micros else "$0"


def _clip(text: str | None, limit: int) -> str:
    text = text or ""
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def result_embed(job: JobRecord, balance_usd: float | None, filename: str | None,
                 full_url: str | None = None) -> discord.Embed:
    embed = discord.Embed(title=f"{TITLES[Kind(job.kind)]} \u00b7 job {job.id}",
                          description=_clip(job.prompt, 4000) or None, url=full_url, color=0x5865F2)
    if job.negative_prompt:
        embed.add_field(name="Negative", value=_clip(job.negative_prompt, 1000), inline=False)
    if job.original_prompt:
        embed.add_field(name="Typed prompt (enhanced above)", value=_clip(job.original_prompt, 1000), inline=False)
    if job.revised_prompt:
        embed.add_field(name="Revised prompt", value=_clip(job.revised_prompt, 1000), inline=False)
    embed.add_field(name="Seed", value=str(job.seed) if job.seed is not None else "not reproducible")
    embed.add_field(name="Model", value=f"{job.model} ({job.provider})")
    embed.add_field(name="Size", value=f"{job.width}\u00d7{job.height}")
    embed.add_field(name="Cost", value=_usd(job.cost_micros))
    if balance_usd is not None:
        embed.add_field(name="Balance", value=f"${balance_usd:.4f}")
    if job.note:
        embed.add_field(name="Note", value=_clip(job.note, 1000), inline=False)
    if filename:
        embed.set_image(url=f"attachment://{filename}")
    embed.set_footer(text=f"/variation job:{job.id} \u00b7 /upscale job:{job.id}")
    return embed


def eta_text(eta_s: float | None) -> str:
    if eta_s is None:
        return ""
    return f", about {max(1, round(eta_s))} s" if eta_s < 90 else f", about {round(eta_s / 60)} min"


def progress_text(state: str, position: int | None, fraction: float | None, eta_s: float | None = None) -> str:
    if state == EventState.QUEUED:
        return f"\u23f3 Queued \u2014 position {position}{eta_text(eta_s)}" if position else "\u23f3 Queued"
    if state == EventState.RUNNING or fraction is None:
        return "\U0001f3a8 Generating\u2026"
    done = int(fraction * 10)
    bar = "\u2588" * done + "\u2591" * (10 - done)
    return f"\U0001f3a8 Generating\u2026 {bar} {fraction * 100:.0f}%"


def _code(text: str) -> str:
    """A code block to copy from; a ``` inside would end it early, so it is broken up."""
    return "```\n" + text.replace("```", "`\u200b``") + "\n```"


def details_text(job: JobRecord, money: Callable[[int], str]) -> str:
    """📋 Details: everything the image was made with, and the lines that make it again."""
    def shown(value: object) -> str:
        return "-" if value is None or value == "" else str(value)

    options = {k: v for k, v in job.options.items() if k not in ("lora", "loras")}
    loras = job.options.get("loras") or job.options.get("lora")
    lines = [f"**Job {job.id}** \u00b7 {job.kind} \u00b7 {job.status}",
             f"**Prompt** {_clip(job.prompt, 900)}",
             f"**Negative prompt** {_clip(shown(job.negative_prompt), 400)}",
             f"**Seed** {shown(job.seed)} \u00b7 **Model** {shown(job.model)} ({shown(job.provider)}) \u00b7 "
             f"**Size** {job.width}\u00d7{job.height}",
             f"**Steps** {shown(job.steps)} \u00b7 **Guidance** {shown(job.guidance)}"
             + (f" \u00b7 **Strength** {job.strength:g}" if job.strength is not None else ""),
             f"**LoRAs** {shown(loras) if loras else 'none'}",
             *([" \u00b7 ".join(f"**{k}** {v}" for k, v in sorted(options.items()))] if options else []),
             f"**Cost** {money(job.cost_micros)}"]
    again = reproduce(job)
    blocks = [(w, _code(c)) for w, c in (("On Discord:", again.discord), ("On the command line:", again.cli)) if c]
    if not blocks:
        lines.append("Made from an uploaded image: no command can carry it.")
    while True:  # a long prompt: the commands that fit (a cut one would not reproduce the image)
        text = "\n".join([*lines, *(part for block in blocks for part in block)])
        if len(text) <= 2000 or not blocks:
            return text if len(text) <= 2000 else text[:1999] + "\u2026"
        lines[1] = f"**Prompt** {_clip(job.prompt, 200)}"
        blocks.pop(0)
