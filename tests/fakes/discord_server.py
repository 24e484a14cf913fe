"""A fake Discord (REST API v10 + gateway) on 127.0.0.1 for end-to-end tests of a discord.py bot.

The bot under test runs unmodified; only discord.py's two base URLs are pointed here::

    async with FakeDiscord() as fake:
        with fake.patch_discord_py():          # Route.BASE and DiscordWebSocket.DEFAULT_GATEWAY
            await bot.login(fake.token)
            runner = asyncio.create_task(bot.connect())
            await bot.wait_until_ready()
            interaction = await fake.send_slash_command("imagine", {"prompt": "a cat"})
            callback = await fake.wait_for_ack(interaction)
            ...
            await bot.close()
            await runner

The fake holds a small world (one application and its bot user, guilds with roles, members, text
channels - one of them age-restricted - and messages with their attachment bytes), stores the
application commands the bot registers, and logs every HTTP request with its arrival time.

Build the world (``add_guild``/``add_channel``/``add_role``) before the bot connects: guilds,
channels and roles reach discord.py's cache only through GUILD_CREATE at identify time.

It enforces the Discord rules that a bot gets wrong most often, answering with Discord's own error
JSON: a 3-second window to acknowledge an interaction (10062), a single acknowledgement (40060),
webhook calls only after the acknowledgement (10015) and only while the token is valid (50027),
message and embed length limits (50035), no empty messages (50006), the attachment size limit
(40005), and gateway events filtered by the intents sent in IDENTIFY.
Routes it does not implement answer 404 ``{"message": "404: Not Found", "code": 0}`` and are
listed in ``unmatched_requests``.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import io
import itertools
import json
import mimetypes
import secrets
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import IntFlag
from typing import Any
from urllib.parse import quote

from aiohttp import WSMsgType, web

API_PREFIX = "/api/v10"
DISCORD_EPOCH_MS = 1_420_070_400_000
DEFAULT_ATTACHMENT_SIZE_LIMIT = 10 * 1024 * 1024  # an unboosted guild


class Intent(IntFlag):
    """The gateway intents whose events this fake dispatches."""

    GUILDS = 1 << 0
    GUILD_MEMBERS = 1 << 1
    GUILD_MESSAGES = 1 << 9
    GUILD_MESSAGE_REACTIONS = 1 << 10
    MESSAGE_CONTENT = 1 << 15


class Permission(IntFlag):
    ADMINISTRATOR = 1 << 3
    ADD_REACTIONS = 1 << 6
    VIEW_CHANNEL = 1 << 10
    SEND_MESSAGES = 1 << 11
    MANAGE_MESSAGES = 1 << 13
    EMBED_LINKS = 1 << 14
    ATTACH_FILES = 1 << 15
    READ_MESSAGE_HISTORY = 1 << 16
    USE_EXTERNAL_EMOJIS = 1 << 18
    USE_APPLICATION_COMMANDS = 1 << 31
    MODERATE_MEMBERS = 1 << 40


ALL_PERMISSIONS = (1 << 51) - 1
MEMBER_PERMISSIONS = (
    Permission.VIEW_CHANNEL
    | Permission.SEND_MESSAGES
    | Permission.EMBED_LINKS
    | Permission.ATTACH_FILES
    | Permission.READ_MESSAGE_HISTORY
    | Permission.ADD_REACTIONS
    | Permission.USE_EXTERNAL_EMOJIS
    | Permission.USE_APPLICATION_COMMANDS
)
BOT_PERMISSIONS = MEMBER_PERMISSIONS | Permission.MANAGE_MESSAGES

# Interaction types and interaction callback types, as numbered by Discord.
APPLICATION_COMMAND = 2
MESSAGE_COMPONENT = 3
MODAL_SUBMIT = 5
MESSAGE_COMMAND = 3  # an application command's type: a message context menu
CHANNEL_MESSAGE = 4
DEFERRED_CHANNEL_MESSAGE = 5
DEFERRED_UPDATE_MESSAGE = 6
UPDATE_MESSAGE = 7
MODAL = 9
_CALLBACKS_ALLOWED = {
    APPLICATION_COMMAND: {CHANNEL_MESSAGE, DEFERRED_CHANNEL_MESSAGE, MODAL},
    MESSAGE_COMPONENT: {
        CHANNEL_MESSAGE,
        DEFERRED_CHANNEL_MESSAGE,
        DEFERRED_UPDATE_MESSAGE,
        UPDATE_MESSAGE,
        MODAL,
    },
    # A modal's submit cannot open another modal.
    MODAL_SUBMIT: {CHANNEL_MESSAGE, DEFERRED_CHANNEL_MESSAGE, DEFERRED_UPDATE_MESSAGE, UPDATE_MESSAGE},
}

# Message flags.
SUPPRESS_EMBEDS = 1 << 2
EPHEMERAL = 1 << 6
LOADING = 1 << 7
SUPPRESS_NOTIFICATIONS = 1 << 12
IS_COMPONENTS_V2 = 1 << 15
_SETTABLE_FLAGS = SUPPRESS_EMBEDS | SUPPRESS_NOTIFICATIONS | IS_COMPONENTS_V2
_INTERACTION_FLAGS = _SETTABLE_FLAGS | EPHEMERAL  # only interaction responses may be ephemeral

# Message types.
DEFAULT_MESSAGE = 0
CHAT_INPUT_COMMAND_MESSAGE = 20
CONTEXT_MENU_COMMAND_MESSAGE = 23

# Application command option types.
SUB_COMMAND, SUB_COMMAND_GROUP = 1, 2
STRING, INTEGER, BOOLEAN, USER, CHANNEL, ROLE, NUMBER, ATTACHMENT = 3, 4, 5, 6, 7, 8, 10, 11

_CURRENT_USER_EXTRAS = {"verified": True, "mfa_enabled": False, "flags": 0, "locale": "en-US"}


def _now_iso() -> str:
    return datetime.now(UTC).isoformat()


# --------------------------------------------------------------------------------------------
# The world
# --------------------------------------------------------------------------------------------


@dataclass
class FakeUser:
    id: int
    username: str
    bot: bool = False

    def payload(self) -> dict[str, Any]:
        return {
            "id": str(self.id),
            "username": self.username,
            "discriminator": "0",
            "global_name": None if self.bot else self.username.title(),
            "avatar": None,
            "banner": None,
            "accent_color": None,
            "avatar_decoration_data": None,
            "public_flags": 0,
            "bot": self.bot,
            "system": False,
        }


@dataclass
class FakeRole:
    id: int
    name: str
    permissions: int
    position: int = 0

    def payload(self) -> dict[str, Any]:
        return {
            "id": str(self.id),
            "name": self.name,
            "permissions": str(self.permissions),
            "position": self.position,
            "color": 0,
            "colors": {"primary_color": 0, "secondary_color": None, "tertiary_color": None},
            "hoist": False,
            "managed": False,
            "mentionable": False,
            "icon": None,
            "unicode_emoji": None,
            "flags": 0,
        }


@dataclass
class FakeChannel:
    """A guild text channel (type 0); ``nsfw`` marks it age-restricted."""

    id: int
    guild_id: int
    name: str
    nsfw: bool = False
    position: int = 0

    def payload(self) -> dict[str, Any]:
        return {
            "id": str(self.id),
            "type": 0,
            "guild_id": str(self.guild_id),
            "name": self.name,
            "position": self.position,
            "nsfw": self.nsfw,
            "topic": None,
            "parent_id": None,
            "last_message_id": None,
            "rate_limit_per_user": 0,
            "permission_overwrites": [],
            "flags": 0,
        }


@dataclass
class FakeMember:
    user: FakeUser
    role_ids: list[int]
    joined_at: str = field(default_factory=_now_iso)


@dataclass
class FakeGuild:
    id: int
    name: str
    owner_id: int
    roles: dict[int, FakeRole] = field(default_factory=dict)
    channels: dict[int, FakeChannel] = field(default_factory=dict)
    members: dict[int, FakeMember] = field(default_factory=dict)

    def permissions_of(self, user_id: int) -> int:
        """Guild-level permissions (the fake has no channel overwrites)."""
        if user_id == self.owner_id:
            return ALL_PERMISSIONS
        permissions = self.roles[self.id].permissions  # @everyone shares the guild's id
        for role_id in self.members[user_id].role_ids:
            permissions |= self.roles[role_id].permissions
        return ALL_PERMISSIONS if permissions & Permission.ADMINISTRATOR else permissions

    def member_payload(
        self, user_id: int, *, with_user: bool = True, with_permissions: bool = False
    ) -> dict[str, Any]:
        member = self.members[user_id]
        payload: dict[str, Any] = {
            "roles": [str(role_id) for role_id in member.role_ids],
            "nick": None,
            "avatar": None,
            "banner": None,
            "joined_at": member.joined_at,
            "premium_since": None,
            "deaf": False,
            "mute": False,
            "flags": 0,
            "pending": False,
            "communication_disabled_until": None,
        }
        if with_user:
            payload["user"] = member.user.payload()
        if with_permissions:
            payload["permissions"] = str(self.permissions_of(user_id))
        return payload

    def payload(self) -> dict[str, Any]:
        """The guild object of GET /guilds/{id} (no channels or members)."""
        return {
            "id": str(self.id),
            "name": self.name,
            "icon": None,
            "splash": None,
            "discovery_splash": None,
            "banner": None,
            "description": None,
            "owner_id": str(self.owner_id),
            "roles": [role.payload() for role in self.roles.values()],
            "emojis": [],
            "stickers": [],
            "features": [],
            "verification_level": 0,
            "default_message_notifications": 0,
            "explicit_content_filter": 0,
            "mfa_level": 0,
            "nsfw_level": 0,
            "premium_tier": 0,
            "premium_subscription_count": 0,
            "preferred_locale": "en-US",
            "afk_timeout": 300,
            "afk_channel_id": None,
            "system_channel_id": None,
            "system_channel_flags": 0,
            "rules_channel_id": None,
            "public_updates_channel_id": None,
            "safety_alerts_channel_id": None,
            "vanity_url_code": None,
            "premium_progress_bar_enabled": False,
        }


@dataclass
class StoredAttachment:
    id: int
    filename: str
    content_type: str
    data: bytes
    url: str
    width: int | None = None
    height: int | None = None
    description: str | None = None
    ephemeral: bool = False

    def payload(self) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "id": str(self.id),
            "filename": self.filename,
            "size": len(self.data),
            "url": self.url,
            "proxy_url": self.url,
            "content_type": self.content_type,
        }
        if self.width is not None:
            payload["width"], payload["height"] = self.width, self.height
        if self.description is not None:
            payload["description"] = self.description
        if self.ephemeral:
            payload["ephemeral"] = True
        return payload


@dataclass
class StoredMessage:
    """A message as the fake holds it, including the bytes of its attachments."""

    id: int
    channel_id: int
    guild_id: int
    author: FakeUser
    content: str = ""
    embeds: list[dict[str, Any]] = field(default_factory=list)
    components: list[dict[str, Any]] = field(default_factory=list)
    attachments: list[StoredAttachment] = field(default_factory=list)
    flags: int = 0
    type: int = DEFAULT_MESSAGE
    reactions: dict[str, list[int]] = field(default_factory=dict)  # "👍" or "name:id" -> user ids
    interaction_id: int | None = None
    interaction_metadata: dict[str, Any] | None = None
    webhook_id: int | None = None
    timestamp: str = field(default_factory=_now_iso)
    edited_timestamp: str | None = None

    @property
    def ephemeral(self) -> bool:
        return bool(self.flags & EPHEMERAL)

    @property
    def loading(self) -> bool:
        """True while this is the "thinking..." placeholder of a deferred interaction."""
        return bool(self.flags & LOADING)


@dataclass(frozen=True)
class UploadedFile:
    field: str  # "files[0]", ...
    filename: str
    content_type: str
    data: bytes


@dataclass
class RequestRecord:
    """One HTTP request the fake received.

    ``json`` is the JSON body, or the payload_json part of a multipart body.
    """

    method: str
    path: str  # percent-decoded, without the query
    query: dict[str, str]
    received_at: float  # time.monotonic()
    authorized: bool  # carried "Authorization: Bot <the fake's token>"
    json: Any = None
    files: list[UploadedFile] = field(default_factory=list)
    status: int = 0
    response_json: Any = None
    matched: bool = True  # False: the fake has no such route


@dataclass
class FakeInteraction:
    """An interaction the fake sent, and what the bot did with it."""

    id: int
    token: str
    type: int
    payload: dict[str, Any]  # the INTERACTION_CREATE data as dispatched
    user: FakeUser
    channel_id: int
    sent_at: float  # time.monotonic() just before dispatch
    component_message_id: int | None = None
    callback: RequestRecord | None = None  # the accepted callback
    response_type: int | None = None
    original_message_id: int | None = None
    followup_message_ids: list[int] = field(default_factory=list)
    modal: dict[str, Any] | None = None  # the modal's data, after a type 9 callback
    expired: bool = False
    # The callbacks and webhook calls that used this interaction's token, in arrival order.
    requests: list[RequestRecord] = field(default_factory=list)

    @property
    def ack_latency(self) -> float | None:
        """Seconds from dispatch to the accepted callback's arrival."""
        return None if self.callback is None else self.callback.received_at - self.sent_at


