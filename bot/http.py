"""easel's HTTP server: the stored images (storage.server), /healthz (the process is up),
/readyz (it can do its work, with a JSON body that says what is wrong), /metrics, and the
gallery's pages (bot.gallery)."""
from __future__ import annotations

import asyncio
from collections.abc import Callable

from aiohttp import web

from storage.blobs import LocalBlobStore
from storage.image_site import ImageSite
from storage.server import make_image_app

from .bootstrap import App
from .gallery import add_gallery_routes
from .metrics import CONTENT_TYPE


def make_http_app(app: App, *, discord_ready: Callable[[], bool] | None = None) -> web.Application:
    """The image server with the operator's endpoints. `discord_ready` (when running the bot)
    says whether the bot is connected to Discord."""
    if isinstance(app.blobs, LocalBlobStore):
        http = make_image_app(app.blobs)
    else:  # images are served by the bucket (or the CDN in front of it)
        http = web.Application()
        http.router.add_get("/healthz", _healthz)

    async def metrics(request: web.Request) -> web.Response:
        body = await asyncio.to_thread(app.metrics.exposition)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    async def ready(request: web.Request) -> web.Response:
        checks = await asyncio.to_thread(readiness, app)
        if discord_ready is not None:
            checks["discord"] = _check(discord_ready(), "connected", "not connected to Discord")
        ok = all(c["ok"] for c in checks.values())
        return web.json_response({"ready": ok, "checks": checks}, status=200 if ok else 503)

    http.router.add_get("/metrics", metrics)
    http.router.add_get("/readyz", ready)
    add_gallery_routes(http, app)
    return http


async def start_http(http: web.Application, host: str, port: int, *, access_log: bool) -> web.AppRunner:
    """`http` listening on host:port, its images on storage.image_site's fast path; its runner
    (cleaning it up stops the server and runs the app's cleanup). Raises OSError where it cannot
    listen, after cleaning up."""
    runner = web.AppRunner(http, **({} if access_log else {"access_log": None}))
    await runner.setup()
    try:
        await ImageSite(runner, host, port, access_log=access_log).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner


def readiness(app: App) -> dict[str, dict[str, object]]:
    """Each check: ok, and what it found (blocking: call it in a thread)."""
    checks: dict[str, dict[str, object]] = {}
    try:
        app.db.check_writable()
        checks["database"] = _check(True, "writable")
    except Exception as exc:  # any failure is the answer
        checks["database"] = _check(False, "", f"{app.db.path}: {exc}")
    try:
        app.blobs.check_writable()
        checks["storage"] = _check(True, "writable")
    except Exception as exc:
        checks["storage"] = _check(False, "", str(exc))
    usable = [s.name for s in app.router.healthy_models()]
    unusable = app.router.unavailable()
    why = "; ".join(f"{p}: {r}" for p, r in unusable.items()) or "no generator is configured"
    checks["generators"] = _check(bool(usable), f"{len(usable)} models usable", f"no usable model ({why})")
    return checks


def _check(ok: bool, detail: str, problem: str = "") -> dict[str, object]:
    return {"ok": ok, "detail": detail if ok else problem}


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})
