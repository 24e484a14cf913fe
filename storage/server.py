"""The HTTP server that gives every stored image a stable public URL."""
from __future__ import annotations

import asyncio

from aiohttp import web

from .blobs import CONTENT_TYPES, LocalBlobStore, is_key


def make_image_app(store: LocalBlobStore) -> web.Application:
    async def image(request: web.Request) -> web.StreamResponse:
        key, ext = request.match_info["key"], request.match_info["ext"]
        if not is_key(key) or ext not in CONTENT_TYPES:
            raise web.HTTPNotFound(text="no such image")
        path = store.path_for(key, ext)
        if not path.exists():
            raise web.HTTPNotFound(text="no such image")
        etag = f'"{key}"'
        headers = {
            "Content-Type": CONTENT_TYPES[ext],
            # Content-addressed: the bytes behind a URL never change.
            "Cache-Control": "public, max-age=31536000, immutable",
            "ETag": etag,
        }
        if any(tag.value in (key, "*") for tag in request.if_none_match or ()):
            return web.Response(status=304, headers=headers)
        # Not FileResponse: it would replace the content-key ETag with one made from file stats.
        body = await asyncio.to_thread(path.read_bytes)
        return web.Response(body=body, headers=headers)

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_get(r"/images/{key}.{ext}", image)
    app.router.add_get("/healthz", health)
    return app
