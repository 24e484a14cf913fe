"""The gallery: its pages served by easel's real HTTP app (SQLite job store, images on disk) on
127.0.0.1 and read with aiohttp's client: what is listed and what never is, escaping, paging,
variations, the lines that make an image again (parsed back by the real command-line parser),
signed delete links, the admin's hide, the secret file, and the image URLs' range/ETag/cache
headers. The core's link signing is also driven on the in-memory job store."""
from __future__ import annotations

import asyncio
import html
import logging
import os
import re
import shlex
import stat
import threading
from dataclasses import dataclass

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from bot.config import ConfigError, settings_from_dict
from bot.core.gallery import Gallery, reproduce
from bot.core.models import GenerationParams, JobRecord, JobStatus, Kind, Refusal
from bot.gallery import ADMIN_TOKEN_ENV, SECRET_ENV, SECRET_FILE, gallery_secret
from bot.http import make_http_app
from moderation import NoImageScreen
from tests.fakes.generators import PreparedGenerator, png_bytes
from tests.fakes.ports import FixedClock, MemoryBlobs, MemoryJobs
from tests.helpers import free_port, start_app

GUILD, OTHER_GUILD = "100", "200"
HOSTILE = "<script>alert(1)</script><img src=x onerror=alert(2)> \"quoted\" & 'single' $(rm -rf ~)"


@dataclass
class Site:
    """easel's HTTP app serving a fresh database and images folder on 127.0.0.1."""

    app: object
    server: TestServer
    base: str
    session: aiohttp.ClientSession
    _seed: int = 0

    def add(self, prompt: str = "a lighthouse at dusk", *, user: str = "111", guild: str | None = GUILD,
            public: bool = True, status: JobStatus = JobStatus.DONE, kind: Kind = Kind.IMAGINE,
            **fields) -> JobRecord:
        """A finished job with its own stored image, as the service records one."""
        self._seed += 1
        blob = self.app.blobs.put(png_bytes(24, 16, seed=self._seed))
        params = GenerationParams(prompt=prompt, negative_prompt=fields.pop("negative_prompt", "blurry"),
                                  seed=fields.pop("seed", 1000 + self._seed), size=(768, 512),
                                  strength=fields.pop("strength", None), model="fake-model",
                                  options=fields.pop("options", {}))
        return self.app.jobs.create(kind=kind, status=status, user_id=user, guild_id=guild, channel_id="300",
                                    params=params, provider="fake", sha256=blob.key, image_url=blob.url,
                                    public=public, cost_micros=12_300, **fields)

    async def get(self, path: str, **kwargs) -> tuple[int, str, aiohttp.ClientResponse]:
        async with self.session.get(self.base + path, **kwargs) as resp:
            return resp.status, await resp.text(), resp

    @property
    def gallery(self) -> Gallery:
        from bot.gallery import GALLERY

        return self.server.app[GALLERY]


async def open_site(tmp_path, monkeypatch, admin_token: str | None = None) -> Site:
    monkeypatch.delenv(SECRET_ENV, raising=False)
    if admin_token is None:
        monkeypatch.delenv(ADMIN_TOKEN_ENV, raising=False)
    else:
        monkeypatch.setenv(ADMIN_TOKEN_ENV, admin_token)
    port = free_port()
    settings = settings_from_dict({
        "storage": {"database": str(tmp_path / "data" / "easel.db"), "images_dir": str(tmp_path / "data" / "images"),
                    "public_url": f"http://127.0.0.1:{port}"},
        "generation": {"default_model": "fake-model"},
    })
    app = start_app(settings, generators=[PreparedGenerator()], image_screen=NoImageScreen())
    server = TestServer(make_http_app(app), host="127.0.0.1", port=port)
    await server.start_server()
    return Site(app, server, f"http://127.0.0.1:{port}", aiohttp.ClientSession())


@pytest.fixture
async def site(tmp_path, monkeypatch):
    s = await open_site(tmp_path, monkeypatch, admin_token="admin-token-for-tests")
    yield s
    await s.session.close()
    await s.server.close()
    await s.app.close()


def listed_ids(page_html: str) -> list[str]:
    """The image keys a listing page links to, in order."""
    return re.findall(r'class="card" href="/i/([0-9a-f]{64})"', page_html)


