"""The gallery in a real browser: Debian's headless Chromium, driven by Playwright's Python client,
reads easel's pages from its HTTP app on 127.0.0.1 at a phone's width (390x844) and a desktop's
(1280x800): what a visitor sees, that the layout fits the screen, that a hostile prompt runs no
script, that the delete link's button works, and a screenshot of each page at each width (under
the test's tmp_path)."""
from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
import pytest_asyncio
from PIL import Image

from tests.test_gallery import GUILD, HOSTILE, open_site

CHROMIUM = "/usr/bin/chromium"
if not os.path.exists(CHROMIUM):
    pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)", allow_module_level=True)
playwright_api = pytest.importorskip("playwright.async_api")

pytestmark = pytest.mark.asyncio(loop_scope="module")
PHONE, DESKTOP = {"width": 390, "height": 844}, {"width": 1280, "height": 800}
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def browser():
    async with playwright_api.async_playwright() as p:
        chromium = await p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield chromium
        await chromium.close()


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def site(tmp_path_factory):
    """One site for the module: a member's 30 images (one with a hostile prompt and variations)."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        s = await open_site(tmp_path_factory.mktemp("gallery"), monkeypatch)
        s.jobs = [s.add(f"a lighthouse at dusk, study {i}, oil painting with heavy impasto") for i in range(28)]
        s.hostile = s.add(HOSTILE, negative_prompt="<b>bold</b> & blurry")
        s.variations = [s.add(f"variation {i}", kind="variation", source_job_id=s.hostile.id) for i in range(2)]
        yield s
        await s.session.close()
        await s.server.close()
        await s.app.close()


async def visit(browser, site, path: str, viewport: dict, shots: Path):
    """A fresh page at `viewport` showing `path`, every image loaded; screenshot saved; the page
    and the dialogs (alert, confirm) anything tried to open."""
    context = await browser.new_context(viewport=viewport, device_scale_factor=1)
    page = await context.new_page()
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    response = await page.goto(site.base + path, wait_until="load")
    assert response.status == 200, path
    # The images on screen (lazy ones below it wait for a scroll). Not wait_for_function: its
    # polling evaluates a string, which the pages' CSP forbids.
    await asyncio.wait_for(page.locator("img").evaluate_all(
        "imgs => Promise.all(imgs.filter(i => i.getBoundingClientRect().top < innerHeight)"
        ".map(i => i.complete || new Promise(r => { i.onload = i.onerror = r; })))"), 10)
    name = path.strip("/").replace("/", "-").replace("?", "-")[:40]
    shot = shots / f"{name}-{viewport['width']}x{viewport['height']}.png"
    await page.screenshot(path=str(shot))
    with Image.open(shot) as img:
        assert img.size == (viewport["width"], viewport["height"])
    return context, page, dialogs


async def fits_the_width(page) -> bool:
    return await page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")


@pytest.mark.parametrize("viewport", [PHONE, DESKTOP], ids=["phone", "desktop"])
async def test_the_image_page_reads_on_a_phone_and_a_desktop(browser, site, viewport, tmp_path):
    job = site.hostile
    context, page, dialogs = await visit(browser, site, f"/i/{job.sha256}", viewport, tmp_path)
    try:
        assert dialogs == []  # the hostile prompt ran nothing
        assert await page.locator("h1").inner_text() == HOSTILE
        facts = dict(zip(await page.locator("dt").all_inner_texts(), await page.locator("dd").all_inner_texts()))
        assert facts["Prompt"] == HOSTILE and facts["Negative prompt"] == "<b>bold</b> & blurry"
        assert facts["Seed"] == str(job.seed) and facts["Size"] == "768\u00d7512"
        slash, command = await page.locator("pre code").all_inner_texts()
        assert slash.startswith(f"/imagine prompt:{HOSTILE}") and command.startswith("easel imagine '")
        main = page.locator("figure img")
        assert await main.evaluate("i => i.naturalWidth") == 24  # the stored image, loaded
        assert await page.locator(".card").count() == 2  # its variations
        assert await fits_the_width(page)
        figure, facts_box = await page.locator("figure").bounding_box(), await page.locator("section").bounding_box()
        if viewport is PHONE:  # stacked: the facts under the image
            assert facts_box["y"] >= figure["y"] + figure["height"] - 1
            assert figure["width"] <= viewport["width"]
        else:  # side by side
            assert abs(facts_box["y"] - figure["y"]) < 2 and facts_box["x"] > figure["x"] + figure["width"]
    finally:
        await context.close()


@pytest.mark.parametrize("viewport", [PHONE, DESKTOP], ids=["phone", "desktop"])
async def test_a_members_page_is_a_grid_that_pages(browser, site, viewport, tmp_path):
    context, page, dialogs = await visit(browser, site, f"/u/{site.hostile.user_id}", viewport, tmp_path)
    try:
        cards = page.locator(".card")
        assert await cards.count() == 24
        assert await fits_the_width(page)
        boxes = [await cards.nth(i).bounding_box() for i in range(4)]
        per_row = sum(1 for b in boxes if abs(b["y"] - boxes[0]["y"]) < 1)
        assert per_row == (2 if viewport is PHONE else 4)  # 390px: two columns; 1280px: six or so
        assert await cards.first.locator("img").evaluate("i => i.naturalWidth") == 24
        await page.get_by_text("Older \u2192").click()
        await page.wait_for_url("**/u/111?page=2")
        assert await page.locator(".card").count() == 31 - 24
        await page.get_by_text("\u2190 Newer").click()
        await page.wait_for_url("**/u/111?page=1")
        assert dialogs == []
    finally:
        await context.close()


async def test_the_guild_page_and_the_delete_button_work(browser, site, tmp_path):
    context, page, _ = await visit(browser, site, f"/g/{GUILD}", PHONE, tmp_path)
    try:
        victim = site.jobs[0]
        link = site.gallery.delete_link(victim)
        await page.goto(link)
        await page.screenshot(path=str(tmp_path / "delete-390x844.png"))
        assert "Delete this image from the gallery?" in await page.locator("h1").inner_text()
        await page.get_by_role("button", name="Delete from the gallery").click()
        await page.wait_for_load_state()
        assert "no longer in the gallery" in await page.locator("main").inner_text()
        gone = await page.goto(f"{site.base}/i/{victim.sha256}")
        assert gone.status == 404
    finally:
        await context.close()