class _ApiError(Exception):
    def __init__(
        self, status: int, code: int, message: str, errors: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.errors = status, code, message, errors

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"message": self.message, "code": self.code}
        if self.errors:
            body["errors"] = self.errors
        return body


def _field_error(code: str, message: str) -> dict[str, Any]:
    return {"_errors": [{"code": code, "message": message}]}


_NOT_A_DICT = _field_error("DICT_TYPE_CONVERT", "Only dictionaries may be used in a DictType")


def _invalid_form_body(errors: dict[str, Any]) -> _ApiError:
    return _ApiError(400, 50035, "Invalid Form Body", errors)


def _json_response(body: Any, status: int = 200) -> web.Response:
    # discord.py parses a body as JSON only if Content-Type is exactly "application/json".
    return web.Response(status=status, body=json.dumps(body).encode(), content_type="application/json")


def _no_content() -> web.Response:
    return web.Response(status=204)


def _image_size(data: bytes) -> tuple[int, int] | None:
    from PIL import Image, UnidentifiedImageError  # only when an upload arrives

    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size
    except (UnidentifiedImageError, OSError):
        return None


def _embed_errors(embed: Any) -> tuple[dict[str, Any], int]:
    """Discord's per-embed limits; returns (errors, character count towards the 6000 total)."""
    if not isinstance(embed, dict):
        return _NOT_A_DICT, 0
    errors: dict[str, Any] = {}
    total = 0

    def check(container: dict[str, Any], key: str, limit: int, target: dict[str, Any]) -> None:
        nonlocal total
        value = container.get(key)
        if value is None:
            return
        total += len(str(value))
        if len(str(value)) > limit:
            target[key] = _field_error("BASE_TYPE_MAX_LENGTH", f"Must be {limit} or fewer in length.")

    check(embed, "title", 256, errors)
    check(embed, "description", 4096, errors)
    for key, inner_key, limit in (("footer", "text", 2048), ("author", "name", 256)):
        if isinstance(embed.get(key), dict):
            inner: dict[str, Any] = {}
            check(embed[key], inner_key, limit, inner)
            if inner:
                errors[key] = inner
    fields = embed.get("fields") or []
    if len(fields) > 25:
        errors["fields"] = _field_error("BASE_TYPE_MAX_LENGTH", "Must be 25 or fewer in length.")
    for index, embed_field in enumerate(fields):
        field_errors: dict[str, Any] = {}
        for key, limit in (("name", 256), ("value", 1024)):
            if not embed_field.get(key):
                field_errors[key] = _field_error("BASE_TYPE_REQUIRED", "This field is required")
            check(embed_field, key, limit, field_errors)
        if field_errors:
            errors.setdefault("fields", {})[str(index)] = field_errors
    return errors, total


def _validate_message_payload(payload: Any) -> None:
    if not isinstance(payload, dict):
        raise _invalid_form_body(_NOT_A_DICT)
    errors: dict[str, Any] = {}
    content = payload.get("content")
    if content is not None and len(str(content)) > 2000:
        errors["content"] = _field_error("BASE_TYPE_MAX_LENGTH", "Must be 2000 or fewer in length.")
    embeds = payload.get("embeds") or []
    if len(embeds) > 10:
        errors["embeds"] = _field_error("BASE_TYPE_MAX_LENGTH", "Must be 10 or fewer in length.")
    total = 0
    for index, embed in enumerate(embeds):
        embed_errors, length = _embed_errors(embed)
        total += length
        if embed_errors:
            errors.setdefault("embeds", {})[str(index)] = embed_errors
    if total > 6000:
        errors.setdefault("embeds", {}).update(
            _field_error("MAX_EMBED_SIZE_EXCEEDED", "Embed size exceeds maximum size of 6000")
        )
    if errors:
        raise _invalid_form_body(errors)


def _find_component(components: list[dict[str, Any]], custom_id: str) -> dict[str, Any] | None:
    for component in components:
        if component.get("custom_id") == custom_id:
            return component
        nested = list(component.get("components") or [])
        if isinstance(component.get("accessory"), dict):
            nested.append(component["accessory"])
        found = _find_component(nested, custom_id)
        if found is not None:
            return found
    return None


def _custom_ids(components: list[dict[str, Any]]) -> list[str]:
    ids = []
    for component in components:
        if "custom_id" in component:
            ids.append(component["custom_id"])
        ids.extend(_custom_ids(component.get("components") or []))
    return ids


def _as_id(raw: str) -> int | None:
    """A snowflake from a URL segment; None for anything else."""
    return int(raw) if raw.isdigit() else None


def _emoji_payload(emoji: str) -> dict[str, Any]:
    """"name:id" / "a:name:id" (custom, as discord.py puts it in the URL) or a unicode emoji."""
    parts = emoji.split(":")
    if len(parts) >= 2 and parts[-1].isdigit():
        return {"id": parts[-1], "name": parts[-2], "animated": parts[0] == "a" and len(parts) == 3}
    return {"id": None, "name": emoji}


# The Python values send_slash_command takes for each option type.
_OPTION_PYTHON_TYPES: dict[int, type | tuple[type, ...]] = {
    STRING: str,
    INTEGER: int,
    NUMBER: (int, float),
    BOOLEAN: bool,
    USER: FakeUser,
    CHANNEL: FakeChannel,
    ROLE: FakeRole,
    ATTACHMENT: dict,
}
_RECORD = web.RequestKey("record", RequestRecord)
_RequestPredicate = Callable[[RequestRecord], bool]