def code_blocks(page_html: str) -> list[str]:
    return [html.unescape(c) for c in re.findall(r"<pre><code>(.*?)</code></pre>", page_html, re.S)]


# ---- the image page ---------------------------------------------------------------------------


async def test_the_image_page_shows_how_it_was_made_and_how_to_make_it_again(site):
    job = site.add("a lighthouse at dusk, oil painting", seed=42, options={"sampler": "euler"})
    status, text, resp = await site.get(f"/i/{job.sha256}")
    assert status == 200 and resp.headers["Content-Type"] == "text/html; charset=utf-8"
    facts = dict(re.findall(r"<dt>(.*?)</dt><dd>(.*?)</dd>", text))
    assert facts["Prompt"] == "a lighthouse at dusk, oil painting"
    assert facts["Negative prompt"] == "blurry"
    assert facts["Seed"] == "42"
    assert facts["Model"] == "fake-model (fake)"
    assert facts["Size"] == "768\u00d7512"
    assert facts["Cost"] == "$0.0123"
    assert f'<img src="{job.image_url}"' in text
    slash, command = code_blocks(text)
    assert slash == ("/imagine prompt:a lighthouse at dusk, oil painting --ar 3:2 negative:blurry seed:42 "
                     "model:fake-model sampler:euler")
    assert command == ("easel imagine 'a lighthouse at dusk, oil painting' --seed 42 --negative blurry "
                       "--model fake-model --size 768x512 --sampler euler")
    assert f'href="/u/{job.user_id}"' in text and f'href="/g/{GUILD}"' in text


async def test_pages_show_the_stores_url_of_the_moment_not_the_recorded_one(site):
    job = site.add("in a bucket once", user="333")
    site.app.jobs.update(job.id, image_url="https://bucket.example/x.png?X-Amz-Signature=expired")
    for path in (f"/i/{job.sha256}", "/u/333"):
        text = (await site.get(path))[1]
        assert f'src="{site.app.blobs.url_for(job.sha256)}"' in text and "expired" not in text


async def test_a_hostile_prompt_is_escaped_everywhere(site):
    job = site.add(HOSTILE, negative_prompt="</code></pre><b>bold</b>")
    site.add("another", user=job.user_id)
    for path in (f"/i/{job.sha256}", f"/u/{job.user_id}", f"/g/{GUILD}"):
        status, text, resp = await site.get(path)
        assert status == 200
        assert "<script>" not in text and "<img src=x" not in text and "<b>bold</b>" not in text
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
        assert "script-src" not in resp.headers["Content-Security-Policy"]  # default-src 'none': no script
        assert resp.headers["Referrer-Policy"] == "no-referrer"
    _, text, _ = await site.get(f"/i/{job.sha256}")
    assert code_blocks(text)[0].startswith(f"/imagine prompt:{HOSTILE} --ar 3:2 negative:</code></pre><b>bold</b>")


async def test_variations_are_listed_on_their_source_image_page(site):
    source = site.add("a castle")
    kids = [site.add(f"a castle, variation {i}", kind=Kind.VARIATION, source_job_id=source.id, strength=0.6)
            for i in range(3)]
    site.add("private variation", kind=Kind.VARIATION, source_job_id=source.id, public=False)
    _, text, _ = await site.get(f"/i/{source.sha256}")
    assert "Variations (3)" in text
    assert listed_ids(text) == [k.sha256 for k in reversed(kids)]
    _, text, _ = await site.get(f"/i/{kids[0].sha256}")
    assert code_blocks(text) == [f"/variation job:{source.id} seed:{kids[0].seed} strength:0.6",
                                 f"easel variation {source.id} --seed {kids[0].seed} --strength 0.6 "
                                 f"--prompt 'a castle, variation 0' --model fake-model"]


# ---- what is listed -----------------------------------------------------------------------------


async def test_private_unfinished_and_age_restricted_results_are_never_listed(site):
    shown = site.add("public and done")
    hidden = [site.add("private", public=False), site.add("failed", status=JobStatus.FAILED),
              site.add("running", status=JobStatus.RUNNING),
              site.add("from an age-restricted channel", nsfw_channel=True),
              site.add("a spoiler", spoiler=True)]
    for path in (f"/u/{shown.user_id}", f"/g/{GUILD}"):
        _, text, _ = await site.get(path)
        assert listed_ids(text) == [shown.sha256], path
    for job in hidden:
        status, text, _ = await site.get(f"/i/{job.sha256}")
        assert status == 404 and job.prompt not in text


