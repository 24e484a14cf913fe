"""AUTOMATIC1111's Stable Diffusion web UI (and SD.Next and Forge, which keep its API), started
with `--api`: `POST /sdapi/v1/txt2img` and `/sdapi/v1/img2img` (inpainting with a mask), answered
with base64 images and an `info` string (JSON) holding the seed used; `GET /sdapi/v1/progress`
for progress and the current preview while a job runs; `POST /sdapi/v1/interrupt` to stop one.

Each checkpoint the servers have is a model of easel's, `a1111/<model_name>`, sent as
`override_settings.sd_model_checkpoint`; their samplers are the `sampler` option (as slugs:
"DPM++ 2M" is `dpmpp_2m`, "Euler a" `euler_a`). `models()` is synchronous (the router reads it
when it is built), so the servers are asked for their checkpoints and samplers
(`/sdapi/v1/sd-models`, `/sdapi/v1/samplers`) once, on the first call, all at once with a
bounded wait (`discovery_timeout_s`), and the answer kept for the generator's life. That call
happens at start-up or on a reload; a server that does not answer then is left out of the
catalogue (its checkpoints are unknown) but still takes jobs for models listed in the settings.

A1111 reports progress for whatever job it is running: while a job waits behind another
client's, the progress shown is that job's; and `/interrupt` stops the running job.
"""
from __future__ import annotations

import asyncio
import base64
import json
import logging
import secrets
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from bot.core.models import (
    GeneratedImage,
    GenerationRequest,
    GeneratorError,
    GeneratorUnavailable,
    Kind,
    ModelSpec,
    ProgressCallback,
    TransientGeneratorError,
)
from generators.cloud import find_model
from generators.download import image_from_b64
from generators.gpu_servers import (
    ServerDown,
    ServerPool,
    SessionOwner,
    describe_failure,
    get_json,
    server_urls,
)

if TYPE_CHECKING:
    import aiohttp

log = logging.getLogger(__name__)

PROVIDER = "a1111"
PREFIX = "a1111/"
DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 7.0
DEFAULT_STRENGTH = {Kind.VARIATION: 0.6, Kind.EDIT: 0.75}  # an edit with a mask: 1.0
MAX_DISCOVERY_BYTES = 4 * 2**20
STOP_TIMEOUT_S = 5.0


def sampler_slug(name: str) -> str:
    """An A1111 sampler name as an option value: "DPM++ 2M Karras" -> "dpmpp_2m_karras"."""
    return "_".join(name.lower().replace("++", "pp").split())


@dataclass
class Catalogue:
    """What the servers said they have."""

    checkpoints: dict[str, str] = field(default_factory=dict)  # model_name -> title
    where: dict[str, set[str]] = field(default_factory=dict)  # model_name -> server URLs
    samplers: dict[str, str] = field(default_factory=dict)  # slug -> name
    problems: list[str] = field(default_factory=list)  # servers that did not answer, and why


def _fetch_json(url: str, timeout_s: float) -> Any:
    # Directly, never through a proxy from the environment (aiohttp does not use one either).
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=timeout_s) as resp:
        return json.loads(resp.read(MAX_DISCOVERY_BYTES + 1)[:MAX_DISCOVERY_BYTES])


def _ask(url: str, timeout_s: float) -> tuple[list[Any], list[Any]]:
    return (_fetch_json(f"{url}/sdapi/v1/sd-models", timeout_s),
            _fetch_json(f"{url}/sdapi/v1/samplers", timeout_s))


def discover(urls: Sequence[str], timeout_s: float) -> Catalogue:
    """Ask every server for its checkpoints and samplers, all at once (blocking, bounded)."""
    found = Catalogue()
    with ThreadPoolExecutor(max_workers=len(urls)) as pool:
        futures = [(url, pool.submit(_ask, url, timeout_s)) for url in urls]
        for url, future in futures:
            try:
                models, samplers = future.result()
                for item in models:
                    found.checkpoints.setdefault(item["model_name"], item["title"])
                    found.where.setdefault(item["model_name"], set()).add(url)
                for item in samplers:
                    found.samplers.setdefault(sampler_slug(item["name"]), item["name"])
            except (OSError, ValueError, TypeError, KeyError) as exc:
                why = getattr(exc, "reason", None) or exc
                found.problems.append(f"{url}: {why}")
    return found


