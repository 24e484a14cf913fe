"""/help: what each command and button does, the inline flags, and what the member has left."""
from __future__ import annotations

import discord
from discord import app_commands
from discord.ext import commands

from ..context import role_ids
from ..delivery import Delivery

COMMANDS = """**Commands**
`/imagine prompt` make images (`count` up to {max_count}: one grid) \u00b7 `/edit image prompt` repaint an image
`/variation` `/upscale` of a result (a job number or a message link) \u00b7 `/queue` your waiting jobs
`/usage` your budget and recent jobs \u00b7 `/settings` your defaults (model, aspect, private, remix)
`/gallery` images of this server"""
BUTTONS = """**Buttons**
U1\u2013U4 upscale, V1\u2013V4 vary one image of a grid \u00b7 \U0001f501 Reroll all: the grid again
Vary (Subtle) / Vary (Strong) \u00b7 \U0001f3b2 Reroll: new seed \u00b7 \u2b06\ufe0f Upscale \u00b7 \U0001f4cb Details: the \
settings and the command that makes the image again
\U0001f50d Zoom out and pan \u00b7 \U0001f5d1\ufe0f Delete (yours) \u00b7 \u274c Cancel a waiting or running job
With remix on (`/settings remix:True`), vary and reroll first let you edit the prompt.
Right-click a result (Apps): Vary, Upscale, Details; any image: Use as image for /edit."""
FLAGS = """**Inline flags** (at the end of a prompt)
`--seed 42` `--no fog, people` (`--no +text` adds to the default) `--ar 16:9` `--model M`
`--steps N` `--guidance G` `--quality Q` `--style S` `--sampler S` `--enhance`"""


class Help(commands.Cog):
    def __init__(self, delivery: Delivery):
        self.app, self.settings = delivery.app, delivery.settings

    @app_commands.command(name="help", description="What easel's commands and buttons do, and your budget")
    async def help(self, interaction: discord.Interaction) -> None:
        m = await self.app.budgets.member(str(interaction.user.id), role_ids(interaction.user), recent=0)
        money = self.app.budgets.money.text
        left = "You are exempt from limits." if m.exempt else (
            f"**You have** {money(m.balance.available_micros)} left; it refills <t:{int(m.refills_at)}:R>.")
        text = "\n\n".join([COMMANDS.format(max_count=self.settings.max_count), BUTTONS, FLAGS, left])
        await interaction.response.send_message(text, ephemeral=True)
