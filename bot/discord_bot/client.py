"""The discord.py client: slash commands, the persistent result buttons, reactions, and running
the bot beside the image server until SIGINT/SIGTERM."""
from __future__ import annotations

import asyncio
import logging
import signal
from typing import Literal

import aiohttp
import discord
import yarl
from discord import app_commands

from ..bootstrap import App
from ..config import ConfigError, DiscordSettings, Settings
from ..core.models import MAX_SEED
from .frontend import Frontend
from .results import ResultButton

log = logging.getLogger(__name__)
ASPECTS = ["1:1", "16:9", "9:16", "3:2", "2:3", "4:3", "3:4", "21:9"]
QUALITIES = ["standard", "hd", "low", "medium", "high"]
Period = Literal["day", "week", "month"]


def intents() -> discord.Intents:
    """Only what easel needs: guilds (channels, roles, age restriction) and reactions."""
    wanted = discord.Intents.none()
    wanted.guilds = True
    wanted.guild_reactions = True
    return wanted


def build_tree(client: EaselClient) -> app_commands.CommandTree:
    tree = app_commands.CommandTree(client)
    front = client.frontend

    async def model_autocomplete(interaction: discord.Interaction, current: str):
        return [app_commands.Choice(name=n, value=n) for n in front.model_choices(current)]

    async def sampler_autocomplete(interaction: discord.Interaction, current: str):
        return [app_commands.Choice(name=n, value=n) for n in front.option_choices("sampler", current)]

    @tree.command(description="Make an image from a prompt (inline --seed, --no, --ar work too)")
    @app_commands.describe(prompt="what to draw", negative="what to keep out", seed="for a reproducible image",
                           model="which model", aspect="width:height", quality="for models that have it",
                           sampler="the sampler, for models that take one (local models)",
                           count="how many images")
    @app_commands.autocomplete(model=model_autocomplete, sampler=sampler_autocomplete)
    @app_commands.choices(aspect=[app_commands.Choice(name=a, value=a) for a in ASPECTS],
                          quality=[app_commands.Choice(name=q, value=q) for q in QUALITIES])
    async def imagine(interaction: discord.Interaction, prompt: app_commands.Range[str, 1, 4000],
                      negative: str | None = None, seed: app_commands.Range[int, 0, MAX_SEED] | None = None,
                      model: str | None = None, aspect: str | None = None, quality: str | None = None,
                      sampler: str | None = None,
                      count: app_commands.Range[int, 1, 4] = 1):
        await front.imagine(interaction, prompt, negative, seed, model, aspect,
                            {"quality": quality, "sampler": sampler}, count)

    @tree.command(description="Repaint an image from a prompt (where the mask is white)")
    @app_commands.describe(image="the image to edit", mask="white: repaint, black: keep", prompt="what to paint")
    @app_commands.autocomplete(model=model_autocomplete)
    async def edit(interaction: discord.Interaction, image: discord.Attachment, prompt: str,
                   mask: discord.Attachment | None = None, model: str | None = None):
        await front.edit(interaction, image, mask, prompt, model)

    @tree.command(description="A variation of an earlier result (default: your last) or of an image")
    @app_commands.describe(job="a job number or a link to a result message", image="or an image of yours",
                           seed="for a reproducible variation", strength="0-1: how far from the source")
    async def variation(interaction: discord.Interaction, job: str | None = None,
                        image: discord.Attachment | None = None,
                        seed: app_commands.Range[int, 0, MAX_SEED] | None = None,
                        strength: app_commands.Range[float, 0.05, 1.0] | None = None):
        await front.variation(interaction, job, image, seed, strength)

    @tree.command(description="Enlarge an earlier result (default: your last)")
    @app_commands.describe(job="a job number or a link to a result message")
    async def upscale(interaction: discord.Interaction, job: str | None = None):
        await front.upscale(interaction, job)

    @tree.command(description="Your balance, spend this period and recent jobs")
    async def usage(interaction: discord.Interaction):
        await front.usage(interaction)

    @tree.command(name="settings", description="Your defaults: model, aspect, private results")
    @app_commands.describe(model="a model, or 'default'", aspect="like 16:9, or 'default'",
                           private="only you see your results")
    @app_commands.autocomplete(model=model_autocomplete)
    async def settings_command(interaction: discord.Interaction, model: str | None = None,
                               aspect: str | None = None, private: bool | None = None):
        await front.user_settings(interaction, model, aspect, private)

    budget = app_commands.Group(name="budget", description="Budgets (admins)", guild_only=True,
                                default_permissions=discord.Permissions(manage_guild=True))
    @budget.command(name="show", description="A member's balance and spend")
    @app_commands.describe(user="the member", period="spend over this period (default: the budget period)")
    async def budget_show(interaction: discord.Interaction, user: discord.Member, period: Period | None = None):
        await front.budget(interaction, "show", user, period=period)

    @budget.command(name="set", description="Set a member's balance")
    @app_commands.describe(user="the member", amount="the new balance in USD")
    async def budget_set(interaction: discord.Interaction, user: discord.Member, amount: float):
        await front.budget(interaction, "set", user, amount)

    @budget.command(name="grant", description="Add to a member's balance")
    @app_commands.describe(user="the member", amount="USD to add (negative to take away)")
    async def budget_grant(interaction: discord.Interaction, user: discord.Member, amount: float):
        await front.budget(interaction, "grant", user, amount)

    @budget.command(name="reset", description="Put a member's balance back to the default allowance")
    @app_commands.describe(user="the member")
    async def budget_reset(interaction: discord.Interaction, user: discord.Member):
        await front.budget(interaction, "reset", user)

    @budget.command(name="report", description="Top spenders and spend per provider")
    @app_commands.describe(period="spend over this period (default: the budget period)")
    async def budget_report(interaction: discord.Interaction, period: Period | None = None):
        await front.budget(interaction, "report", period=period)

    @budget.command(name="guild-cap", description="This server's spending cap per period (0: none)")
    @app_commands.describe(amount="USD per budget period; 0 removes the cap")
    async def budget_guild_cap(interaction: discord.Interaction, amount: float):
        await front.budget(interaction, "guild-cap", amount=amount)

    tree.add_command(budget)
    tree.error(on_command_error)
    return tree