async def _probe(session: aiohttp.ClientSession, url: str) -> int:
    """The jobs an A1111 server is running (its state's job_count)."""
    body = await get_json(session, f"{url}/sdapi/v1/progress?skip_current_image=true", "/sdapi/v1/progress")
    state = body.get("state") if isinstance(body, dict) else None
    if not isinstance(state, dict):
        raise ServerDown("/sdapi/v1/progress answered in an unknown format (is it AUTOMATIC1111?)")
    return max(int(state.get("job_count") or 0), 0)


def describe_error(status: int, body: Any) -> str:
    """A1111's error answer ({"error", "detail", "body", "errors"}, or FastAPI's {"detail": [...]})."""
    if not isinstance(body, dict):
        return "an answer that is not JSON"
    detail = body.get("detail")
    if isinstance(detail, list):  # 422: FastAPI's validation errors
        return "; ".join(f"{'.'.join(map(str, d.get('loc', [])))}: {d.get('msg')}" for d in detail
                         if isinstance(d, dict))[:600]
    parts = [str(body[k]) for k in ("error", "detail", "errors") if body.get(k)]
    return " ".join(": ".join(parts).split())[:600] or f"HTTP {status}"


class Automatic1111(SessionOwner):
    """Generator for AUTOMATIC1111-compatible servers; jobs go to the least-loaded healthy one."""

    provider = PROVIDER

    def __init__(
        self,
        servers: list[str],
        models: list[str] | None = None,
        *,
        price_per_image_usd: float = 0.0,
        timeout_s: float = 300.0,
        sampler: str = "",
        poll_interval_s: float = 1.0,
        discovery_timeout_s: float = 5.0,
        down_for_s: float = 30.0,
    ):
        if price_per_image_usd < 0:
            raise ValueError(f"price_per_image_usd cannot be negative, not {price_per_image_usd}")
        self._urls = server_urls(servers, "AUTOMATIC1111")
        self._pool = ServerPool(self._urls, _probe, what="AUTOMATIC1111", down_for_s=down_for_s)
        self._wanted = list(models) if models else None
        self._price = float(price_per_image_usd)
        self._timeout_s = timeout_s
        self._sampler = sampler  # "": the server's own default
        self._poll_interval_s = poll_interval_s
        self._discovery_timeout_s = discovery_timeout_s
        self._catalogue: Catalogue | None = None
        self._specs: list[ModelSpec] | None = None
        self._session: aiohttp.ClientSession | None = None

    def catalogue(self) -> Catalogue:
        """The servers' checkpoints and samplers, asked for once (blocking on the first call)."""
        if self._catalogue is None:
            self._catalogue = discover(self._urls, self._discovery_timeout_s)
            for problem in self._catalogue.problems:
                log.warning("AUTOMATIC1111 server did not list its models: %s", problem)
        return self._catalogue

    def models(self) -> list[ModelSpec]:
        if self._specs is None:
            found = self.catalogue()
            names = list(found.checkpoints)
            if self._wanted is not None:
                titles = {title: name for name, title in found.checkpoints.items()}
                names = [titles.get(w, w) for w in self._wanted]
                missing = [n for n in names if n not in found.checkpoints]
                if missing and found.checkpoints:
                    log.warning("no AUTOMATIC1111 server that answered has %s", ", ".join(missing))
            options = {"sampler": ("default", *found.samplers)}
            self._specs = [self._spec(name, options) for name in names]
        return list(self._specs)

    def _spec(self, checkpoint: str, options: dict[str, tuple[str, ...]]) -> ModelSpec:
        return ModelSpec(
            name=PREFIX + checkpoint, provider=PROVIDER,
            kinds=frozenset({Kind.IMAGINE, Kind.VARIATION, Kind.EDIT}),
            default_guidance=DEFAULT_GUIDANCE, options=options,
            default_size=(1024, 1024) if "xl" in checkpoint.lower() else (512, 512),
            description=f"checkpoint {self.catalogue().checkpoints.get(checkpoint, checkpoint)} on AUTOMATIC1111",
        )

    def unavailable_reason(self) -> str | None:
        if self.models():
            return None
        found = self.catalogue()
        if found.problems:
            return f"no AUTOMATIC1111 server listed its checkpoints ({'; '.join(found.problems)})"
        return "the AUTOMATIC1111 servers have no checkpoints"

    def estimate_cost(self, request: GenerationRequest) -> float:
        return self._price


    def _body(self, request: GenerationRequest, seed: int) -> dict[str, Any]:
        checkpoint = request.model.removeprefix(PREFIX)
        sampler = request.options.get("sampler", "default")
        sampler_name = self._sampler if sampler == "default" else self.catalogue().samplers[sampler]
        body: dict[str, Any] = {
            "prompt": request.prompt,
            "negative_prompt": request.negative_prompt or "",
            "seed": seed,
            "width": request.width,
            "height": request.height,
            "steps": request.steps if request.steps is not None else DEFAULT_STEPS,
            "cfg_scale": request.guidance if request.guidance is not None else DEFAULT_GUIDANCE,
            "batch_size": 1,
            "n_iter": 1,
            "send_images": True,
            "save_images": False,
            "override_settings": {"sd_model_checkpoint": self.catalogue().checkpoints.get(checkpoint, checkpoint)},
        }
        if sampler_name:
            body["sampler_name"] = sampler_name
        if request.kind != Kind.IMAGINE:
            body.update(self._img2img(request))
        return body

    @staticmethod
    def _img2img(request: GenerationRequest) -> dict[str, Any]:
        masked = request.mask_image is not None
        strength = request.strength
        if strength is None:
            strength = 1.0 if masked else DEFAULT_STRENGTH[request.kind]
        assert request.source_image is not None, "the planner gives variations and edits an image"
        fields: dict[str, Any] = {
            "init_images": [base64.b64encode(request.source_image).decode()],
            "denoising_strength": strength,
            "resize_mode": 0,
        }
        if masked:
            assert request.mask_image is not None
            fields.update(mask=base64.b64encode(request.mask_image).decode(), mask_blur=4,
                          inpainting_fill=1, inpaint_full_res=False, inpainting_mask_invert=0)
        return fields

    async def generate(
        self, request: GenerationRequest, progress: ProgressCallback | None = None
    ) -> GeneratedImage:
        spec = find_model(tuple(self.models()), request.model)
        spec.check(request)
        seed = request.seed if request.seed is not None else secrets.randbelow(2**31)
        body = self._body(request, seed)
        route = "txt2img" if request.kind == Kind.IMAGINE else "img2img"
        session = self._http()
        server = await self._pool.pick(session, among=self.catalogue().where.get(spec.name.removeprefix(PREFIX)))
        with self._pool.claim(server):
            answer = await self._run(session, server, route, body, progress)
        images = answer.get("images") if isinstance(answer, dict) else None
        if not images or not isinstance(images[0], str):
            raise GeneratorError(f"AUTOMATIC1111 at {server.url} answered without an image")
        fetched = await image_from_b64(images[0], expected_size=(request.width, request.height))
        return GeneratedImage(
            data=fetched.png, width=fetched.width, height=fetched.height, model=spec.name,
            provider=PROVIDER, seed=_seed_of(answer, seed), cost_usd=self._price,
        )

    async def _run(self, session: aiohttp.ClientSession, server: Any, route: str, body: dict[str, Any],
                   progress: ProgressCallback | None) -> Any:
        """POST the job, polling progress meanwhile; the answer's JSON."""
        import aiohttp

        url = server.url
        poller = asyncio.create_task(self._poll(session, url, progress)) if progress else None
        try:
            async with asyncio.timeout(self._timeout_s):
                async with session.post(f"{url}/sdapi/v1/{route}", json=body) as resp:
                    answer = await _json_or_none(resp)
                    status = resp.status
        except asyncio.CancelledError:
            await self._interrupt(session, url)
            raise
        except TimeoutError:
            await self._interrupt(session, url)
            raise TransientGeneratorError(f"AUTOMATIC1111 at {url} did not finish within {self._timeout_s:g} s") from None
        except aiohttp.ClientError as exc:
            self._pool.mark_down(server, describe_failure(exc))
            raise TransientGeneratorError(f"AUTOMATIC1111 at {url} failed mid-job: {describe_failure(exc)}") from None
        finally:
            if poller is not None:
                poller.cancel()
                await asyncio.gather(poller, return_exceptions=True)
        if status == 200 and isinstance(answer, dict):
            return answer
        raise _http_error(url, route, status, answer)

    async def _poll(self, session: aiohttp.ClientSession, url: str, progress: ProgressCallback) -> None:
        """Report the server's progress and each new preview until cancelled; failures to poll
        are ignored (the job's own request decides how it ends)."""
        import aiohttp

        last_preview = None
        while True:
            await asyncio.sleep(self._poll_interval_s)
            try:
                body = await get_json(session, f"{url}/sdapi/v1/progress?skip_current_image=false", "progress")
            except (aiohttp.ClientError, ServerDown, TimeoutError):
                continue
            if not isinstance(body, dict) or not isinstance(body.get("progress"), (int, float)):
                continue
            preview, current = None, body.get("current_image")
            if isinstance(current, str) and current and current != last_preview:
                last_preview = current
                preview = await asyncio.to_thread(_preview_png, current)
            progress(min(1.0, max(0.0, float(body["progress"]))), preview)

    async def _interrupt(self, session: aiohttp.ClientSession, url: str) -> None:
        import aiohttp

        try:
            async with asyncio.timeout(STOP_TIMEOUT_S):
                async with session.post(f"{url}/sdapi/v1/interrupt"):
                    pass
        except (TimeoutError, aiohttp.ClientError) as exc:
            log.warning("could not interrupt the job at %s: %s", url, describe_failure(exc))


