"""The gallery on easel's HTTP server: `/i/<sha256>` (an image, how it was made and how to make
it again, its variations), `/u/<user id>` and `/g/<guild id>` (listed images, newest first, paged),
`/delete/<job id>` (a member's signed link: a confirmation page, then a POST) and `/hide/<job id>`
(POST, for admins: `Authorization: Bearer $EASEL_ADMIN_TOKEN`).

Pages are rendered on the server, every value from a job escaped (prompts are hostile input),
with a small inline stylesheet that reads on a phone. A Content-Security-Policy allows no script
at all, and no Referer leaves a page (a delete link carries its token).

Delete links are signed with `$EASEL_GALLERY_SECRET`, or else with a random secret kept in the
data folder (`gallery.secret`, mode 0600), made on first use.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import os
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from html import escape
from pathlib import Path

from aiohttp import web

from .bootstrap import App
from .config import ConfigError
from .core.access import MAX_JOB_ID
from .core.gallery import BAD_LINK, Gallery, ImagePage, ListPage
from .core.models import ErrorCode, JobRecord, Refusal, micros_to_usd

SECRET_ENV = "EASEL_GALLERY_SECRET"
ADMIN_TOKEN_ENV = "EASEL_ADMIN_TOKEN"
SECRET_FILE = "gallery.secret"
GALLERY = web.AppKey("gallery", Gallery)
_SHA256 = re.compile(r"[0-9a-f]{64}")
_USER = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_SNOWFLAKE = re.compile(r"\d{1,20}")
_TOKEN_IN_URL = re.compile(r"([?&]token=)[^&\s\"]*")
HEADERS = {
    "Cache-Control": "no-cache",  # a page changes when an image is hidden or deleted
    "Content-Security-Policy": "default-src 'none'; img-src http: https:; style-src 'unsafe-inline'; "
                               "form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}
STYLE = """
:root{color-scheme:light dark;--fg:#1d1d1f;--bg:#f6f6f8;--card:#fff;--muted:#666;--accent:#4752c4}
@media (prefers-color-scheme:dark){:root{--fg:#ececf0;--bg:#141416;--card:#222226;--muted:#a0a0a8;--accent:#8d96ff}}
*{box-sizing:border-box}
body{margin:0;font:16px/1.5 system-ui,-apple-system,"Segoe UI",sans-serif;color:var(--fg);background:var(--bg)}
header,main{max-width:72rem;margin:0 auto;padding:.75rem 1rem}
header{font-weight:600}
a{color:var(--accent)}
h1{font-size:1.35rem;margin:.25rem 0 1rem;overflow-wrap:anywhere}
h2{font-size:1.1rem;margin:1.5rem 0 .5rem}
.grid{display:grid;gap:.75rem;grid-template-columns:repeat(auto-fill,minmax(10rem,1fr))}
.card{display:block;background:var(--card);border-radius:.5rem;overflow:hidden;color:inherit;text-decoration:none}
.card img{display:block;width:100%;height:auto;aspect-ratio:1;object-fit:cover}
.card p{margin:.4rem .6rem .6rem;font-size:.85rem;overflow-wrap:anywhere}
.image{display:grid;gap:1rem;align-items:start}
@media (min-width:60rem){.image{grid-template-columns:minmax(0,3fr) minmax(0,2fr)}}
figure{margin:0}
.image img{display:block;width:100%;height:auto;border-radius:.5rem}
dl{display:grid;grid-template-columns:auto minmax(0,1fr);gap:.3rem .9rem;margin:0}
dt{color:var(--muted)}
dd{margin:0;overflow-wrap:anywhere}
pre{margin:.25rem 0 .75rem;padding:.6rem;white-space:pre-wrap;overflow-wrap:anywhere;background:var(--card);
border-radius:.4rem;font-size:.85rem}
nav.pages{display:flex;justify-content:space-between;margin:1.25rem 0}
button{font:inherit;padding:.6rem 1.2rem;border:0;border-radius:.4rem;background:#c62828;color:#fff}
"""


# ---- wiring -------------------------------------------------------------------------------------


def gallery_secret(folder: Path) -> bytes:
    """$EASEL_GALLERY_SECRET, else the secret in `folder`/gallery.secret, made (0600) if there is
    none; two processes starting at once end up with the same one. Blocking."""
    given = os.environ.get(SECRET_ENV, "")
    if given:
        if len(given) < 16:
            raise ConfigError(f"${SECRET_ENV} must be at least 16 characters long")
        return given.encode()
    path = folder / SECRET_FILE
    try:
        if not path.exists():
            _make_secret(folder, path)
        if path.stat().st_mode & 0o077:
            os.chmod(path, 0o600)
        secret = path.read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot keep the gallery's secret ({exc.strerror}); fix the data "
                          f"folder or set ${SECRET_ENV}") from None
    if len(secret) < 32:
        raise ConfigError(f"{path}: the gallery's secret is damaged; delete the file and a new one is made")
    return secret


def _make_secret(folder: Path, path: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    draft = folder / f".{SECRET_FILE}.{os.getpid()}.{secrets.token_hex(4)}"
    fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, secrets.token_hex(32).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(draft, path)  # whole or not at all; the first process to get there wins
    except FileExistsError:
        pass
    finally:
        os.unlink(draft)


def build_gallery(app: App) -> Gallery:
    """The gallery over the app's job store, its links on storage.public_url. Blocking (it may
    make the secret file)."""
    settings = app.settings
    folder = settings.path(settings.storage.database).parent
    return Gallery(app.jobs, app.blobs, gallery_secret(folder), settings.storage.public_url, app.clock)


class RedactTokens(logging.Filter):
    """Access-log lines carry the request line, and a delete link's token with it: masked."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = _TOKEN_IN_URL.sub(r"\1***", str(record.msg))
        for key, value in vars(record).items():
            if isinstance(value, str) and "token=" in value:
                setattr(record, key, _TOKEN_IN_URL.sub(r"\1***", value))
        return True


def add_gallery_routes(http: web.Application, app: App) -> None:
    """The gallery's routes on the HTTP app; the gallery itself is built as the app starts."""

    async def start(http: web.Application) -> None:
        http[GALLERY] = await asyncio.to_thread(build_gallery, app)

    http.on_startup.append(start)
    access = logging.getLogger("aiohttp.access")
    if not any(isinstance(f, RedactTokens) for f in access.filters):
        access.addFilter(RedactTokens())
    admin_token = os.environ.get(ADMIN_TOKEN_ENV, "")
    http.router.add_get("/i/{sha256}", image_page)
    http.router.add_get("/u/{user_id}", member_page)
    http.router.add_get("/g/{guild_id}", guild_page)
    http.router.add_get("/delete/{job_id}", confirm_delete)
    http.router.add_post("/delete/{job_id}", delete)

    async def hide_job(request: web.Request) -> web.Response:
        return await hide(request, admin_token)

    http.router.add_post("/hide/{job_id}", hide_job)


# ---- handlers -----------------------------------------------------------------------------------


async def image_page(request: web.Request) -> web.Response:
    sha = request.match_info["sha256"]
    page = await request.app[GALLERY].image(sha) if _SHA256.fullmatch(sha) else None
    if page is None:
        return _page("No such image", "<p>There is no such image in the gallery.</p>", 404)
    return _page(_clip(page.job.prompt, 70) or f"Image {page.job.id}", render_image(page))


async def member_page(request: web.Request) -> web.Response:
    user_id = request.match_info["user_id"]
    if not _USER.fullmatch(user_id):
        return _page("No such member", "<p>There is no such member.</p>", 404)
    listing = await _listing(request, lambda g, n: g.member(user_id, n))
    if isinstance(listing, web.Response):
        return listing
    return _page(f"Images by member {user_id}", render_list(f"Images by member {user_id}", listing, request.path))


async def guild_page(request: web.Request) -> web.Response:
    guild_id = request.match_info["guild_id"]
    if not _SNOWFLAKE.fullmatch(guild_id):
        return _page("No such server", "<p>There is no such server.</p>", 404)
    listing = await _listing(request, lambda g, n: g.guild(guild_id, n))
    if isinstance(listing, web.Response):
        return listing
    return _page("Recent images in this server", render_list("Recent images in this server", listing, request.path))


async def _listing(request: web.Request, fetch: Callable[[Gallery, int], Awaitable[ListPage]]
                   ) -> ListPage | web.Response:
    text = request.query.get("page", "1")
    if not re.fullmatch(r"\d{1,6}", text):
        return _page("Bad page", "<p>The page must be a whole number from 1.</p>", 400)
    try:
        return await fetch(request.app[GALLERY], int(text))
    except Refusal as exc:
        return _page("Bad page", f"<p>{escape(str(exc))}.</p>", 400)


async def confirm_delete(request: web.Request) -> web.Response:
    job_id, token = _job_id(request), request.query.get("token", "")
    try:
        if not job_id:
            raise Refusal(ErrorCode.FORBIDDEN, BAD_LINK)
        job = await request.app[GALLERY].deletable(job_id, token)
    except Refusal as exc:
        return _page("Link not valid", f"<p>{escape(str(exc))}.</p>", 403)
    return _page("Delete this image?", render_confirm(job, token))


async def delete(request: web.Request) -> web.Response:
    job_id = _job_id(request)
    form = await request.post()
    token = form.get("token")
    try:
        if not job_id or not isinstance(token, str):
            raise Refusal(ErrorCode.FORBIDDEN, BAD_LINK)
        await request.app[GALLERY].delete(job_id, token)
    except Refusal as exc:
        return _page("Link not valid", f"<p>{escape(str(exc))}.</p>", 403)
    return _page("Deleted", f"<p>Image {job_id} is no longer in the gallery.</p>")


async def hide(request: web.Request, admin_token: str) -> web.Response:
    if not admin_token:
        return web.json_response({"error": f"hiding is off: ${ADMIN_TOKEN_ENV} is not set"}, status=403)
    given = request.headers.get("Authorization", "")
    if not hmac.compare_digest(given.encode(), f"Bearer {admin_token}".encode()):
        return web.json_response({"error": "an admin token is needed (Authorization: Bearer ...)"}, status=401,
                                 headers={"WWW-Authenticate": "Bearer"})
    job_id = _job_id(request)
    try:
        if not job_id:
            raise Refusal(ErrorCode.NOT_FOUND, "there is no such job")
        await request.app[GALLERY].hide(job_id, "http:admin-token")
    except Refusal as exc:
        return web.json_response({"error": str(exc)}, status=404)
    return web.json_response({"job_id": job_id, "hidden": True})


def _job_id(request: web.Request) -> int | None:
    text = request.match_info["job_id"]
    return int(text) if re.fullmatch(r"\d{1,19}", text) and 0 < int(text) <= MAX_JOB_ID else None


# ---- rendering ----------------------------------------------------------------------------------


def _page(title: str, body: str, status: int = 200) -> web.Response:
    text = (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{escape(title)} \u00b7 easel</title><style>{STYLE}</style></head>"
            f"<body><header>easel gallery</header><main>{body}</main></body></html>")
    return web.Response(text=text, status=status, content_type="text/html", charset="utf-8", headers=HEADERS)


def _clip(text: str | None, limit: int) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def _img(job: JobRecord, *, lazy: bool) -> str:
    url = job.image_url or ""
    if not url.startswith(("http://", "https://")):
        return ""
    size = f' width="{job.width}" height="{job.height}"' if job.width and job.height else ""
    return (f'<img src="{escape(url)}" alt="{escape(_clip(job.prompt, 200))}"{size}'
            + (' loading="lazy"' if lazy else "") + ">")


def _grid(jobs: tuple[JobRecord, ...]) -> str:
    cards = "".join(f'<a class="card" href="/i/{escape(j.sha256 or "")}">{_img(j, lazy=True)}'
                    f"<p>{escape(_clip(j.prompt, 140))}</p></a>" for j in jobs)
    return f'<div class="grid">{cards}</div>'


def render_list(title: str, listing: ListPage, path: str) -> str:
    """A member's or a guild's page of listed images, with links to the next and previous pages."""
    if not listing.jobs:
        body = "<p>No images here yet.</p>" if listing.page == 1 else "<p>No more images.</p>"
    else:
        body = _grid(listing.jobs)
    newer = (f'<a rel="prev" href="{escape(path)}?page={listing.page - 1}">\u2190 Newer</a>'
             if listing.has_previous else "<span></span>")
    older = (f'<a rel="next" href="{escape(path)}?page={listing.page + 1}">Older \u2192</a>'
             if listing.has_next else "<span></span>")
    pages = f'<nav class="pages">{newer}<span>page {listing.page}</span>{older}</nav>'
    return f"<h1>{escape(title)}</h1>{body}{pages}"


def _facts(job: JobRecord) -> list[tuple[str, str]]:
    made = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(job.finished_at or job.created_at))
    rows = [("Job", str(job.id)), ("Prompt", job.prompt), ("Negative prompt", job.negative_prompt or "\u2014")]
    if job.original_prompt:
        rows.append(("Typed prompt", job.original_prompt))
    rows += [
        ("Seed", str(job.seed) if job.seed is not None else "none (this model takes no seed)"),
        ("Model", f"{job.model} ({job.provider})" if job.provider else str(job.model)),
        ("Size", f"{job.width}\u00d7{job.height}"),
        ("Cost", f"${micros_to_usd(job.cost_micros):.4f}"),
        ("Made", made),
    ]
    rows += [(name.capitalize(), value) for name, value in sorted(job.options.items())]
    return rows


def render_image(page: ImagePage) -> str:
    """An image, what it was made from, the lines that make it again, and its variations."""
    job = page.job
    facts = "".join(f"<dt>{escape(k)}</dt><dd>{escape(v)}</dd>" for k, v in _facts(job))
    again = ""
    if page.reproduce.discord:
        again += f"<h2>Make it again on Discord</h2><pre><code>{escape(page.reproduce.discord)}</code></pre>"
    if page.reproduce.cli:
        again += f"<h2>Make it again with the command line</h2><pre><code>{escape(page.reproduce.cli)}</code></pre>"
    links = f'<a href="/u/{escape(job.user_id)}">More by this member</a>'
    if job.guild_id:
        links += f' \u00b7 <a href="/g/{escape(job.guild_id)}">More from this server</a>'
    variations = (f"<h2>Variations ({len(page.variations)})</h2>{_grid(page.variations)}"
                  if page.variations else "")
    return (f'<h1>{escape(_clip(job.prompt, 120))}</h1><div class="image"><figure>'
            f"{_img(job, lazy=False)}</figure><section><dl>{facts}</dl>{again}<p>{links}</p></section>"
            f"</div>{variations}")


def render_confirm(job: JobRecord, token: str) -> str:
    """The page a delete link opens: what would go, and the button that takes it out."""
    return (f"<h1>Delete this image from the gallery?</h1><p>{escape(_clip(job.prompt, 300))}</p>"
            f'<div class="grid"><div class="card">{_img(job, lazy=False)}</div></div>'
            f'<form method="post" action="/delete/{job.id}"><input type="hidden" name="token" '
            f'value="{escape(token)}"><p><button type="submit">Delete from the gallery</button></p></form>'
            "<p>The image leaves the gallery's pages; the Discord message stays until you delete it.</p>")
