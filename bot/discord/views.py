"""What members see of a result: its embed, its buttons and reactions, and progress text."""
from __future__ import annotations

import re

import discord

from ..core.models import EventState, JobRecord, Kind
from .errors import on_command_error

REACTIONS = {"\U0001f501": "variation", "\U0001f3b2": "reroll", "\u2b06\ufe0f": "upscale",
             "\U0001f5d1\ufe0f": "delete"}
OUTPAINTS = {"zoom": "\U0001f50d", "left": "\u2b05\ufe0f", "right": "\u27a1\ufe0f", "up": "\u2b06\ufe0f",
             "down": "\u2b07\ufe0f"}
BUTTON_EMOJI = {**{a: e for e, a in REACTIONS.items()}, "enhance": "\U0001fa84", **OUTPAINTS}  # buttons only
ACTION_LABELS = {"variation": "Vary", "reroll": "Reroll", "upscale": "Upscale", "enhance": "Enhance",
                 "delete": "Delete", "zoom": "Zoom out", "left": "Pan", "right": "Pan", "up": "Pan", "down": "Pan"}
TITLES = {Kind.IMAGINE: "Imagined", Kind.VARIATION: "Variation", Kind.EDIT: "Edit", Kind.UPSCALE: "Upscaled"}


def action_for_emoji(name: str) -> str | None:
    """The action of a reaction; clients send some emoji with and some without U+FE0F."""
    bare = name.replace("\ufe0f", "")
    for emoji, action in REACTIONS.items():
        if emoji.replace("\ufe0f", "") == bare:
            return action
    return None


class ResultButton(discord.ui.DynamicItem[discord.ui.Button],
                   template=r"easel:(?P<action>variation|reroll|upscale|enhance|delete|zoom|left|right|up|down):"
                            r"(?P<job>\d+)"):
    """A button under a result. Its custom id names the action and the job, so it keeps working
    after a restart (registered with Client.add_dynamic_items)."""

    def __init__(self, action: str, job_id: int):
        emoji = BUTTON_EMOJI[action]
        style = discord.ButtonStyle.danger if action == "delete" else discord.ButtonStyle.secondary
        super().__init__(discord.ui.Button(label=ACTION_LABELS[action], emoji=emoji, style=style,
                                           custom_id=f"easel:{action}:{job_id}"))
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


def result_view(job: JobRecord, *, can_enhance: bool = False) -> discord.ui.View:
    view = discord.ui.View(timeout=None)
    for action in ("variation", "reroll", "upscale", "enhance", "delete"):
        if action == "upscale" and job.kind == Kind.UPSCALE:
            continue
        if action == "enhance" and not (can_enhance and job.kind == Kind.IMAGINE and job.original_prompt is None):
            continue
        view.add_item(ResultButton(action, job.id))
    if job.kind != Kind.UPSCALE:  # a second row: zoom out and pan (outpainting)
        for action in OUTPAINTS:
            view.add_item(ResultButton(action, job.id))
    return view


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


def progress_text(state: str, position: int | None, fraction: float | None) -> str:
    if state == EventState.QUEUED:
        return f"\u23f3 Queued \u2014 position {position}" if position else "\u23f3 Queued"
    if state == EventState.RUNNING or fraction is None:
        return "\U0001f3a8 Generating\u2026"
    done = int(fraction * 10)
    bar = "\u2588" * done + "\u2591" * (10 - done)
    return f"\U0001f3a8 Generating\u2026 {bar} {fraction * 100:.0f}%"