UNEXPECTED = "\u26a0\ufe0f Something went wrong on easel's side. Nothing was charged; please try again."


async def on_command_error(interaction: discord.Interaction, error: app_commands.AppCommandError) -> None:
    """The one handler for whatever escapes a command: the member always hears back, privately,
    instead of looking at "thinking..." for good."""
    log.error("/%s failed", getattr(interaction.command, "qualified_name", "?"), exc_info=error)
    try:
        if interaction.response.is_done():
            try:  # the deferred "thinking..." message may be public: the failure is the member's
                await interaction.delete_original_response()
            except discord.HTTPException:
                pass
            await interaction.followup.send(UNEXPECTED, ephemeral=True)
        else:
            await interaction.response.send_message(UNEXPECTED, ephemeral=True)
    except discord.HTTPException as exc:
        log.warning("could not tell the member about the failure: %s", exc)


class EaselClient(discord.Client):
    def __init__(self, app: App, settings: DiscordSettings, *, guild_ready_timeout: float = 2.0):
        super().__init__(intents=intents(), guild_ready_timeout=guild_ready_timeout)
        self.app = app
        self.discord_settings = settings
        self.frontend = Frontend(self, app, settings)
        self.tree = build_tree(self)

    async def setup_hook(self) -> None:
        await self.app.accounts.load_settings()
        self.add_dynamic_items(ResultButton)
        if self.discord_settings.sync_guilds:
            for guild_id in self.discord_settings.sync_guilds:
                guild = discord.Object(id=int(guild_id))
                self.tree.copy_global_to(guild=guild)
                await self.tree.sync(guild=guild)
        else:
            await self.tree.sync()

    async def on_raw_reaction_add(self, payload: discord.RawReactionActionEvent) -> None:
        await self.frontend.on_reaction(payload)


def point_discord_py(api_base: str | None, gateway_url: str | None) -> None:
    """Send discord.py's REST calls and gateway connection to Discord-compatible addresses."""
    if api_base:
        discord.http.Route.BASE = api_base.rstrip("/")
    if gateway_url:
        discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(gateway_url)


async def ask_gateway(api_base: str, token: str) -> str:
    """The gateway URL from a Discord-compatible API's GET /gateway/bot."""
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{api_base.rstrip('/')}/gateway/bot",
                               headers={"Authorization": f"Bot {token}"}) as resp:
            if resp.status != 200:
                raise ConfigError(f"{api_base}/gateway/bot answered {resp.status}; set DISCORD_GATEWAY_URL")
            return (await resp.json())["url"]


async def serve(settings: Settings, app: App, *, stop: asyncio.Event | None = None) -> None:
    """Run the bot and the image server until `stop` is set (or SIGINT/SIGTERM)."""
    from aiohttp import web

    from storage.server import make_image_app

    token = settings.discord.token()
    if token is None:
        raise ConfigError(f"the bot token is read from ${settings.discord.token_env}, which is not set")
    api_base = settings.discord.resolved_api_base()
    gateway = settings.discord.resolved_gateway_url()
    if api_base and not gateway:
        gateway = await ask_gateway(api_base, token)
    point_discord_py(api_base, gateway)

    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # not the main thread, or not POSIX
            pass
    runner = web.AppRunner(make_image_app(app.blobs))
    await runner.setup()
    await web.TCPSite(runner, settings.server.host, settings.server.port).start()
    client = EaselClient(app, settings.discord)
    bot = asyncio.create_task(client.start(token))
    waiter = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({bot, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if bot.done():
            bot.result()  # a login or connection failure: raise it
    finally:
        log.info("shutting down: letting running jobs finish")
        await client.frontend.shutdown(settings.discord.shutdown_grace_s)
        await client.close()
        waiter.cancel()
        if not bot.done():
            bot.cancel()
        await asyncio.gather(bot, return_exceptions=True)
        await runner.cleanup()
