"""The discord.py bot: its intents, its cogs and persistent result buttons, the one error
handler, and running it beside the image server until SIGINT/SIGTERM."""
from __future__ import annotations

import asyncio
import logging
import signal

import aiohttp
import discord
import yarl
from discord.ext import commands

from ..bootstrap import App
from ..config import ConfigError, DiscordSettings, Settings, listen_error
from .cogs.account import Account
from .cogs.admin import Admin
from .cogs.budget import Budget
from .cogs.gallery import Gallery
from .cogs.generate import Generate
from .cogs.help import Help
from .cogs.menus import Menus
from .cogs.queue import Queue
from .cogs.results import Results
from .delivery import Delivery
from .errors import on_command_error
from .views import GridButton, ResultButton

log = logging.getLogger(__name__)


def intents() -> discord.Intents:
    """Only what easel needs: guilds (channels, roles, age restriction) and reactions."""
    wanted = discord.Intents.none()
    wanted.guilds = True
    wanted.guild_reactions = True
    return wanted


class EaselClient(commands.Bot):
    """Slash commands only: no prefix commands, so no message content is read."""

    def __init__(self, app: App, settings: DiscordSettings, *, guild_ready_timeout: float = 2.0, **sharding):
        super().__init__(command_prefix=commands.when_mentioned, help_command=None, intents=intents(),
                         guild_ready_timeout=guild_ready_timeout, **sharding)
        self.app = app
        self.discord_settings = settings
        self.delivery = Delivery(app, settings, self)
        self.tree.error(on_command_error)

    async def setup_hook(self) -> None:
        await self.app.accounts.load_settings()
        for cog in (Generate(self.delivery), Results(self, self.delivery), Account(self.delivery),
                    Admin(self.delivery), Budget(self.delivery), Gallery(self.delivery), Queue(self.delivery),
                    Help(self.delivery), Menus(self, self.delivery)):
            await self.add_cog(cog)
        self.app.metrics.alert_listeners.append(self.delivery.spend_alert_poster(asyncio.get_running_loop()))
        self.add_dynamic_items(ResultButton, GridButton)
        if self.discord_settings.sync_guilds:
            for guild_id in self.discord_settings.sync_guilds:
                guild = discord.Object(id=int(guild_id))
                self.tree.copy_global_to(guild=guild)
                await self.tree.sync(guild=guild)
        else:
            await self.tree.sync()

    async def on_message(self, message: discord.Message) -> None:
        """easel has no prefix commands (and no message content intent)."""


class ShardedEaselClient(EaselClient, commands.AutoShardedBot):
    """Several gateway shards in one process (discord.py's AutoShardedClient): `shard_count`
    None asks Discord's GET /gateway/bot for its recommended count; `shard_ids` are the shards
    this process runs (None: all of them)."""

    _max_concurrency: int | None = None

    async def before_identify_hook(self, shard_id: int | None, *, initial: bool = False) -> None:
        # Discord lets max_concurrency shards identify per 5 s (its session_start_limit):
        # only every max_concurrency-th shard waits, not each one as discord.py's default does.
        if self._max_concurrency is None:
            data = await self.http.request(discord.http.Route("GET", "/gateway/bot"))
            self._max_concurrency = max(1, int((data.get("session_start_limit") or {}).get("max_concurrency", 1)))
        ids = list(self.shard_ids or range(self.shard_count or 1))
        position = ids.index(shard_id) if shard_id in ids else 0
        if not initial and position % self._max_concurrency == 0:
            await asyncio.sleep(5.0)


def make_client(app: App, settings: DiscordSettings, **options) -> EaselClient:
    """The bot for `discord.shards`: one connection (0), or an AutoShardedClient ("auto", or a
    count and, to split the guilds between processes, this process's shard_ids)."""
    if settings.shards == 0:
        return EaselClient(app, settings, **options)
    count = None if settings.shards == "auto" else settings.shards
    return ShardedEaselClient(app, settings, shard_count=count, shard_ids=list(settings.shard_ids) or None,
                              **options)


async def reload_settings(app: App) -> list[str] | None:
    """SIGHUP: read the settings again and apply what can change without a restart; a bad file
    is reported and changes nothing."""
    from ..config import load_settings

    source = app.settings.source
    try:
        new = await asyncio.to_thread(load_settings, str(source) if source else None)
    except ConfigError as exc:
        log.error("settings not reloaded (nothing changed): %s", exc)
        return None
    try:
        # Built off the loop: generators may ask their servers for models (A1111 waits up to
        # seconds for a slow one) or read workflow files, the prompt screen may load a model.
        prepared = await asyncio.to_thread(app.prepare_reload, new)
    except ConfigError as exc:  # a generator that cannot be built from the new settings
        log.error("settings not reloaded (nothing changed): %s", exc)
        return None
    changed = app.apply(prepared)
    asyncio.ensure_future(app.close_retired(app.settings.generation.job_timeout_s))
    log.info("settings reloaded from %s: %s", source or "the environment", ", ".join(changed) or "nothing changed")
    return changed


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
    from ..http import make_http_app, start_http

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
    try:
        loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(reload_settings(app)))
    except (NotImplementedError, RuntimeError, AttributeError):
        pass
    client = make_client(app, settings.discord)
    http = make_http_app(app, discord_ready=lambda: client.is_ready() and not client.is_closed())
    try:
        runner = await start_http(http, settings.server.host, settings.server.port,
                                  access_log=settings.server.access_log)
    except OSError as exc:  # the address is in use, or the host does not resolve
        raise listen_error(settings, exc) from None
    bot = asyncio.create_task(client.start(token))
    waiter = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({bot, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if bot.done():
            bot.result()  # a login or connection failure: raise it
    finally:
        log.info("shutting down: letting running jobs finish")
        await client.delivery.shutdown(settings.discord.shutdown_grace_s)
        await client.close()
        waiter.cancel()
        if not bot.done():
            bot.cancel()
        await asyncio.gather(bot, return_exceptions=True)
        await runner.cleanup()