def _http_error(url: str, route: str, status: int, answer: Any) -> GeneratorError:
    message = describe_error(status, answer)
    if status == 404:
        return GeneratorUnavailable(f"AUTOMATIC1111 at {url} has no /sdapi/v1/{route} (start it with --api)")
    if status >= 500:
        return TransientGeneratorError(f"AUTOMATIC1111 at {url} failed with HTTP {status}: {message}")
    if status == 200:
        return GeneratorError(f"AUTOMATIC1111 at {url} answered {route} with {message}")
    return GeneratorError(f"AUTOMATIC1111 refused the job (HTTP {status}): {message}")


def _seed_of(answer: dict[str, Any], sent: int) -> int:
    """The seed the server used, from its `info` (a JSON string); the one sent if it has none."""
    try:
        info = json.loads(answer.get("info") or "{}")
    except (TypeError, ValueError):
        return sent
    seed = info.get("seed") if isinstance(info, dict) else None
    return seed if isinstance(seed, int) and not isinstance(seed, bool) else sent


async def _json_or_none(resp: aiohttp.ClientResponse) -> Any:
    try:
        return await resp.json(content_type=None)
    except ValueError:
        return None


def _preview_png(b64: str) -> bytes | None:
    from generators.images import ImageRejected, decode_image, encode_png

    try:
        data = base64.b64decode(b64.split(",", 1)[-1], validate=True)
        return encode_png(decode_image(data, max_pixels=4096 * 4096).image)
    except (ValueError, ImageRejected):
        return None
