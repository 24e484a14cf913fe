"""A pool of self-hosted GPU servers (ComfyUI, AUTOMATIC1111) that one generator spreads its
jobs over: each job goes to the least-loaded server that answers its probe.

A server's load is the larger of what its probe reports (the jobs it holds, ours included) and
the jobs this process has sent it and not yet seen finish (two jobs picked at the same moment
see each other before either reaches the server). A server that cannot be reached is left out
for `down_for_s`, then probed again. Nothing is retried here: a job that fails raises, and the
router's retry picks a server afresh.
"""
from __future__ import annotations

import asyncio
import errno
import time
from collections.abc import Awaitable, Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from bot.core.models import GeneratorUnavailable

if TYPE_CHECKING:
    import aiohttp

DOWN_FOR_S = 30.0
PROBE_TIMEOUT_S = 3.0


class ServerDown(Exception):
    """A probe that failed; the message says how, for the operator (never a secret: these
    servers take none)."""


# A probe asks one server how loaded it is (jobs queued or running); raises ServerDown.
Probe = Callable[["aiohttp.ClientSession", str], Awaitable[int]]


@dataclass
class Server:
    url: str  # the base URL, without a trailing slash
    in_flight: int = 0  # jobs this process sent and has not seen finish
    down_until: float = 0.0  # time.monotonic() before which the server is left out
    problem: str | None = None  # why it was last left out


def server_urls(urls: Sequence[str], what: str) -> list[str]:
    """Checked base URLs, without trailing slashes; ValueError for an empty list, a repeated
    URL or one that is not http(s)."""
    if isinstance(urls, str) or not urls:
        raise ValueError(f"{what} needs at least one server URL, e.g. servers = [\"http://gpu1:8188\"]")
    out: list[str] = []
    for url in urls:
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"{what} server {url!r} must be an http:// or https:// URL")
        base = url.rstrip("/")
        if base in out:
            raise ValueError(f"{what} server {url!r} is listed twice")
        out.append(base)
    return out


class ServerPool:
    """The servers of one generator, their health and the jobs this process has on each."""

    def __init__(
        self,
        urls: Sequence[str],
        probe: Probe,
        *,
        what: str,
        down_for_s: float = DOWN_FOR_S,
        probe_timeout_s: float = PROBE_TIMEOUT_S,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.what = what  # "ComfyUI", for messages
        self.servers = [Server(url) for url in server_urls(urls, what)]
        self._probe = probe
        self._down_for_s = down_for_s
        self._probe_timeout_s = probe_timeout_s
        self._clock = clock

    def mark_down(self, server: Server, problem: str) -> None:
        """Leave `server` out of picks for a while (it refused a connection, or died mid-job)."""
        server.down_until = self._clock() + self._down_for_s
        server.problem = problem

    def is_up(self, server: Server) -> bool:
        return server.down_until <= self._clock()

    async def pick(self, session: aiohttp.ClientSession, among: Collection[str] | None = None) -> Server:
        """The least-loaded server (of the URLs `among`, when given) that answers its probe now;
        GeneratorUnavailable when none does."""
        candidates = [s for s in self.servers if self.is_up(s) and (among is None or s.url in among)]
        if not candidates:
            raise GeneratorUnavailable(f"no {self.what} server is up: {self._problems(among)}")
        loads = await asyncio.gather(*(self._load(session, s) for s in candidates))
        answered = [(load, s) for load, s in zip(loads, candidates, strict=True) if load is not None]
        if not answered:
            raise GeneratorUnavailable(f"no {self.what} server answered: {self._problems(among)}")
        order = {id(s): i for i, s in enumerate(self.servers)}
        load, server = min(answered, key=lambda a: (max(a[0], a[1].in_flight), a[1].in_flight, order[id(a[1])]))
        return server

    async def _load(self, session: aiohttp.ClientSession, server: Server) -> int | None:
        import aiohttp

        try:
            async with asyncio.timeout(self._probe_timeout_s):
                load = await self._probe(session, server.url)
        except TimeoutError:
            self.mark_down(server, f"no answer within {self._probe_timeout_s:g} s")
            return None
        except (ServerDown, aiohttp.ClientError, ValueError) as exc:
            self.mark_down(server, describe_failure(exc))
            return None
        server.problem = None
        return load

    def _problems(self, among: Collection[str] | None) -> str:
        servers = [s for s in self.servers if among is None or s.url in among]
        return "; ".join(f"{s.url}: {s.problem or 'not answering'}" for s in servers)

    @contextmanager
    def claim(self, server: Server) -> Iterator[Server]:
        """Count a job against `server` while it runs."""
        server.in_flight += 1
        try:
            yield server
        finally:
            server.in_flight -= 1


def describe_failure(exc: BaseException) -> str:
    """A connection failure in a few words ("connection refused", "the server closed the
    connection"), for messages."""
    import aiohttp

    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return "cannot connect (the host name does not resolve)"
    if isinstance(exc, aiohttp.ClientConnectorError):
        refused = exc.os_error.errno == errno.ECONNREFUSED or isinstance(exc.os_error, ConnectionRefusedError)
        return f"cannot connect ({'connection refused' if refused else type(exc.os_error).__name__})"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the server closed the connection"
    if isinstance(exc, aiohttp.ClientResponseError):
        return f"HTTP {exc.status}"
    if isinstance(exc, (ServerDown, ValueError)):
        return str(exc)
    return type(exc).__name__


async def get_json(session: aiohttp.ClientSession, url: str, what: str) -> object:
    """GET `url` and its JSON; ServerDown for any other status or body."""
    async with session.get(url) as resp:
        if resp.status != 200:
            raise ServerDown(f"{what} answered HTTP {resp.status}")
        try:
            return await resp.json(content_type=None)
        except ValueError:
            raise ServerDown(f"{what} answered with something that is not JSON") from None


class SessionOwner:
    """One aiohttp session per generator, made at first use (on the event loop that uses it) and
    closed with the generator."""

    _session: aiohttp.ClientSession | None = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            import aiohttp

            self._session = aiohttp.ClientSession()
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
