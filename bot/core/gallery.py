"""The gallery: a page per image, per member and per guild, with the lines that make an image
again, and taking images out of it (a member's signed delete link; an admin's hide).

Only what was posted where the channel sees it is listed, and only once it is done: a private
result, one from an age-restricted channel (a web page has no age gate), a hidden or a deleted one
is never listed, and its page does not exist (see JobStore.listed). Deleting takes an image out of
the gallery; its bytes stay in the store, where variations and upscales of it read them.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import math
import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass, replace

from .models import ErrorCode, JobRecord, Kind, Refusal
from .ports import BlobStore, Clock, JobStore

PAGE_SIZE = 24
MAX_PAGE = 10_000
VARIATIONS_SHOWN = 24
DELETE_LINK_TTL_S = 7 * 86400
_TOKEN = re.compile(r"([0-9a-f]{1,12})\.([0-9a-f]{32})")
BAD_LINK = "this delete link is not valid; ask for a new one with /gallery delete"
EXPIRED_LINK = "this delete link has expired; ask for a new one with /gallery delete"


@dataclass(frozen=True)
class Reproduce:
    """What makes the image again: a slash command and a command line (None where none can,
    such as an edit of an uploaded image)."""

    discord: str | None
    cli: str | None


@dataclass(frozen=True)
class ImagePage:
    job: JobRecord
    reproduce: Reproduce
    variations: tuple[JobRecord, ...]  # listed jobs made from this one, newest first


@dataclass(frozen=True)
class ListPage:
    """One page of a member's (or a guild's) listed images, newest first."""

    owner: str  # the user id or the guild id
    jobs: tuple[JobRecord, ...]
    page: int
    has_next: bool

    @property
    def has_previous(self) -> bool:
        return self.page > 1


def image_page_url(base_url: str, sha256: str) -> str:
    return f"{base_url.rstrip('/')}/i/{sha256}"


def page_link(base_url: str, job: JobRecord, *, public: bool) -> str | None:
    """The gallery page a result will have once posted (`public`: where the channel sees it), or
    None for one the gallery never lists (private, or from an age-restricted channel)."""
    if not public or job.nsfw_channel or job.spoiler or job.sha256 is None:
        return None
    return image_page_url(base_url, job.sha256)


class Gallery:
    """The gallery's pages and removals over the job store; images are shown at the blob store's
    URLs of the moment (a bucket's presigned ones expire). `secret` signs delete links."""

    def __init__(
        self,
        jobs: JobStore,
        blobs: BlobStore,
        secret: bytes,
        base_url: str,
        clock: Clock,
        *,
        page_size: int = PAGE_SIZE,
        link_ttl_s: float = DELETE_LINK_TTL_S,
    ):
        if len(secret) < 16:
            raise ValueError("the gallery's secret must be at least 16 bytes")
        self.jobs, self.blobs, self._secret, self.clock = jobs, blobs, secret, clock
        self.base_url = base_url.rstrip("/")
        self.page_size, self.link_ttl_s = page_size, link_ttl_s

    # ---- pages --------------------------------------------------------------------------------

    async def image(self, sha256: str) -> ImagePage | None:
        """The page of a listed image (the newest listed job with these bytes), or None."""

        def load() -> ImagePage | None:
            found = self._shown(self.jobs.listed(sha256=sha256, limit=1))
            if not found:
                return None
            variations = self._shown(self.jobs.listed(source_job_id=found[0].id, limit=VARIATIONS_SHOWN))
            return ImagePage(found[0], reproduce(found[0]), tuple(variations))

        return await asyncio.to_thread(load)

    async def member(self, user_id: str, page: int = 1) -> ListPage:
        return await self._page(
            user_id, page, lambda o, n: self.jobs.listed(user_id=user_id, offset=o, limit=n)
        )

    async def guild(self, guild_id: str, page: int = 1) -> ListPage:
        return await self._page(
            guild_id, page, lambda o, n: self.jobs.listed(guild_id=guild_id, offset=o, limit=n)
        )

    async def _page(self, owner: str, page: int, query: Callable[[int, int], list[JobRecord]]) -> ListPage:
        if not 1 <= page <= MAX_PAGE:
            raise Refusal(ErrorCode.USAGE, f"the page must be a whole number from 1 to {MAX_PAGE}")
        size = self.page_size
        # One more than a page: is there a next one?
        rows = await asyncio.to_thread(lambda: self._shown(query((page - 1) * size, size + 1)))
        return ListPage(owner, tuple(rows[:size]), page, len(rows) > size)

    def _job(self, job_id: int) -> JobRecord | None:
        job = self.jobs.get(job_id)
        return None if job is None else self._shown([job])[0]

    def _shown(self, jobs: list[JobRecord]) -> list[JobRecord]:
        """The jobs with their images' URLs to show now (may block: a presigned URL is signed)."""
        return [replace(j, image_url=self.blobs.url_for(j.sha256)) if j.sha256 else j for j in jobs]

    # ---- addresses ----------------------------------------------------------------------------

    def member_url(self, user_id: str) -> str:
        return f"{self.base_url}/u/{user_id}"

    def guild_url(self, guild_id: str) -> str:
        return f"{self.base_url}/g/{guild_id}"

    def delete_link(self, job: JobRecord) -> str:
        """A link for the job's requester that takes it out of the gallery (valid for a week)."""
        expires = math.ceil(self.clock.time() + self.link_ttl_s)
        return f"{self.base_url}/delete/{job.id}?token={expires:x}.{self._sign(job, expires)}"

    # ---- removals -----------------------------------------------------------------------------

    async def deletable(self, job_id: int, token: str) -> JobRecord:
        """The job a delete link is for, if the link is good; else a FORBIDDEN refusal (the
        same for a job that does not exist)."""
        job = await asyncio.to_thread(self._job, job_id)
        m = _TOKEN.fullmatch(token)
        if job is None or m is None or not hmac.compare_digest(m[2], self._sign(job, int(m[1], 16))):
            raise Refusal(ErrorCode.FORBIDDEN, BAD_LINK)
        if int(m[1], 16) < self.clock.time():
            raise Refusal(ErrorCode.FORBIDDEN, EXPIRED_LINK)
        return job

    async def delete(self, job_id: int, token: str) -> JobRecord:
        """Take the job out of the gallery, if the delete link is good."""
        job = await self.deletable(job_id, token)
        await asyncio.to_thread(self.jobs.delete_from_gallery, job.id)
        return job

    async def hide(self, job_id: int, actor: str) -> None:
        """An admin takes any job out of the gallery; `actor` is recorded."""
        if not await asyncio.to_thread(self.jobs.hide, job_id, actor):
            raise Refusal(ErrorCode.NOT_FOUND, f"there is no job {job_id}")

    def _sign(self, job: JobRecord, expires: int) -> str:
        message = f"easel-gallery-delete:{job.id}:{job.user_id}:{expires}".encode()
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()[:32]


# ---- the lines that make an image again -----------------------------------------------------


def reproduce(job: JobRecord) -> Reproduce:
    if job.kind == Kind.IMAGINE:
        return Reproduce(_imagine_line(job), _imagine_command(job))
    source = job.source_job_id
    if source is None:  # made from an uploaded image, which no command can carry
        return Reproduce(None, None)
    if job.kind == Kind.VARIATION:
        seed = f" seed:{job.seed}" if job.seed is not None else ""
        strength = f" strength:{job.strength:g}" if job.strength is not None else ""
        return Reproduce(
            f"/variation job:{source}{seed}{strength}",
            _command(
                ["easel", "variation", str(source)],
                seed=job.seed,
                strength=job.strength,
                prompt=job.prompt or None,
                model=job.model,
            ),
        )
    if job.kind == Kind.UPSCALE:
        return Reproduce(
            f"/upscale job:{source}", _command(["easel", "upscale", str(source)], model=job.model)
        )
    if job.outpaint:  # an outpainting: buttons on Discord, zoom or pan on the command line
        words = (
            ["easel", "zoom", str(source)]
            if job.outpaint == "zoom"
            else ["easel", "pan", str(source), job.outpaint]
        )
        return Reproduce(None, _command(words, prompt=job.prompt or None, seed=job.seed, model=job.model))
    return Reproduce(None, None)


def _imagine_line(job: JobRecord) -> str:
    flags = [f"--ar {a}:{b}" for a, b in [_aspect(job)] if (a, b) != (1, 1) and max(a, b) < 1000]
    flags += [f"--steps {job.steps}"] if job.steps is not None else []
    flags += [f"--guidance {job.guidance:g}"] if job.guidance is not None else []
    flags += [f"--style {job.options['style']}"] if "style" in job.options else []
    line = "/imagine prompt:" + " ".join([job.prompt, *flags])
    for name, value in (
        ("negative", job.negative_prompt),
        ("seed", job.seed),
        ("model", job.model),
        ("quality", job.options.get("quality")),
        ("sampler", job.options.get("sampler")),
    ):
        if value is not None and value != "":
            line += f" {name}:{value}"
    return line


def _aspect(job: JobRecord) -> tuple[int, int]:
    w, h = job.width or 1, job.height or 1
    d = math.gcd(w, h)
    return w // d, h // d


def _imagine_command(job: JobRecord) -> str:
    size = f"{job.width}x{job.height}" if job.width and job.height else None
    return _command(
        ["easel", "imagine", job.prompt],
        seed=job.seed,
        negative=job.negative_prompt or None,
        model=job.model,
        size=size,
        steps=job.steps,
        guidance=job.guidance,
        **dict(sorted(job.options.items())),
    )


def _command(words: list[str], **options: object) -> str:
    """A shell command: each word quoted; options as --name value (--name=value for a value that
    begins with '-', which argparse would take for an option); a prompt that begins with '-' goes
    after the options and '--'."""
    head, rest = words[:2], words[2:]
    parts = [shlex.quote(w) for w in head]
    opts = []
    for name, value in options.items():
        if value is None:
            continue
        text = f"{value:g}" if isinstance(value, float) else str(value)
        opts += (
            [f"--{name}={shlex.quote(text)}"] if text.startswith("-") else [f"--{name}", shlex.quote(text)]
        )
    if any(w.startswith("-") for w in rest):
        return " ".join([*parts, *opts, "--", *(shlex.quote(w) for w in rest)])
    return " ".join([*parts, *(shlex.quote(w) for w in rest), *opts])
