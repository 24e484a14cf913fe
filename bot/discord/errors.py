"""How easel words a refusal or a failure on Discord: one table from the core's error codes to
text, and the one handler for whatever escapes a command."""
from __future__ import annotations

import logging

import discord
from discord import app_commands

from ..core.models import ErrorCode

log = logging.getLogger(__name__)

# {error} is the core's own sentence, without a final full stop.
WORDING: dict[ErrorCode, str] = {
    ErrorCode.USAGE: "\u2753 {error}.",
    ErrorCode.NOT_FOUND: "\u2753 {error}.",
    ErrorCode.FORBIDDEN: "\U0001f512 {error}",
    ErrorCode.OVER_BUDGET: "\U0001f4b8 {error}. Ask an admin for more budget.",
    ErrorCode.SPEND_CAP: "\u23f8\ufe0f {error}.",
    ErrorCode.BUSY: "\u23f3 {error}.",
    ErrorCode.RATE_LIMITED: "\u23f3 {error}.",
    ErrorCode.SUSPENDED: "\U0001f6ab {error}.",
    ErrorCode.BLOCKED: "\U0001f6ab Not allowed: {error}. Nothing was charged.",
    ErrorCode.CANCELLED: "\u274c Cancelled. Nothing was charged.",
    ErrorCode.INTERRUPTED: "\u26a0\ufe0f That was interrupted: {error}. Nothing was charged.",
    ErrorCode.FAILED: "\u26a0\ufe0f That failed: {error}. Nothing was charged.",
}
UNEXPECTED = "\u26a0\ufe0f Something went wrong on easel's side. Nothing was charged; please try again."
RESTARTING = "\u23f8\ufe0f easel is restarting; try again in a minute."
CANCELLED_BY_RESTART = "\u274c easel is restarting, so this job was cancelled. Nothing was charged."


class Refused(app_commands.AppCommandError):
    """A request the front end turns down before anything is spent (a bad option, an upload that
    is not an image); the message is for the member. Raised anywhere in a command (or a button),
    it reaches the one error handler below."""

    def __init__(self, message: str, code: ErrorCode = ErrorCode.USAGE):
        super().__init__(message)
        self.code = code


def wording(code: str | None, error: str | None) -> str:
    """What the member reads for an error code and the core's message."""
    try:
        template = WORDING[ErrorCode(code)]
    except ValueError:
        template = WORDING[ErrorCode.FAILED]
    return template.format(error=(error or "unknown error").rstrip("."))


def refusal_text(outcome) -> str:
    """The wording, and for a budget limit when it lifts (a Discord timestamp, in the member's
    own time zone)."""
    text = wording(outcome.error_code or ErrorCode.FAILED, outcome.error)
    retry_at = getattr(outcome, "retry_at", None)
    if retry_at:
        text += f" {'It refills' if outcome.error_code == ErrorCode.OVER_BUDGET else 'It lifts'} <t:{int(retry_at)}:R>."
    return text


async def tell_privately(interaction: discord.Interaction, text: str, *, drop_original: bool = False) -> None:
    """Answer the member alone; with `drop_original`, first delete the deferred "thinking..."
    message, which may be public."""
    if not interaction.response.is_done():
        await interaction.response.send_message(text, ephemeral=True)
        return
    if drop_original:
        try:
            await interaction.delete_original_response()
        except discord.HTTPException:
            pass
    await interaction.followup.send(text, ephemeral=True)


async def on_command_error(interaction: discord.Interaction, error: Exception) -> None:
    """The one handler for whatever escapes a command (installed as tree.on_error) or a result
    button: the member always hears back, privately, instead of looking at "thinking..." for good."""
    original = getattr(error, "original", error)
    if isinstance(original, Refused):
        text = wording(original.code, str(original))
    else:
        what = getattr(interaction.command, "qualified_name", None) or (interaction.data or {}).get("custom_id", "?")
        log.error("/%s failed", what, exc_info=error)
        text = UNEXPECTED
    try:
        await tell_privately(interaction, text, drop_original=True)
    except discord.HTTPException as exc:
        log.warning("could not tell the member about the failure: %s", exc)