async def test_the_guild_page_lists_that_guilds_public_images_newest_first(site):
    ours = [site.add(f"ours {i}", user=str(100 + i)) for i in range(3)]
    site.add("elsewhere", guild=OTHER_GUILD)
    site.add("a direct message", guild=None)
    _, text, _ = await site.get(f"/g/{GUILD}")
    assert listed_ids(text) == [j.sha256 for j in reversed(ours)]


async def test_a_members_page_is_newest_first_and_paged(site):
    jobs = [site.add(f"picture {i}") for i in range(30)]
    site.add("someone else's", user="222")
    newest_first = [j.sha256 for j in reversed(jobs)]
    _, first, _ = await site.get("/u/111")
    assert listed_ids(first) == newest_first[:24]
    assert 'href="/u/111?page=2">Older' in first and "Newer" not in first
    _, second, _ = await site.get("/u/111?page=2")
    assert listed_ids(second) == newest_first[24:]
    assert 'href="/u/111?page=1">' in second and "Older" not in second
    _, empty, _ = await site.get("/u/999")
    assert listed_ids(empty) == [] and "No images here yet" in empty
    for bad in ("0", "abc", "-1", "99999999"):
        status, text, _ = await site.get(f"/u/111?page={bad}")
        assert status == 400 and "page must be a whole number" in text, bad


async def test_unknown_or_malformed_addresses_are_404(site):
    for path in ("/i/" + "0" * 64, "/i/not-a-key", "/u/" + "x" * 65, "/g/not-a-number", "/g/<b>"):
        status, text, _ = await site.get(path)
        assert status == 404, path
        assert "<b>" not in text


# ---- deleting and hiding -------------------------------------------------------------------------


async def test_a_signed_delete_link_confirms_then_takes_the_image_out(site):
    job, other = site.add("mine to delete"), site.add("mine to keep")
    link = site.gallery.delete_link(job)
    assert link.startswith(f"{site.base}/delete/{job.id}?token=")
    status, text, _ = await site.get(link[len(site.base):])
    assert status == 200 and "Delete this image from the gallery?" in text and "mine to delete" in text
    token = re.search(r'name="token" value="([^"]+)"', text)[1]
    async with site.session.post(f"{site.base}/delete/{job.id}", data={"token": token}) as resp:
        assert resp.status == 200 and "no longer in the gallery" in await resp.text()
    assert (await site.get(f"/i/{job.sha256}"))[0] == 404
    assert listed_ids((await site.get("/u/111"))[1]) == [other.sha256]
    # Out of the gallery, not out of the store: the image's own URL still serves its bytes.
    async with site.session.get(f"{site.base}/images/{job.sha256}.png") as resp:
        assert resp.status == 200 and await resp.read() == site.app.blobs.get(job.sha256)


async def test_the_access_log_never_shows_a_delete_token(site, caplog):
    job = site.add("logged")
    link = site.gallery.delete_link(job)
    token = link.split("token=")[1]
    with caplog.at_level(logging.INFO, logger="aiohttp.access"):
        assert (await site.get(link[len(site.base):]))[0] == 200
        await asyncio.sleep(0.05)  # the line is written once the response is done
    lines = [r.getMessage() for r in caplog.records if r.name == "aiohttp.access"]
    assert any(f"/delete/{job.id}?token=***" in line for line in lines), lines
    assert not any(token in repr(vars(r)) for r in caplog.records)


async def test_a_bad_token_is_refused_and_deletes_nothing(site):
    job, other = site.add("keep me"), site.add("someone else's", user="222")
    token = site.gallery.delete_link(job).split("token=")[1]
    expires, mac = token.split(".")
    tampered = f"{expires}.{'0' if mac[0] != '0' else '1'}{mac[1:]}"
    later = f"{int(expires, 16) + 86400:x}.{mac}"  # a longer life is not what was signed
    for job_id, bad in ((job.id, tampered), (job.id, later), (job.id, ""), (job.id, "garbage"),
                        (other.id, token), (999_999, token)):
        status, text, _ = await site.get(f"/delete/{job_id}?token={bad}")
        assert status == 403 and "not valid" in text, (job_id, bad)
        async with site.session.post(f"{site.base}/delete/{job_id}", data={"token": bad}) as resp:
            assert resp.status == 403, (job_id, bad)
    async with site.session.post(f"{site.base}/delete/{job.id}") as resp:  # no token at all
        assert resp.status == 403
    assert sorted(listed_ids((await site.get(f"/g/{GUILD}"))[1])) == sorted([job.sha256, other.sha256])