@dataclass
class _OptionContext:
    """What a slash command's option values resolve against, and the "resolved" map being built."""

    guild: FakeGuild
    invoker: FakeUser
    resolved: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class _GatewaySession:
    ws: web.WebSocketResponse
    session_id: str
    intents: int
    seq: int = 0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class FakeDiscord:
    """A fake Discord for one discord.py bot (no sharding), serving REST and the gateway on 127.0.0.1.

    Default world, ready to use: ``guild`` with ``channel`` (#general) and ``nsfw_channel``
    (#nsfw-art, age-restricted), members ``bot_user``, ``owner`` (guild and application owner),
    ``user`` (alice, a plain member) and ``moderator`` (role "Moderator": manage messages,
    moderate members).
    """

    def __init__(
        self,
        *,
        token: str = "fake-bot-token",
        ack_deadline: float = 3.0,
        heartbeat_interval_ms: int = 41_250,
        attachment_size_limit: int = DEFAULT_ATTACHMENT_SIZE_LIMIT,
    ) -> None:
        self.token = token
        self.ack_deadline = ack_deadline
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.attachment_size_limit = attachment_size_limit
        self.port: int | None = None
        self.identify_payload: dict[str, Any] | None = None  # the last IDENTIFY, token removed
        self.gateway_close_codes: list[int] = []
        # Sharding: what GET /gateway/bot recommends, and a sharded bot's sessions by shard id.
        self.recommended_shards = 1
        self.max_concurrency = 1
        self.shard_sessions: dict[int, _GatewaySession] = {}
        self.identified_shards: list[list[int]] = []  # the [shard_id, shard_count] of each sharded IDENTIFY
        self._shard_count = 1

        self._counter = itertools.count()
        self.users: dict[int, FakeUser] = {}
        self.guilds: dict[int, FakeGuild] = {}
        self._messages: dict[int, StoredMessage] = {}
        self._attachments: dict[int, StoredAttachment] = {}
        self._commands: dict[int | None, list[dict[str, Any]]] = {}  # None: global commands
        self._command_ids: dict[tuple[int | None, str, int], int] = {}
        self._interactions: dict[int, FakeInteraction] = {}
        self._interactions_by_token: dict[str, FakeInteraction] = {}
        self._requests: list[RequestRecord] = []
        self._request_waiters: list[tuple[_RequestPredicate, asyncio.Future[RequestRecord]]] = []
        self._session: _GatewaySession | None = None
        self._ready = asyncio.Event()
        self._gateway_closed = asyncio.Event()
        self._runner: web.AppRunner | None = None

        self.bot_user = self.add_user("easel-test-bot", bot=True)
        self.application_id = self.bot_user.id  # applications made since 2019 share the bot user's id
        self.owner = self.add_user("owner")
        self.guild = self.add_guild("Easel Test Guild")
        self.channel = self.add_channel(self.guild, "general")
        self.nsfw_channel = self.add_channel(self.guild, "nsfw-art", nsfw=True)
        self.user = self.add_user("alice")
        self.add_member(self.guild, self.user)
        moderators = self.add_role(
            self.guild, "Moderator", Permission.MANAGE_MESSAGES | Permission.MODERATE_MEMBERS
        )
        self.moderator = self.add_user("mod")
        self.add_member(self.guild, self.moderator, roles=[moderators])

    # ---------------------------------------------------------------- lifecycle

    async def __aenter__(self) -> FakeDiscord:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Bind 127.0.0.1 on a free port and serve; returns once listening."""
        # Room for a message's files at Discord's size limit; the limit itself is checked per file.
        app = web.Application(
            client_max_size=4 * self.attachment_size_limit + (1 << 20), middlewares=[self._middleware]
        )
        routes = app.router
        routes.add_get("/gateway", self._gateway)
        routes.add_get("/attachments/{attachment_id}/{filename}", self._serve_attachment)
        api = API_PREFIX
        routes.add_get(f"{api}/users/@me", self._get_current_user)
        routes.add_get(f"{api}/gateway/bot", self._get_bot_gateway)
        routes.add_get(f"{api}/oauth2/applications/@me", self._get_application)
        global_commands = f"{api}/applications/{{application_id}}/commands"
        guild_commands = f"{api}/applications/{{application_id}}/guilds/{{guild_id}}/commands"
        for commands_path in (global_commands, guild_commands):
            routes.add_get(commands_path, self._get_commands)
            routes.add_put(commands_path, self._put_commands)
        routes.add_post(
            f"{api}/interactions/{{interaction_id}}/{{token}}/callback", self._interaction_callback
        )
        routes.add_post(f"{api}/webhooks/{{application_id}}/{{token}}", self._execute_followup)
        webhook_message = f"{api}/webhooks/{{application_id}}/{{token}}/messages/{{message_id}}"
        routes.add_get(webhook_message, self._get_webhook_message)
        routes.add_patch(webhook_message, self._edit_webhook_message)
        routes.add_delete(webhook_message, self._delete_webhook_message)
        routes.add_get(f"{api}/channels/{{channel_id}}", self._get_channel)
        routes.add_get(f"{api}/channels/{{channel_id}}/messages", self._list_messages)
        routes.add_post(f"{api}/channels/{{channel_id}}/messages", self._create_channel_message)
        channel_message = f"{api}/channels/{{channel_id}}/messages/{{message_id}}"
        routes.add_get(channel_message, self._get_channel_message)
        routes.add_patch(channel_message, self._edit_channel_message)
        routes.add_delete(channel_message, self._delete_channel_message)
        routes.add_put(f"{channel_message}/reactions/{{emoji}}/@me", self._add_own_reaction)
        routes.add_delete(f"{channel_message}/reactions/{{emoji}}/@me", self._remove_own_reaction)
        routes.add_get(f"{api}/guilds/{{guild_id}}", self._get_guild)
        routes.add_get(f"{api}/guilds/{{guild_id}}/members/{{user_id}}", self._get_member)
        routes.add_route("*", "/{tail:.*}", self._unknown_route)

        self._runner = web.AppRunner(app, shutdown_timeout=1.0, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        """Close the gateway connection (code 1001) and stop serving. Close the bot first."""
        if self._session is not None:
            await self._session.ws.close(code=1001, message=b"fake Discord shutting down")
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def base_url(self) -> str:
        if self.port is None:
            raise RuntimeError("FakeDiscord is not started")
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_base(self) -> str:
        """The value for discord.http.Route.BASE."""
        return self.base_url + API_PREFIX

    @property
    def gateway_url(self) -> str:
        """The value for DiscordWebSocket.DEFAULT_GATEWAY; discord.py appends ?v=10&encoding=json&..."""
        return f"ws://127.0.0.1:{self.port}/gateway"

    @contextlib.contextmanager
    def patch_discord_py(self) -> Iterator[None]:
        """Point this process's discord.py at the fake; restores the real URLs on exit."""
        import yarl
        from discord.gateway import DiscordWebSocket
        from discord.http import Route

        saved = Route.BASE, DiscordWebSocket.DEFAULT_GATEWAY
        Route.BASE = self.api_base
        # Must stay a yarl.URL: discord.py calls .with_query() on it.
        DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(self.gateway_url)
        try:
            yield
        finally:
            Route.BASE, DiscordWebSocket.DEFAULT_GATEWAY = saved

    # ---------------------------------------------------------------- building the world

    def _snowflake(self) -> int:
        millis = int(time.time() * 1000) - DISCORD_EPOCH_MS
        return (millis << 22) | (next(self._counter) & 0x3FFFFF)

    def _refuse_after_identify(self, what: str) -> None:
        if self._session is not None:
            raise RuntimeError(
                f"{what} after the bot connected: discord.py learns guilds, channels and roles"
                " only from GUILD_CREATE"
            )

    def add_user(self, username: str, *, bot: bool = False) -> FakeUser:
        user = FakeUser(self._snowflake(), username, bot=bot)
        self.users[user.id] = user
        return user

    def add_guild(self, name: str) -> FakeGuild:
        """A guild owned by ``owner``, with @everyone and the bot's role; bot and owner are members."""
        self._refuse_after_identify("add_guild")
        guild = FakeGuild(self._snowflake(), name, owner_id=self.owner.id)
        guild.roles[guild.id] = FakeRole(guild.id, "@everyone", MEMBER_PERMISSIONS)
        bot_role = FakeRole(self._snowflake(), self.bot_user.username, BOT_PERMISSIONS, position=1)
        guild.roles[bot_role.id] = bot_role
        guild.members[self.bot_user.id] = FakeMember(self.bot_user, [bot_role.id])
        guild.members[self.owner.id] = FakeMember(self.owner, [])
        self.guilds[guild.id] = guild
        return guild

    def add_channel(self, guild: FakeGuild, name: str, *, nsfw: bool = False) -> FakeChannel:
        self._refuse_after_identify("add_channel")
        channel = FakeChannel(self._snowflake(), guild.id, name, nsfw=nsfw, position=len(guild.channels))
        guild.channels[channel.id] = channel
        return channel

    def add_role(self, guild: FakeGuild, name: str, permissions: int = 0) -> FakeRole:
        self._refuse_after_identify("add_role")
        role = FakeRole(self._snowflake(), name, int(permissions), position=len(guild.roles))
        guild.roles[role.id] = role
        return role

    def add_member(
        self, guild: FakeGuild, user: FakeUser, *, roles: Sequence[FakeRole] = ()
    ) -> FakeMember:
        member = FakeMember(user, [role.id for role in roles])
        guild.members[user.id] = member
        return member

    def add_attachment(
        self, filename: str, data: bytes, content_type: str | None = None
    ) -> dict[str, Any]:
        """A user's upload for an attachment option, served by the fake.

        Returns Discord's attachment object, to pass as the option's value.
        """
        attachment = self._new_attachment(filename, data, content_type, ephemeral=True)
        self._attachments[attachment.id] = attachment
        return attachment.payload()

    async def add_message(
        self,
        channel: FakeChannel,
        *,
        author: FakeUser,
        content: str = "",
        embeds: list[dict[str, Any]] | None = None,
        components: list[dict[str, Any]] | None = None,
        files: list[tuple[str, bytes, str | None]] | None = None,
    ) -> StoredMessage:
        """Seed a message, e.g. one the bot posted before a restart, or a member's post with
        ``files`` ((filename, bytes, content type) each, served like any attachment).

        Dispatches MESSAGE_CREATE if a bot is connected (and subscribed to guild messages).
        """
        attachments = [self._new_attachment(name, data, kind) for name, data, kind in files or []]
        for attachment in attachments:
            self._attachments[attachment.id] = attachment
        message = StoredMessage(
            self._snowflake(),
            channel.id,
            channel.guild_id,
            author,
            content=content,
            embeds=list(embeds or []),
            components=list(components or []),
            attachments=attachments,
        )
        self._messages[message.id] = message
        await self._dispatch_message_event("MESSAGE_CREATE", message)
        return message

    # ---------------------------------------------------------------- inspecting

    @property
    def requests(self) -> list[RequestRecord]:
        """Every HTTP request received (not the gateway), in arrival order."""
        return list(self._requests)

    @property
    def unmatched_requests(self) -> list[RequestRecord]:
        """Requests to routes the fake does not implement (answered 404)."""
        return [record for record in self._requests if not record.matched]

    def commands(self, guild: FakeGuild | None = None) -> list[dict[str, Any]]:
        """The application commands registered globally, or for ``guild``, as Discord stores them."""
        return copy.deepcopy(self._commands.get(guild.id if guild else None, []))

    def messages(self, channel: FakeChannel | int) -> list[StoredMessage]:
        """The channel's messages, oldest first, ephemeral ones included."""
        channel_id = channel.id if isinstance(channel, FakeChannel) else channel
        in_channel = (m for m in self._messages.values() if m.channel_id == channel_id)
        return sorted(in_channel, key=lambda m: m.id)

    def message(self, message_id: int) -> StoredMessage:
        try:
            return self._messages[message_id]
        except KeyError:
            raise LookupError(f"no message {message_id} (deleted, or never created)") from None

    def interaction(self, interaction_id: int) -> FakeInteraction:
        return self._interactions[interaction_id]

    def expire_interaction(self, interaction: FakeInteraction) -> None:
        """Invalidate the token, as after 15 minutes: callbacks get 404 (10062), webhooks 401 (50027)."""
        interaction.expired = True

    async def wait_for_request(
        self, predicate: _RequestPredicate, timeout: float = 5.0
    ) -> RequestRecord:
        """The first logged request matching ``predicate``, waiting for one if none yet.

        Requests logged before the call count too, so a fast bot cannot slip past.
        """
        for record in self._requests:
            if predicate(record):
                return record
        future: asyncio.Future[RequestRecord] = asyncio.get_running_loop().create_future()
        waiter = (predicate, future)
        self._request_waiters.append(waiter)
        try:
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            seen = ", ".join(f"{r.method} {r.path} -> {r.status}" for r in self._requests[-8:]) or "none"
            raise TimeoutError(f"no matching request within {timeout}s; last requests: {seen}") from None
        finally:
            self._request_waiters.remove(waiter)

    async def wait_for_ack(self, interaction: FakeInteraction, timeout: float = 5.0) -> RequestRecord:
        """The first callback request for ``interaction``; check its ``status`` (late ones fail)."""
        prefix = f"{API_PREFIX}/interactions/{interaction.id}/"
        return await self.wait_for_request(lambda r: r.path.startswith(prefix), timeout)

    async def wait_ready(self, timeout: float = 5.0) -> None:
        """Until READY and every GUILD_CREATE went out.

        discord.py fires on_ready ``guild_ready_timeout`` (default 2 s) after the last GUILD_CREATE.
        """
        await asyncio.wait_for(self._ready.wait(), timeout)

    async def wait_gateway_closed(self, timeout: float = 5.0) -> int:
        """Until the bot's gateway connection ends; returns its close code (1000 for a clean close)."""
        await asyncio.wait_for(self._gateway_closed.wait(), timeout)
        return self.gateway_close_codes[-1]

    # ---------------------------------------------------------------- driving the bot

    async def send_slash_command(
        self,
        name: str,
        options: Mapping[str, Any] | None = None,
        *,
        user: FakeUser | None = None,
        channel: FakeChannel | None = None,
        locale: str = "en-US",
    ) -> FakeInteraction:
        """Dispatch INTERACTION_CREATE for a registered chat-input command.

        ``name`` is "command" or "command sub" / "command group sub". Option values by type:
        str, int, float, bool; FakeUser, FakeChannel, FakeRole; the dict from ``add_attachment``.
        Raises LookupError for an unregistered command, ValueError for options Discord would refuse.
        """
        self._require_session()
        channel = channel or self.channel
        guild = self.guilds[channel.guild_id]
        user = user or self.user
        words = name.split()
        command = self._registered_command(words[0], guild.id)
        context = _OptionContext(guild, user)
        data: dict[str, Any] = {
            "id": command["id"],
            "name": command["name"],
            "type": 1,
            "options": self._command_options(command, words[1:], dict(options or {}), context),
        }
        if "guild_id" in command:
            data["guild_id"] = command["guild_id"]
        if context.resolved:
            data["resolved"] = context.resolved
        return await self._send_interaction(APPLICATION_COMMAND, data, user, channel, locale=locale)

    async def send_component_interaction(
        self,
        message_id: int,
        custom_id: str,
        *,
        user: FakeUser | None = None,
        values: list[str] | None = None,
        locale: str = "en-US",
    ) -> FakeInteraction:
        """A click on a button (or a choice in a select: pass ``values``) of a stored message."""
        self._require_session()
        message = self.message(message_id)
        component = _find_component(message.components, custom_id)
        if component is None:
            present = _custom_ids(message.components)
            raise LookupError(f"message {message_id} has no component {custom_id!r}; it has {present}")
        if component.get("disabled"):
            raise ValueError(f"component {custom_id!r} is disabled: Discord would not let a user use it")
        data: dict[str, Any] = {"custom_id": custom_id, "component_type": component["type"]}
        if component["type"] == 2:
            if values is not None:
                raise ValueError("a button has no values")
        else:
            data["values"] = list(values or [])
        channel = self.guilds[message.guild_id].channels[message.channel_id]
        return await self._send_interaction(
            MESSAGE_COMPONENT, data, user or self.user, channel, locale=locale, message=message
        )

    async def send_message_command(
        self, name: str, message_id: int, *, user: FakeUser | None = None, locale: str = "en-US"
    ) -> FakeInteraction:
        """A message context menu (right-click > Apps > ``name``) used on a stored message: an
        application command of type 3 with ``target_id`` and the message in ``resolved``."""
        self._require_session()
        message = self.message(message_id)
        channel = self.guilds[message.guild_id].channels[message.channel_id]
        command = self._registered_command(name, channel.guild_id, kind=MESSAGE_COMMAND)
        data: dict[str, Any] = {
            "id": command["id"],
            "name": command["name"],
            "type": MESSAGE_COMMAND,
            "target_id": str(message.id),
            "resolved": {"messages": {str(message.id): self._message_payload(message)}},
        }
        if "guild_id" in command:
            data["guild_id"] = command["guild_id"]
        return await self._send_interaction(APPLICATION_COMMAND, data, user or self.user, channel, locale=locale)

    async def send_modal_submit(
        self, opened_by: FakeInteraction, values: Mapping[str, str], *, locale: str = "en-US"
    ) -> FakeInteraction:
        """The member submits the modal that ``opened_by`` answered with (a type 9 callback):
        ``values`` by text input custom_id; inputs not given keep their prefilled value."""
        self._require_session()
        modal = opened_by.modal
        if modal is None:
            raise LookupError(f"interaction {opened_by.id} did not open a modal")
        rows = []
        for row in modal["components"]:
            inputs = row.get("components") or ([row["component"]] if "component" in row else [])
            for item in inputs:
                if item.get("type") != 4:
                    continue
                value = values.get(item["custom_id"], item.get("value", ""))
                if item.get("required", True) and not value:
                    raise ValueError(f"the text input {item['custom_id']!r} is required")
                if not item.get("min_length", 0) <= len(value) <= item.get("max_length", 4000):
                    raise ValueError(f"the text input {item['custom_id']!r} is out of its length limits")
                rows.append({"type": 1, "components": [{"type": 4, "custom_id": item["custom_id"], "value": value}]})
        if unknown := sorted(set(values) - {r["components"][0]["custom_id"] for r in rows}):
            raise ValueError(f"the modal has no text inputs {unknown}")
        data = {"custom_id": modal["custom_id"], "components": rows}
        channel = self._channel(opened_by.channel_id)
        message = self.message(opened_by.component_message_id) if opened_by.component_message_id else None
        return await self._send_interaction(
            MODAL_SUBMIT, data, opened_by.user, channel, locale=locale, message=message
        )

    async def add_reaction(self, message_id: int, emoji: str, *, user: FakeUser | None = None) -> None:
        """``user`` (default alice) reacts: MESSAGE_REACTION_ADD, with the member as Discord sends it."""
        self._require_session()
        message = self.message(message_id)
        user = user or self.user
        if user.id not in self.guilds[message.guild_id].members:
            raise ValueError(f"{user.username} is not a member of the message's guild")
        reacted = message.reactions.setdefault(emoji, [])
        if user.id not in reacted:  # Discord ignores a repeated reaction
            reacted.append(user.id)
            await self._dispatch_reaction_add(message, user, emoji)

    def _registered_command(self, name: str, guild_id: int, *, kind: int = 1) -> dict[str, Any]:
        for scope in (guild_id, None):
            for command in self._commands.get(scope, []):
                if command["name"] == name and command["type"] == kind:
                    return command
        scopes = (guild_id, None)
        registered = sorted(c["name"] for scope in scopes for c in self._commands.get(scope, []))
        raise LookupError(f"/{name} is not registered (tree.sync() not run?); registered: {registered}")

    def _command_options(
        self,
        schema: dict[str, Any],
        path: list[str],
        values: dict[str, Any],
        context: _OptionContext,
    ) -> list[dict[str, Any]]:
        options = schema.get("options") or []
        if path:
            subs = (o for o in options if o["type"] in (SUB_COMMAND, SUB_COMMAND_GROUP))
            sub = next((o for o in subs if o["name"] == path[0]), None)
            if sub is None:
                raise LookupError(f"{schema['name']!r} has no subcommand {path[0]!r}")
            return [
                {
                    "name": sub["name"],
                    "type": sub["type"],
                    "options": self._command_options(sub, path[1:], values, context),
                }
            ]
        if any(o["type"] in (SUB_COMMAND, SUB_COMMAND_GROUP) for o in options):
            raise ValueError(f"{schema['name']!r} needs a subcommand: {[o['name'] for o in options]}")
        by_name = {o["name"]: o for o in options}
        if unknown := sorted(set(values) - set(by_name)):
            raise ValueError(f"{schema['name']!r} has no options {unknown}; it has {sorted(by_name)}")
        if missing := sorted(n for n, o in by_name.items() if o.get("required") and n not in values):
            raise ValueError(f"{schema['name']!r} requires options {missing}")
        return [
            {
                "name": name,
                "type": by_name[name]["type"],
                "value": self._option_value(by_name[name], value, context),
            }
            for name, value in values.items()
        ]

    def _option_value(
        self, option: dict[str, Any], value: Any, context: _OptionContext
    ) -> Any:
        """The option's wire value; users, channels, roles and attachments also go into "resolved"."""
        guild, resolved = context.guild, context.resolved
        kind, name = option["type"], option["name"]
        if kind not in _OPTION_PYTHON_TYPES:
            raise ValueError(f"option {name!r} has type {kind}, which the fake does not send")
        is_flag_as_number = isinstance(value, bool) and kind in (INTEGER, NUMBER)
        if not isinstance(value, _OPTION_PYTHON_TYPES[kind]) or is_flag_as_number:
            raise ValueError(f"option {name!r} (type {kind}) cannot take {value!r}")
        choices = [choice["value"] for choice in option.get("choices") or []]
        if choices and value not in choices:
            raise ValueError(f"option {name!r} must be one of {choices}")
        if kind in (INTEGER, NUMBER):
            low, high = option.get("min_value", value), option.get("max_value", value)
            if not low <= value <= high:
                raise ValueError(f"option {name!r} must be between {low} and {high}")
        if kind == STRING:
            shortest, longest = option.get("min_length", 0), option.get("max_length", 6000)
            if not shortest <= len(value) <= longest:
                raise ValueError(f"option {name!r} must be {shortest} to {longest} characters")
        if kind == USER:
            resolved.setdefault("users", {})[str(value.id)] = value.payload()
            if value.id in guild.members:
                member = guild.member_payload(value.id, with_user=False, with_permissions=True)
                resolved.setdefault("members", {})[str(value.id)] = member
            return str(value.id)
        if kind == CHANNEL:
            # The invoker's permissions in that channel; the fake has no channel overwrites.
            channel = {**value.payload(), "permissions": str(guild.permissions_of(context.invoker.id))}
            resolved.setdefault("channels", {})[str(value.id)] = channel
            return str(value.id)
        if kind == ROLE:
            resolved.setdefault("roles", {})[str(value.id)] = value.payload()
            return str(value.id)
        if kind == ATTACHMENT:
            resolved.setdefault("attachments", {})[value["id"]] = value
            return value["id"]
        return value

    async def _send_interaction(
        self,
        interaction_type: int,
        data: dict[str, Any],
        user: FakeUser,
        channel: FakeChannel,
        *,
        locale: str,
        message: StoredMessage | None = None,
    ) -> FakeInteraction:
        guild = self.guilds[channel.guild_id]
        if user.id not in guild.members:
            raise ValueError(f"{user.username} is not a member of {guild.name}")
        interaction_id = self._snowflake()
        token = "aW50ZXJhY3Rpb246" + secrets.token_urlsafe(96)
        permissions = str(guild.permissions_of(user.id))
        payload: dict[str, Any] = {
            "id": str(interaction_id),
            "application_id": str(self.application_id),
            "type": interaction_type,
            "data": data,
            "guild_id": str(guild.id),
            "guild": {"id": str(guild.id), "locale": "en-US", "features": []},
            "channel_id": str(channel.id),
            "channel": {**channel.payload(), "permissions": permissions},
            "member": {**guild.member_payload(user.id), "permissions": permissions},
            "token": token,
            "version": 1,
            "app_permissions": str(guild.permissions_of(self.bot_user.id)),
            "locale": locale,
            "guild_locale": "en-US",
            "entitlements": [],
            "authorizing_integration_owners": {"0": str(guild.id)},
            "context": 0,
            "attachment_size_limit": self.attachment_size_limit,
        }
        if message is not None:
            payload["message"] = self._message_payload(message)
        interaction = FakeInteraction(
            interaction_id,
            token,
            interaction_type,
            payload,
            user,
            channel.id,
            sent_at=time.monotonic(),
            component_message_id=message.id if message else None,
        )
        self._interactions[interaction_id] = interaction
        self._interactions_by_token[token] = interaction
        await self._dispatch("INTERACTION_CREATE", payload, intent=None)
        return interaction

    # ---------------------------------------------------------------- gateway

    def _require_session(self) -> _GatewaySession:
        if self._session is None:
            raise RuntimeError("no bot is connected to the fake gateway (await fake.wait_ready() first)")
        return self._session

    async def _gateway(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        if request.query.get("encoding", "json") != "json" or request.query.get("v") != "10":
            await ws.close(code=4012, message=b"Invalid API version or encoding.")
            return ws
        hello = {"op": 10, "d": {"heartbeat_interval": self.heartbeat_interval_ms}, "s": None, "t": None}
        await ws.send_str(json.dumps(hello))
        try:
            async for frame in ws:
                if frame.type is not WSMsgType.TEXT:
                    await ws.close(code=4002, message=b"Error while decoding payload.")
                    break
                message = json.loads(frame.data)
                op = message.get("op")
                if op == 1:  # heartbeat
                    await ws.send_str(json.dumps({"op": 11, "d": None, "s": None, "t": None}))
                elif op == 2:
                    await self._identify(ws, message.get("d") or {})
                elif op == 6:  # RESUME: sessions do not survive here, so tell the bot to identify anew
                    await ws.send_str(json.dumps({"op": 9, "d": False, "s": None, "t": None}))
                elif op in (3, 4, 8):  # presence, voice state, member requests: nothing to do
                    continue
                else:
                    await ws.close(code=4001, message=b"Unknown opcode.")
        finally:
            if self._session is not None and self._session.ws is ws:
                self._session = None
                self._ready.clear()
            for shard_id, shard_session in list(self.shard_sessions.items()):
                if shard_session.ws is ws:
                    del self.shard_sessions[shard_id]
            self.gateway_close_codes.append(ws.close_code or 1006)
            self._gateway_closed.set()
        return ws

    async def _identify(self, ws: web.WebSocketResponse, data: dict[str, Any]) -> None:
        if self._session is not None and self._session.ws is ws:
            await ws.close(code=4005, message=b"Already authenticated.")
            return
        if data.get("token") != self.token:
            await ws.close(code=4004, message=b"Authentication failed.")
            return
        if not isinstance(data.get("intents"), int):
            await ws.close(code=4013, message=b"Invalid intent(s).")
            return
        shard = data.get("shard")
        if shard is not None and not (isinstance(shard, list) and len(shard) == 2 and 0 <= shard[0] < shard[1]):
            await ws.close(code=4010, message=b"Invalid shard.")
            return
        self.identify_payload = {key: value for key, value in data.items() if key != "token"}
        self._gateway_closed.clear()
        session = _GatewaySession(ws, uuid.uuid4().hex, data["intents"])
        self._session = session
        guilds = list(self.guilds.values())
        if shard is not None:  # only the guilds of this shard
            self.identified_shards.append(list(shard))
            self.shard_sessions[shard[0]] = session
            self._shard_count = shard[1]
            guilds = [g for g in guilds if self.shard_of(g.id, shard[1]) == shard[0]]
        await self._dispatch(
            "READY",
            {
                "v": 10,
                "user": {**self.bot_user.payload(), "verified": True, "mfa_enabled": False, "flags": 0},
                "guilds": [{"id": str(guild.id), "unavailable": True} for guild in guilds],
                "session_id": session.session_id,
                "session_type": "normal",
                "resume_gateway_url": self.gateway_url,
                "application": {"id": str(self.application_id), "flags": 0},
                "private_channels": [],
                "relationships": [],
                "presences": [],
                "guild_join_requests": [],
                "geo_ordered_rtc_regions": ["us-east"],
                "auth": {},
                "user_settings": {},
                "_trace": ["fake-discord"],
                **({"shard": shard} if shard is not None else {}),
            },
            intent=None,
        )
        for guild in guilds:
            members = guild.members if session.intents & Intent.GUILD_MEMBERS else [self.bot_user.id]
            await self._dispatch(
                "GUILD_CREATE",
                {
                    **guild.payload(),
                    "joined_at": guild.members[self.bot_user.id].joined_at,
                    "large": False,
                    "unavailable": False,
                    "lazy": True,
                    "member_count": len(guild.members),
                    "channels": [channel.payload() for channel in guild.channels.values()],
                    "members": [guild.member_payload(user_id) for user_id in members],
                    "threads": [],
                    "voice_states": [],
                    "presences": [],
                    "stage_instances": [],
                    "guild_scheduled_events": [],
                    "soundboard_sounds": [],
                },
                intent=Intent.GUILDS,
            )
        self._ready.set()

    async def _dispatch(self, event: str, data: dict[str, Any], *, intent: Intent | None) -> bool:
        """Send a dispatch (op 0) if a bot is connected and subscribed to ``intent``; True if sent."""
        session = self._session
        if self.shard_sessions and data.get("guild_id") is not None:  # to the guild's shard
            session = self.shard_sessions.get(self.shard_of(int(data["guild_id"]), self._shard_count), session)
        if session is None or session.ws.closed or (intent is not None and not session.intents & intent):
            return False
        async with session.lock:  # sequence numbers go out in order
            session.seq += 1
            await session.ws.send_str(json.dumps({"op": 0, "t": event, "s": session.seq, "d": data}))
        return True

    async def _dispatch_message_event(self, event: str, message: StoredMessage) -> None:
        if message.ephemeral:  # ephemeral messages never reach the gateway
            return
        payload = {**self._message_payload(message), "guild_id": str(message.guild_id)}
        guild = self.guilds[message.guild_id]
        if message.author.id in guild.members:
            payload["member"] = guild.member_payload(message.author.id, with_user=False)
        session = self._session
        content_hidden = session is not None and not session.intents & Intent.MESSAGE_CONTENT
        if content_hidden and message.author.id != self.bot_user.id:
            payload.update(content="", embeds=[], attachments=[], components=[])
        await self._dispatch(event, payload, intent=Intent.GUILD_MESSAGES)

    async def _dispatch_reaction_add(self, message: StoredMessage, user: FakeUser, emoji: str) -> None:
        guild = self.guilds[message.guild_id]
        await self._dispatch(
            "MESSAGE_REACTION_ADD",
            {
                "user_id": str(user.id),
                "channel_id": str(message.channel_id),
                "message_id": str(message.id),
                "guild_id": str(guild.id),
                "member": guild.member_payload(user.id),
                "emoji": _emoji_payload(emoji),
                "message_author_id": str(message.author.id),
                "burst": False,
                "burst_colors": [],
                "type": 0,
            },
            intent=Intent.GUILD_MESSAGE_REACTIONS,
        )

    # ---------------------------------------------------------------- HTTP plumbing

    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Callable[[web.Request], Any]
    ) -> web.StreamResponse:
        if request.path == "/gateway":
            return await handler(request)
        record = RequestRecord(
            method=request.method,
            path=request.path,
            query=dict(request.query),
            received_at=time.monotonic(),
            authorized=request.headers.get("Authorization") == f"Bot {self.token}",
        )
        request[_RECORD] = record
        try:
            await self._read_body(request, record)
            tokened = request.path.startswith((f"{API_PREFIX}/interactions/", f"{API_PREFIX}/webhooks/"))
            if request.path.startswith(API_PREFIX) and not tokened and not record.authorized:
                raise _ApiError(401, 0, "401: Unauthorized")
            response = await handler(request)
        except _ApiError as error:
            response = _json_response(error.body(), status=error.status)
        record.status = response.status
        is_json = isinstance(response, web.Response) and response.content_type == "application/json"
        if is_json and response.body:
            record.response_json = json.loads(response.body)
        if request.path.startswith(API_PREFIX):
            # A roomy bucket that never runs dry, so discord.py never sleeps on a rate limit.
            route = request.match_info.route.resource
            bucket = hashlib.sha1((route.canonical if route else request.path).encode()).hexdigest()[:16]
            response.headers.update(
                {
                    "X-RateLimit-Bucket": bucket,
                    "X-RateLimit-Limit": "50",
                    "X-RateLimit-Remaining": "49",
                    "X-RateLimit-Reset": f"{time.time() + 1:.3f}",
                    "X-RateLimit-Reset-After": "1.000",
                }
            )
        self._requests.append(record)
        for predicate, future in self._request_waiters:
            if not future.done() and predicate(record):
                future.set_result(record)
        return response

    @staticmethod
    async def _read_body(request: web.Request, record: RequestRecord) -> None:
        if request.content_type == "multipart/form-data":
            async for part in await request.multipart():
                if part.name == "payload_json":
                    raw = await part.text()
                    try:
                        record.json = json.loads(raw)
                    except json.JSONDecodeError:
                        raise _ApiError(400, 50109, "The request body contains invalid JSON.") from None
                elif part.filename is not None:
                    content_type = part.headers.get("Content-Type", "application/octet-stream")
                    data = bytes(await part.read())
                    record.files.append(UploadedFile(part.name or "", part.filename, content_type, data))
            return
        raw = await request.read()
        if raw:
            try:
                record.json = json.loads(raw)
            except json.JSONDecodeError:
                raise _ApiError(400, 50109, "The request body contains invalid JSON.") from None

    async def _unknown_route(self, request: web.Request) -> web.Response:
        request[_RECORD].matched = False
        raise _ApiError(404, 0, "404: Not Found")

    async def _serve_attachment(self, request: web.Request) -> web.Response:
        raw_id = request.match_info["attachment_id"]
        attachment = self._attachments.get(_as_id(raw_id) or 0)
        if attachment is None or quote(attachment.filename) != quote(request.match_info["filename"]):
            raise _ApiError(404, 0, "404: Not Found")
        return web.Response(body=attachment.data, content_type=attachment.content_type)

    # ---------------------------------------------------------------- REST: identity and commands

    async def _get_current_user(self, request: web.Request) -> web.Response:
        return _json_response({**self.bot_user.payload(), **_CURRENT_USER_EXTRAS})

    async def _get_bot_gateway(self, request: web.Request) -> web.Response:
        """Where to connect: what a bot asks when it is given only the REST base."""
        limit = {"total": 1000, "remaining": 1000, "reset_after": 0, "max_concurrency": self.max_concurrency}
        return _json_response({"url": self.gateway_url, "shards": self.recommended_shards,
                               "session_start_limit": limit})

    @staticmethod
    def shard_of(guild_id: int, shard_count: int) -> int:
        """The shard that carries a guild's events: (guild_id >> 22) % shard_count, as Discord's."""
        return (guild_id >> 22) % shard_count

    async def _get_application(self, request: web.Request) -> web.Response:
        return _json_response(
            {
                "id": str(self.application_id),
                "name": "Easel Test",
                "icon": None,
                "description": "",
                "summary": "",
                "type": None,
                "bot_public": True,
                "bot_require_code_grant": False,
                "verify_key": "0" * 64,
                "owner": self.owner.payload(),
                "team": None,
                "bot": self.bot_user.payload(),
                "flags": 0,
                "tags": [],
                "redirect_uris": [],
                "interactions_endpoint_url": None,
                "approximate_guild_count": len(self.guilds),
            }
        )

    def _command_scope(self, request: web.Request) -> int | None:
        if request.match_info["application_id"] != str(self.application_id):
            raise _ApiError(403, 50001, "Missing Access")
        if "guild_id" not in request.match_info:
            return None
        return self._guild_param(request).id

    async def _get_commands(self, request: web.Request) -> web.Response:
        return _json_response(self._commands.get(self._command_scope(request), []))

    async def _put_commands(self, request: web.Request) -> web.Response:
        """Bulk overwrite. Ids stay stable per (scope, name, type), as on Discord."""
        scope = self._command_scope(request)
        body = request[_RECORD].json
        if not isinstance(body, list):
            raise _invalid_form_body(
                _field_error("LIST_TYPE_CONVERT", "Only iterables may be used in a ListType")
            )
        errors: dict[str, Any] = {}
        seen: set[tuple[str, int]] = set()
        for index, command in enumerate(body):
            command_errors = self._command_errors(command)
            key = (command.get("name"), command.get("type", 1)) if isinstance(command, dict) else None
            if key is not None and key in seen:
                command_errors["name"] = _field_error(
                    "APPLICATION_COMMANDS_DUPLICATE_NAME", "Application command names must be unique"
                )
            seen.add(key)
            if command_errors:
                errors[str(index)] = command_errors
        if errors:
            raise _invalid_form_body(errors)
        stored = []
        for command in body:
            command_type = command.get("type", 1)
            id_key = (scope, command["name"], command_type)
            if id_key not in self._command_ids:
                self._command_ids[id_key] = self._snowflake()
            entry = {
                "default_member_permissions": None,
                "nsfw": False,
                "options": [],
                "description": "",
                **command,
                "id": str(self._command_ids[id_key]),
                "application_id": str(self.application_id),
                "type": command_type,
                "version": str(self._snowflake()),
            }
            if scope is not None:
                entry["guild_id"] = str(scope)
            stored.append(entry)
        self._commands[scope] = stored
        return _json_response(stored)

    @staticmethod
    def _command_errors(command: Any) -> dict[str, Any]:
        """The checks Discord makes that a careless command definition fails."""
        if not isinstance(command, dict):
            return _NOT_A_DICT
        errors: dict[str, Any] = {}
        name = command.get("name") or ""
        chat_input = command.get("type", 1) == 1
        if not 1 <= len(name) <= 32 or (chat_input and (name != name.lower() or " " in name)):
            errors["name"] = _field_error("APPLICATION_COMMAND_INVALID_NAME", "Command name is invalid")
        if chat_input and not 1 <= len(command.get("description") or "") <= 100:
            errors["description"] = _field_error(
                "BASE_TYPE_BAD_LENGTH", "Must be between 1 and 100 in length."
            )
        options = command.get("options") or []
        optional_seen = False
        for index, option in enumerate(options):
            option_errors = FakeDiscord._command_errors({**option, "type": 1})
            if option.get("required"):
                if optional_seen:
                    option_errors["required"] = _field_error(
                        "APPLICATION_COMMAND_OPTIONS_REQUIRED_INVALID",
                        "Required options must be placed before non-required options",
                    )
            elif option.get("type") not in (SUB_COMMAND, SUB_COMMAND_GROUP):
                optional_seen = True
            if option_errors:
                errors.setdefault("options", {})[str(index)] = option_errors
        return errors

    # ---------------------------------------------------------------- REST: interactions

    async def _interaction_callback(self, request: web.Request) -> web.Response:
        record: RequestRecord = request[_RECORD]
        interaction = self._interactions.get(_as_id(request.match_info["interaction_id"]) or 0)
        if interaction is None or interaction.token != request.match_info["token"]:
            raise _ApiError(404, 10062, "Unknown interaction")
        interaction.requests.append(record)
        if interaction.expired or record.received_at - interaction.sent_at > self.ack_deadline:
            raise _ApiError(404, 10062, "Unknown interaction")
        if interaction.callback is not None:
            raise _ApiError(400, 40060, "Interaction has already been acknowledged.")
        body = record.json if isinstance(record.json, dict) else {}
        callback_type = body.get("type")
        data = body.get("data") or {}
        allowed = sorted(_CALLBACKS_ALLOWED[interaction.type])
        if callback_type not in allowed:
            raise _invalid_form_body(
                {"type": _field_error("BASE_TYPE_CHOICES", f"Value must be one of {allowed}.")}
            )

        channel = self._channel(interaction.channel_id)
        message: StoredMessage | None = None
        event = "MESSAGE_CREATE"
        if callback_type == CHANNEL_MESSAGE:
            message = self._create_message(
                channel, data, record.files, allowed_flags=_INTERACTION_FLAGS, interaction=interaction
            )
        elif callback_type == DEFERRED_CHANNEL_MESSAGE:
            placeholder = {"content": "", "flags": LOADING | (data.get("flags", 0) & EPHEMERAL)}
            message = self._create_message(
                channel,
                placeholder,
                [],
                allowed_flags=LOADING | EPHEMERAL,
                interaction=interaction,
                placeholder=True,
            )
        elif callback_type == UPDATE_MESSAGE:
            component_message = self.message(interaction.component_message_id)
            message = self._edit_message(component_message, data, record.files)
            event = "MESSAGE_UPDATE"
        elif callback_type == MODAL:
            if not (data.get("custom_id") and data.get("title") and data.get("components")):
                required = "A modal needs custom_id, title and components"
                incomplete = _field_error("BASE_TYPE_REQUIRED", required)
                raise _invalid_form_body({"data": incomplete})
            interaction.modal = data

        interaction.callback = record
        interaction.response_type = callback_type
        if callback_type in (DEFERRED_UPDATE_MESSAGE, UPDATE_MESSAGE):
            interaction.original_message_id = interaction.component_message_id
        elif message is not None:
            interaction.original_message_id = message.id
        if message is not None:
            await self._dispatch_message_event(event, message)

        if request.query.get("with_response") not in ("1", "true", "True"):
            return _no_content()
        summary: dict[str, Any] = {"id": str(interaction.id), "type": interaction.type}
        if message is not None:
            summary.update(
                response_message_id=str(message.id),
                response_message_loading=message.loading,
                response_message_ephemeral=message.ephemeral,
            )
        response: dict[str, Any] = {"interaction": summary}
        if message is not None:
            response["resource"] = {"type": callback_type, "message": self._message_payload(message)}
        return _json_response(response)

    def _channel(self, channel_id: int) -> FakeChannel:
        for guild in self.guilds.values():
            if channel_id in guild.channels:
                return guild.channels[channel_id]
        raise _ApiError(404, 10003, "Unknown Channel")

    def _webhook_interaction(self, request: web.Request) -> FakeInteraction:
        interaction = self._interactions_by_token.get(request.match_info["token"])
        if interaction is not None:
            interaction.requests.append(request[_RECORD])
        if request.match_info["application_id"] != str(self.application_id):
            raise _ApiError(404, 10015, "Unknown Webhook")
        if interaction is None or interaction.expired:
            raise _ApiError(401, 50027, "Invalid Webhook Token")
        if interaction.callback is None:  # no webhook exists until the interaction is acknowledged
            raise _ApiError(404, 10015, "Unknown Webhook")
        return interaction

    def _webhook_message(self, request: web.Request, interaction: FakeInteraction) -> StoredMessage:
        raw_id = request.match_info["message_id"]
        message_id = interaction.original_message_id if raw_id == "@original" else _as_id(raw_id)
        own = {interaction.original_message_id, *interaction.followup_message_ids}
        if message_id is None or message_id not in own or message_id not in self._messages:
            raise _ApiError(404, 10008, "Unknown Message")
        return self._messages[message_id]

    async def _execute_followup(self, request: web.Request) -> web.Response:
        interaction = self._webhook_interaction(request)
        record: RequestRecord = request[_RECORD]
        payload = record.json if record.json is not None else {}
        original = self._messages.get(interaction.original_message_id or 0)
        still_thinking = original is not None and original.loading
        if interaction.response_type == DEFERRED_CHANNEL_MESSAGE and still_thinking:
            # Discord turns the first followup after a deferral into the "thinking..." message itself.
            message = self._edit_message(original, payload, record.files)
            await self._dispatch_message_event("MESSAGE_UPDATE", message)
        else:
            channel = self._channel(interaction.channel_id)
            message = self._create_message(
                channel, payload, record.files, allowed_flags=_INTERACTION_FLAGS, interaction=interaction
            )
            interaction.followup_message_ids.append(message.id)
            await self._dispatch_message_event("MESSAGE_CREATE", message)
        if request.query.get("wait") in ("1", "true", "True"):
            return _json_response(self._message_payload(message))
        return _no_content()

    async def _get_webhook_message(self, request: web.Request) -> web.Response:
        interaction = self._webhook_interaction(request)
        return _json_response(self._message_payload(self._webhook_message(request, interaction)))

    async def _edit_webhook_message(self, request: web.Request) -> web.Response:
        interaction = self._webhook_interaction(request)
        record: RequestRecord = request[_RECORD]
        message = self._webhook_message(request, interaction)
        message = self._edit_message(message, record.json or {}, record.files)
        await self._dispatch_message_event("MESSAGE_UPDATE", message)
        return _json_response(self._message_payload(message))

    async def _delete_webhook_message(self, request: web.Request) -> web.Response:
        interaction = self._webhook_interaction(request)
        await self._delete_message(self._webhook_message(request, interaction))
        return _no_content()

    # ---------------------------------------------------------------- REST: channels, messages, guilds

    def _channel_param(self, request: web.Request) -> FakeChannel:
        return self._channel(_as_id(request.match_info["channel_id"]) or 0)

    def _guild_param(self, request: web.Request) -> FakeGuild:
        guild = self.guilds.get(_as_id(request.match_info["guild_id"]) or 0)
        if guild is None:
            raise _ApiError(404, 10004, "Unknown Guild")
        return guild

    def _channel_message_param(self, request: web.Request) -> StoredMessage:
        channel = self._channel_param(request)
        message = self._messages.get(_as_id(request.match_info["message_id"]) or 0)
        if message is None or message.channel_id != channel.id or message.ephemeral:
            raise _ApiError(404, 10008, "Unknown Message")
        return message

    async def _get_channel(self, request: web.Request) -> web.Response:
        return _json_response(self._channel_param(request).payload())

    async def _list_messages(self, request: web.Request) -> web.Response:
        channel = self._channel_param(request)
        limit = min(int(request.query.get("limit", 50)), 100)
        before = int(request.query.get("before", 1 << 63))
        after = int(request.query.get("after", 0))
        visible = [m for m in self.messages(channel) if not m.ephemeral and after < m.id < before]
        newest_first = list(reversed(visible))
        page = list(reversed(visible[:limit])) if "after" in request.query else newest_first[:limit]
        return _json_response([self._message_payload(m) for m in page])

    async def _create_channel_message(self, request: web.Request) -> web.Response:
        channel = self._channel_param(request)
        record: RequestRecord = request[_RECORD]
        payload = record.json if record.json is not None else {}
        message = self._create_message(channel, payload, record.files, allowed_flags=_SETTABLE_FLAGS)
        await self._dispatch_message_event("MESSAGE_CREATE", message)
        return _json_response(self._message_payload(message))

    async def _get_channel_message(self, request: web.Request) -> web.Response:
        return _json_response(self._message_payload(self._channel_message_param(request)))

    async def _edit_channel_message(self, request: web.Request) -> web.Response:
        message = self._channel_message_param(request)
        if message.author.id != self.bot_user.id:
            raise _ApiError(403, 50005, "Cannot edit a message authored by another user")
        record: RequestRecord = request[_RECORD]
        message = self._edit_message(message, record.json or {}, record.files)
        await self._dispatch_message_event("MESSAGE_UPDATE", message)
        return _json_response(self._message_payload(message))

    async def _delete_channel_message(self, request: web.Request) -> web.Response:
        await self._delete_message(self._channel_message_param(request))
        return _no_content()

    async def _add_own_reaction(self, request: web.Request) -> web.Response:
        message = self._channel_message_param(request)
        emoji = request.match_info["emoji"]
        reacted = message.reactions.setdefault(emoji, [])
        if self.bot_user.id not in reacted:
            reacted.append(self.bot_user.id)
            await self._dispatch_reaction_add(message, self.bot_user, emoji)
        return _no_content()

    async def _remove_own_reaction(self, request: web.Request) -> web.Response:
        message = self._channel_message_param(request)
        emoji = request.match_info["emoji"]
        reacted = message.reactions.get(emoji, [])
        if self.bot_user.id in reacted:
            reacted.remove(self.bot_user.id)
            if not reacted:
                del message.reactions[emoji]
            await self._dispatch(
                "MESSAGE_REACTION_REMOVE",
                {
                    "user_id": str(self.bot_user.id),
                    "channel_id": str(message.channel_id),
                    "message_id": str(message.id),
                    "guild_id": str(message.guild_id),
                    "emoji": _emoji_payload(emoji),
                    "burst": False,
                    "type": 0,
                },
                intent=Intent.GUILD_MESSAGE_REACTIONS,
            )
        return _no_content()

    async def _get_guild(self, request: web.Request) -> web.Response:
        return _json_response(self._guild_param(request).payload())

    async def _get_member(self, request: web.Request) -> web.Response:
        guild = self._guild_param(request)
        user_id = _as_id(request.match_info["user_id"])
        if user_id not in guild.members:
            raise _ApiError(404, 10007, "Unknown Member")
        return _json_response(guild.member_payload(user_id))

    # ---------------------------------------------------------------- messages

    def _new_attachment(
        self,
        filename: str,
        data: bytes,
        content_type: str | None,
        *,
        description: str | None = None,
        ephemeral: bool = False,
    ) -> StoredAttachment:
        attachment_id = self._snowflake()
        size = _image_size(data)
        return StoredAttachment(
            attachment_id,
            filename,
            # Discord sniffs the type itself; discord.py uploads everything as application/octet-stream.
            content_type or mimetypes.guess_type(filename)[0] or "application/octet-stream",
            data,
            url=f"{self.base_url}/attachments/{attachment_id}/{quote(filename)}",
            width=size[0] if size else None,
            height=size[1] if size else None,
            description=description,
            ephemeral=ephemeral,
        )

    def _resolve_attachments(
        self,
        existing: list[StoredAttachment],
        spec: list[dict[str, Any]] | None,
        files: list[UploadedFile],
    ) -> list[StoredAttachment]:
        """The attachments after a create/edit.

        ``spec`` (the payload's "attachments") lists existing ids to keep and, by index n, the new
        files[n]; without it, every uploaded file is added.
        """
        if len(files) > 10:
            raise _invalid_form_body(
                {"files": _field_error("BASE_TYPE_MAX_LENGTH", "Must be 10 or fewer in length.")}
            )
        for upload in files:
            if len(upload.data) > self.attachment_size_limit:
                raise _ApiError(413, 40005, "Request entity too large")
        if spec is None:
            return list(existing) + [self._new_attachment(f.filename, f.data, None) for f in files]
        uploads = {f.field: f for f in files}
        kept = {a.id: a for a in existing}
        result = []
        for index, entry in enumerate(spec):
            raw_id = str(entry.get("id", ""))
            if _as_id(raw_id) in kept:
                result.append(kept[int(raw_id)])
            elif (upload := uploads.get(f"files[{raw_id}]")) is not None:
                filename = entry.get("filename") or upload.filename
                description = entry.get("description")
                result.append(self._new_attachment(filename, upload.data, None, description=description))
            else:
                unknown = _field_error("ATTACHMENT_NOT_FOUND", "Unknown attachment")
                raise _invalid_form_body({"attachments": {str(index): {"id": unknown}}})
        return result

    @staticmethod
    def _with_attachment_urls(
        embeds: list[dict[str, Any]], attachments: list[StoredAttachment]
    ) -> list[dict[str, Any]]:
        """Resolve attachment://name in embed images as Discord does; embeds get their "rich" type."""
        by_name = {a.filename: a for a in attachments}
        resolved = []
        for embed in embeds:
            embed = {"type": "rich", **copy.deepcopy(embed)}
            for key in ("image", "thumbnail"):
                url = (embed.get(key) or {}).get("url", "")
                attachment = by_name.get(url.removeprefix("attachment://"))
                if url.startswith("attachment://") and attachment is not None:
                    embed[key] = {
                        "url": attachment.url,
                        "proxy_url": attachment.url,
                        "width": attachment.width,
                        "height": attachment.height,
                        "flags": 0,
                    }
            resolved.append(embed)
        return resolved

    def _create_message(
        self,
        channel: FakeChannel,
        payload: Any,
        files: list[UploadedFile],
        *,
        allowed_flags: int,
        interaction: FakeInteraction | None = None,
        placeholder: bool = False,
    ) -> StoredMessage:
        _validate_message_payload(payload)
        attachments = self._resolve_attachments([], payload.get("attachments"), files)
        body_keys = ("content", "embeds", "components", "sticker_ids", "poll")
        if not (attachments or any(payload.get(key) for key in body_keys) or placeholder):
            raise _ApiError(400, 50006, "Cannot send an empty message")
        message = StoredMessage(
            self._snowflake(),
            channel.id,
            channel.guild_id,
            self.bot_user,
            content=payload.get("content") or "",
            embeds=self._with_attachment_urls(payload.get("embeds") or [], attachments),
            components=list(payload.get("components") or []),
            attachments=attachments,
            flags=payload.get("flags", 0) & allowed_flags,
        )
        if interaction is not None:
            message.interaction_id = interaction.id
            message.webhook_id = self.application_id
            metadata: dict[str, Any] = {
                "id": str(interaction.id),
                "type": interaction.type,
                "user": interaction.user.payload(),
                "authorizing_integration_owners": {"0": str(channel.guild_id)},
            }
            if interaction.type == APPLICATION_COMMAND:
                command_type = interaction.payload["data"]["type"]
                message.type = CHAT_INPUT_COMMAND_MESSAGE if command_type == 1 else CONTEXT_MENU_COMMAND_MESSAGE
                metadata.update(name=interaction.payload["data"]["name"], command_type=command_type)
            elif interaction.component_message_id is not None:  # a modal from a command has none
                metadata["interacted_message_id"] = str(interaction.component_message_id)
            message.interaction_metadata = metadata
        self._messages[message.id] = message
        self._attachments.update((a.id, a) for a in attachments)
        return message

    def _edit_message(
        self, message: StoredMessage, payload: Any, files: list[UploadedFile]
    ) -> StoredMessage:
        _validate_message_payload(payload)
        spec = payload["attachments"] if "attachments" in payload else None
        attachments = self._resolve_attachments(message.attachments, spec, files)
        content = (payload["content"] or "") if "content" in payload else message.content
        embeds = (payload["embeds"] or []) if "embeds" in payload else message.embeds
        components = (payload["components"] or []) if "components" in payload else message.components
        if not (content or embeds or attachments or components):
            raise _ApiError(400, 50006, "Cannot send an empty message")
        message.content = content
        message.embeds = self._with_attachment_urls(embeds, attachments)
        message.components = list(components)
        message.attachments = attachments
        if "flags" in payload:  # only embed suppression can change after sending
            message.flags = (message.flags & ~SUPPRESS_EMBEDS) | (payload["flags"] & SUPPRESS_EMBEDS)
        if message.loading:  # the deferred "thinking..." placeholder becomes the real message
            message.flags &= ~LOADING
        else:
            message.edited_timestamp = _now_iso()
        self._attachments.update((a.id, a) for a in attachments)
        return message

    async def _delete_message(self, message: StoredMessage) -> None:
        del self._messages[message.id]
        if not message.ephemeral:
            deleted = {
                "id": str(message.id),
                "channel_id": str(message.channel_id),
                "guild_id": str(message.guild_id),
            }
            await self._dispatch("MESSAGE_DELETE", deleted, intent=Intent.GUILD_MESSAGES)

    def _message_payload(self, message: StoredMessage) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "id": str(message.id),
            "channel_id": str(message.channel_id),
            "author": message.author.payload(),
            "content": message.content,
            "timestamp": message.timestamp,
            "edited_timestamp": message.edited_timestamp,
            "tts": False,
            "mention_everyone": False,
            "mentions": [],
            "mention_roles": [],
            "attachments": [a.payload() for a in message.attachments],
            "embeds": copy.deepcopy(message.embeds),
            "components": copy.deepcopy(message.components),
            "pinned": False,
            "type": message.type,
            "flags": message.flags,
        }
        if message.reactions:
            payload["reactions"] = [
                {
                    "emoji": _emoji_payload(emoji),
                    "count": len(user_ids),
                    "count_details": {"burst": 0, "normal": len(user_ids)},
                    "burst_colors": [],
                    "me": self.bot_user.id in user_ids,
                    "me_burst": False,
                }
                for emoji, user_ids in message.reactions.items()
            ]
        if message.webhook_id is not None:
            payload["webhook_id"] = str(message.webhook_id)
            payload["application_id"] = str(self.application_id)
        if message.interaction_metadata is not None:
            payload["interaction_metadata"] = copy.deepcopy(message.interaction_metadata)
        return payload
