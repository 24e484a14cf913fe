"""What members see: result embeds and buttons, refusal wording, and delivering a finished job to
Discord (within the upload limit, and to the channel once the interaction token has expired)."""
from __future__ import annotations

import io
import re
import time

import discord

from bot.core.models import JobRecord

# Interaction tokens last 15 minutes; past this age easel posts to the channel instead.
TOKEN_LIFETIME_S = 15 * 60 - 30

REACTIONS = {"\U0001f501": "variation", "\U0001f3b2": "reroll", "\u2b06\ufe0f": "upscale",
             "\U0001f5d1\ufe0f": "delete"}
ACTION_LABELS = {"variation": "Vary", "reroll": "Reroll", "upscale": "Upscale", "delete": "Delete"}


def action_for_emoji(name: str) -> str | None:
    """The action of a reaction; clients send some emoji with and some without U+FE0F."""
    bare = name.replace("\ufe0f", "")
    for emoji, action in REACTIONS.items():
        if emoji.replace("\ufe0f", "") == bare:
            return action
    return None


class ResultButton(discord.ui.DynamicItem[discord.ui.Button], template=r"easel:(?P<action>variation|reroll|upscale|delete):(?P<job>\d+)"):
    """A button under a result. Its custom id names the action and the job, so it keeps working
    after a restart (registered with Client.add_dynamic_items)."""

    def __init__(self, action: str, job_id: int):
        emoji = next(e for e, a in REACTIONS.items() if a == action)
        style = discord.ButtonStyle.danger if action == "delete" else discord.ButtonStyle.secondary
        super().__init__(discord.ui.Button(label=ACTION_LABELS[action], emoji=emoji, style=style,
                                           custom_id=f"easel:{action}:{job_id}"))
        self.action, self.job_id = action, job_id

    @classmethod
    async def from_custom_id(cls, interaction, item, match: re.Match) -> ResultButton:
        return cls(match["action"], int(match["job"]))

    async def callback(self, interaction: discord.Interaction) -> None:
        await interaction.client.frontend.on_result_action(interaction, self.action, self.job_id)


def result_view(job: JobRecord) -> discord.ui.View:
    view = discord.ui.View(timeout=None)
    for action in ("variation", "reroll", "upscale", "delete"):
        if action == "upscale" and job.kind == "upscale":
            continue
        view.add_item(ResultButton(action, job.id))
    return view


def _usd(micros: int) -> str:
    return f"${micros / 1e6:.4f}".rstrip("0").rstrip(".") if micros else "$0"


def result_embed(job: JobRecord, balance_usd: float | None, filename: str | None,
                 full_url: str | None = None) -> discord.Embed:
    title = {"imagine": "Imagined", "variation": "Variation", "edit": "Edit", "upscale": "Upscaled"}[job.kind]
    embed = discord.Embed(title=f"{title} \u00b7 job {job.id}", description=_clip(job.prompt, 4000) or None,
                          url=full_url, color=0x5865F2)
    if job.negative_prompt:
        embed.add_field(name="Negative", value=_clip(job.negative_prompt, 1000), inline=False)
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


def _clip(text: str | None, limit: int) -> str:
    text = text or ""
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def image_file(job: JobRecord, data: bytes, limit_bytes: int) -> tuple[discord.File, bool]:
    """The image as an attachment within `limit_bytes`: the PNG itself, or a JPEG of it (then
    True: the embed links to the full image on easel's server)."""
    if len(data) <= limit_bytes:
        return discord.File(io.BytesIO(data), filename=f"easel-{job.id}.png"), False
    from PIL import Image

    img = Image.open(io.BytesIO(data)).convert("RGB")
    for quality, scale in ((90, 1.0), (80, 1.0), (80, 0.7), (70, 0.5), (60, 0.35)):
        frame = img if scale == 1.0 else img.resize((max(1, int(img.width * scale)), max(1, int(img.height * scale))))
        buf = io.BytesIO()
        frame.save(buf, format="JPEG", quality=quality, optimize=True)
        if buf.tell() <= limit_bytes:
            buf.seek(0)
            return discord.File(buf, filename=f"easel-{job.id}.jpg"), True
    raise ValueError("the image cannot be made small enough to upload")


def refusal_text(outcome) -> str:
    code, error = outcome.error_code, outcome.error or "unknown error"
    if code == "over_budget":
        return f"\U0001f4b8 {error}. Ask an admin for more budget."
    if code == "spend_cap":
        return f"\u23f8\ufe0f {error}."
    if code == "blocked":
        return f"\U0001f6ab Not allowed: {error}. Nothing was charged."
    if code == "busy":
        return f"\u23f3 {error}."
    if code == "usage":
        return f"\u2753 {error}."
    if code == "cancelled":
        return "\u274c Cancelled. Nothing was charged."
    return f"\u26a0\ufe0f That failed: {error}. Nothing was charged."


def progress_text(state: str, position: int | None, fraction: float | None) -> str:
    if state == "queued":
        return f"\u23f3 Queued \u2014 position {position}" if position else "\u23f3 Queued"
    if state == "running" or fraction is None:
        return "\U0001f3a8 Generating\u2026"
    done = int(fraction * 10)
    bar = "\u2588" * done + "\u2591" * (10 - done)
    return f"\U0001f3a8 Generating\u2026 {bar} {fraction * 100:.0f}%"


def token_expired(started: float) -> bool:
    return time.monotonic() - started > TOKEN_LIFETIME_S


def is_expired_token_error(exc: Exception) -> bool:
    # 50027: Invalid Webhook Token. A 404 Unknown Webhook / Interaction is the same for us.
    return isinstance(exc, discord.NotFound) or getattr(exc, "code", None) in (50027, 10015, 10062)