async def test_an_expired_delete_link_is_refused():
    jobs = MemoryJobs()
    job = jobs.create(kind=Kind.IMAGINE, status=JobStatus.DONE, user_id="u1", sha256="ab" * 32, public=True)
    clock = FixedClock()
    gallery = Gallery(jobs, MemoryBlobs(), b"s" * 32, "http://easel.example/", clock)
    link = gallery.delete_link(job)
    assert link.startswith("http://easel.example/delete/1?token=")
    token = link.split("token=")[1]
    assert (await gallery.deletable(job.id, token)).id == job.id
    clock.t += 7 * 86400 + 1
    with pytest.raises(Refusal, match="expired"):
        await gallery.delete(job.id, token)
    assert [j.id for j in jobs.listed()] == [job.id]
    other_secret = Gallery(jobs, MemoryBlobs(), b"t" * 32, "http://easel.example", FixedClock())
    with pytest.raises(Refusal, match="not valid"):
        await other_secret.delete(job.id, token)


async def test_hiding_needs_the_admin_token(site):
    job = site.add("an admin will hide this")
    url = f"{site.base}/hide/{job.id}"
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "admin-token-for-tests"}):
        async with site.session.post(url, headers=headers) as resp:
            assert resp.status == 401, headers
            assert "admin-token-for-tests" not in await resp.text()
    assert (await site.get(f"/i/{job.sha256}"))[0] == 200
    auth = {"Authorization": "Bearer admin-token-for-tests"}
    async with site.session.post(url, headers=auth) as resp:
        assert (resp.status, await resp.json()) == (200, {"job_id": job.id, "hidden": True})
    assert (await site.get(f"/i/{job.sha256}"))[0] == 404
    assert listed_ids((await site.get(f"/g/{GUILD}"))[1]) == []
    assert site.app.db.query_one("SELECT hidden_by FROM jobs WHERE id = ?", (job.id,))[0] == "http:admin-token"
    async with site.session.post(f"{site.base}/hide/424242", headers=auth) as resp:
        assert resp.status == 404


async def test_hiding_is_off_without_an_admin_token(tmp_path, monkeypatch):
    s = await open_site(tmp_path, monkeypatch, admin_token=None)
    try:
        job = s.add("stays")
        async with s.session.post(f"{s.base}/hide/{job.id}", headers={"Authorization": "Bearer "}) as resp:
            assert resp.status == 403 and ADMIN_TOKEN_ENV in (await resp.json())["error"]
        assert (await s.get(f"/i/{job.sha256}"))[0] == 200
    finally:
        await s.session.close()
        await s.server.close()
        await s.app.close()


# ---- the secret -------------------------------------------------------------------------------


def test_the_secret_is_made_once_readable_only_by_its_owner(tmp_path, monkeypatch):
    monkeypatch.delenv(SECRET_ENV, raising=False)
    folder = tmp_path / "data"
    found: list[bytes] = []
    threads = [threading.Thread(target=lambda: found.append(gallery_secret(folder))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(found)) == 1 and len(found[0]) == 64
    assert stat.S_IMODE(os.stat(folder / SECRET_FILE).st_mode) == 0o600
    assert sorted(p.name for p in folder.iterdir()) == [SECRET_FILE]  # no drafts left behind
    assert gallery_secret(folder) == found[0]


def test_a_folder_that_cannot_keep_the_secret_is_named(tmp_path, monkeypatch):
    monkeypatch.delenv(SECRET_ENV, raising=False)
    (tmp_path / "data").write_text("a file where the data folder should be")
    with pytest.raises(ConfigError) as caught:
        gallery_secret(tmp_path / "data")
    assert str(tmp_path / "data" / SECRET_FILE) in str(caught.value) and SECRET_ENV in str(caught.value)


def test_the_environment_secret_wins_and_must_be_long_enough(tmp_path, monkeypatch):
    monkeypatch.setenv(SECRET_ENV, "a-secret-from-the-environment")
    assert gallery_secret(tmp_path) == b"a-secret-from-the-environment"
    assert not (tmp_path / SECRET_FILE).exists()
    monkeypatch.setenv(SECRET_ENV, "short")
    with pytest.raises(ConfigError) as caught:
        gallery_secret(tmp_path)
    assert SECRET_ENV in str(caught.value) and "short" not in str(caught.value)


# ---- the lines that make an image again ---------------------------------------------------------


def _job(kind: Kind = Kind.IMAGINE, prompt: str = "a cat", **fields) -> JobRecord:
    params = {k: fields.pop(k) for k in ("negative_prompt", "seed", "strength", "steps", "guidance",
                                         "options") if k in fields}
    return JobRecord(7, kind, JobStatus.DONE, "u1", GenerationParams(prompt=prompt, size=fields.pop("size", (512, 512)),
                                                                      model="tiny", **params), **fields)


@pytest.mark.parametrize("prompt, negative", [
    (HOSTILE, None),
    ("-1 a prompt that starts with a dash; and a semicolon", "-text, watermark"),
    ("line one\nline two \\ backslash", "it's"),
])
def test_the_command_line_parses_back_to_the_same_request(prompt, negative):
    from bot.cli import build_parser

    job = _job(prompt=prompt, negative_prompt=negative, seed=42, steps=4, guidance=7.5, size=(768, 512),
               options={"sampler": "euler", "quality": "hd"})
    args = build_parser().parse_args(shlex.split(reproduce(job).cli)[1:])
    assert (args.command, args.prompt, args.negative, args.seed, args.size) == ("imagine", prompt, negative, 42,
                                                                                (768, 512))
    assert (args.steps, args.guidance, args.model, args.sampler, args.quality) == (4, 7.5, "tiny", "euler", "hd")


def test_each_kind_of_job_gets_its_own_lines():
    up = reproduce(_job(Kind.UPSCALE, source_job_id=3))
    assert (up.discord, up.cli) == ("/upscale job:3", "easel upscale 3 --model tiny")
    zoom = reproduce(_job(Kind.EDIT, source_job_id=3, outpaint="zoom", seed=5))
    assert (zoom.discord, zoom.cli) == (None, "easel zoom 3 --prompt 'a cat' --seed 5 --model tiny")
    pan = reproduce(_job(Kind.EDIT, source_job_id=3, outpaint="left"))
    assert pan.cli == "easel pan 3 left --prompt 'a cat' --model tiny"
    upload = reproduce(_job(Kind.EDIT))  # an edit of an uploaded image: no command carries it
    assert (upload.discord, upload.cli) == (None, None)
    no_seed = reproduce(_job(steps=None))
    assert no_seed.discord == "/imagine prompt:a cat model:tiny"


# ---- the image URLs beside the gallery -----------------------------------------------------------


async def test_images_answer_ranges_etags_and_are_immutable(site):
    job = site.add("served")
    data = site.app.blobs.get(job.sha256)
    path = f"/images/{job.sha256}.png"
    async with site.session.get(site.base + path) as resp:
        assert resp.status == 200 and await resp.read() == data
        assert resp.headers["ETag"] == f'"{job.sha256}"'
        assert resp.headers["Cache-Control"] == "public, max-age=31536000, immutable"
        assert resp.headers["Accept-Ranges"] == "bytes"
    async with site.session.get(site.base + path, headers={"Range": "bytes=10-19"}) as resp:
        assert resp.status == 206 and await resp.read() == data[10:20]
        assert resp.headers["Content-Range"] == f"bytes 10-19/{len(data)}"
    async with site.session.get(site.base + path, headers={"If-None-Match": f'"{job.sha256}"'}) as resp:
        assert resp.status == 304 and await resp.read() == b""
        assert resp.headers["Cache-Control"].endswith("immutable")
    async with site.session.get(site.base + path, headers={"Range": f"bytes={len(data)}-"}) as resp:
        assert resp.status == 416
    results = await asyncio.gather(*(site.get(f"/i/{job.sha256}") for _ in range(20)))
    assert {status for status, _, _ in results} == {200}
