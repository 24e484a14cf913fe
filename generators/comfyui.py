"""ComfyUI servers running workflows exported from ComfyUI in API format ("Save (API Format)"):
each `[generators.comfyui.workflows]` entry is a model of easel's.

In a workflow, an input whose whole value is one of the strings "$prompt", "$negative",
"$seed", "$width", "$height", "$steps", "$guidance", "$strength", "$image" or "$mask" is
replaced by the request's value, typed (seed, width, height and steps as integers, guidance and
strength as numbers, images as the names ComfyUI gave their uploads). What a workflow can do
follows from its placeholders: "$image" makes it a variation (img2img) workflow, "$image" and
"$mask" an edit (inpainting) workflow, "$seed" lets it honour seeds, "$negative" take a negative
prompt, "$steps" and "$guidance" take those settings.

A job, on ComfyUI's own protocol (server.py, execution.py): open `/ws?clientId=<id>`, upload
inputs with `POST /upload/image`, `POST /prompt` {"prompt", "client_id"}, follow `progress`
messages and binary preview frames until `executing` with node null (or `execution_error`),
then `GET /history/{prompt_id}` and `GET /view` for the image. A cancelled job is deleted from
`/queue` while it waits, else interrupted (`POST /interrupt`).
"""
from __future__ import annotations

import asyncio
import json
import logging
import secrets
import struct
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bot.core.models import (
    GeneratedImage,
    GenerationRequest,
    GeneratorError,
    Kind,
    ModelSpec,
    ProgressCallback,
    TransientGeneratorError,
    UnsupportedRequest,
)
from generators.download import MAX_IMAGE_BYTES, checked_png
from generators.gpu_servers import Server, ServerDown, ServerPool, SessionOwner, describe_failure, get_json

if TYPE_CHECKING:
    import aiohttp

log = logging.getLogger(__name__)

PROVIDER = "comfyui"
PLACEHOLDERS = ("$prompt", "$negative", "$seed", "$width", "$height", "$steps", "$guidance",
                "$strength", "$image", "$mask")
DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 7.0
DEFAULT_STRENGTH = {Kind.VARIATION: 0.6, Kind.EDIT: 1.0}
MAX_WORKFLOW_BYTES = 5 * 2**20
STOP_TIMEOUT_S = 5.0  # for telling a server to stop a cancelled job
# Binary websocket frames (server.py BinaryEventTypes): a 4-byte big-endian event type, then
# for PREVIEW_IMAGE a 4-byte image type (1 JPEG, 2 PNG) and the image; for
# PREVIEW_IMAGE_WITH_METADATA a 4-byte length, that much JSON ({"prompt_id", ...}), the image.
PREVIEW_IMAGE = 1
PREVIEW_IMAGE_WITH_METADATA = 4


@dataclass(frozen=True)
class Workflow:
    name: str
    path: Path
    graph: Mapping[str, Any]  # node id -> {"class_type", "inputs"}
    placeholders: frozenset[str]
    fixed_size: tuple[int, int] | None  # what it makes when it has no $width/$height

    def spec(self) -> ModelSpec:
        has = self.placeholders.__contains__
        kinds = {Kind.EDIT} if has("$mask") else {Kind.VARIATION} if has("$image") else {Kind.IMAGINE}
        sized = has("$width")
        return ModelSpec(
            name=self.name,
            provider=PROVIDER,
            kinds=frozenset(kinds),
            honours_seed=has("$seed"),
            negative_prompt=has("$negative"),
            sizes=None if sized or self.fixed_size is None else (self.fixed_size,),
            default_size=self.fixed_size or (1024, 1024),
            steps=(1, 200) if has("$steps") else None,
            guidance=(0.0, 30.0) if has("$guidance") else None,
            default_guidance=DEFAULT_GUIDANCE if has("$guidance") else None,
            description=f"ComfyUI workflow {self.path.name}",
        )


def load_workflow(name: str, path: str | Path) -> Workflow:
    """Read and check one workflow file; ValueError naming the file when it is not usable."""
    path = Path(path)
    where = f"ComfyUI workflow {name!r} ({path})"
    try:
        if path.stat().st_size > MAX_WORKFLOW_BYTES:
            raise ValueError(f"{where} is over {MAX_WORKFLOW_BYTES // 2**20} MiB: not a workflow")
        graph = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{where}: no such file") from None
    except UnicodeDecodeError:
        raise ValueError(f"{where} is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where} is not valid JSON ({exc})") from None
    except OSError as exc:
        raise ValueError(f"{where} cannot be read ({exc.strerror or exc})") from None
    if isinstance(graph, dict) and "nodes" in graph and "links" in graph:
        raise ValueError(f"{where} is in ComfyUI's UI format; export it with \"Save (API Format)\"")
    if not graph or not isinstance(graph, dict) or not all(_is_node(n) for n in graph.values()):
        raise ValueError(f"{where} is not in API format (node id -> {{\"class_type\", \"inputs\"}})")
    found = {v for node in graph.values() for v in node["inputs"].values()
             if isinstance(v, str) and v.startswith("$")}
    unknown = sorted(found - set(PLACEHOLDERS))
    if unknown:
        raise ValueError(f"{where} has unknown placeholders {', '.join(unknown)}; known: {', '.join(PLACEHOLDERS)}")
    _check_placeholders(where, found)
    fixed = None if "$width" in found else _fixed_size(graph)
    if fixed is None and "$width" not in found and "$image" not in found:
        raise ValueError(f"{where} has neither $width/$height nor a node with a fixed width and height")
    return Workflow(name, path, graph, frozenset(found), fixed)


def _is_node(node: Any) -> bool:
    return isinstance(node, dict) and isinstance(node.get("class_type"), str) and isinstance(
        node.get("inputs"), dict)


def _check_placeholders(where: str, found: set[str]) -> None:
    if "$prompt" not in found:
        raise ValueError(f"{where} has no \"$prompt\" placeholder: put it where the prompt goes")
    if ("$width" in found) != ("$height" in found):
        raise ValueError(f"{where} needs both $width and $height, or neither")
    if "$mask" in found and "$image" not in found:
        raise ValueError(f"{where} has $mask without $image")


def _fixed_size(graph: Mapping[str, Any]) -> tuple[int, int] | None:
    for node in graph.values():
        w, h = node["inputs"].get("width"), node["inputs"].get("height")
        if type(w) is int and type(h) is int:
            return w, h
    return None


def fill(graph: Mapping[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of `graph` with every input whose whole value is a placeholder replaced by its value."""
    return {
        node_id: {**node, "inputs": {
            key: values[v] if isinstance(v, str) and v in values else v for key, v in node["inputs"].items()}}
        for node_id, node in graph.items()
    }


def request_values(request: GenerationRequest, seed: int) -> dict[str, Any]:
    """The typed value of each placeholder for `request` (images are added once uploaded)."""
    return {
        "$prompt": request.prompt,
        "$negative": request.negative_prompt or "",
        "$seed": int(seed),
        "$width": int(request.width),
        "$height": int(request.height),
        "$steps": int(request.steps if request.steps is not None else DEFAULT_STEPS),
        "$guidance": float(request.guidance if request.guidance is not None else DEFAULT_GUIDANCE),
        "$strength": float(request.strength if request.strength is not None
                           else DEFAULT_STRENGTH.get(request.kind, 1.0)),
    }


def _short(text: Any, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def describe_refusal(body: Any) -> str:
    """ComfyUI's 400 answer to /prompt ({"error": {...}, "node_errors": {...}}) in one line."""
    if not isinstance(body, dict):
        return "an answer that is not JSON"
    error = body.get("error")
    parts = [_short(error.get("message") or error.get("type") or error) if isinstance(error, dict)
             else _short(error or "refused")]
    for node_id, node in (body.get("node_errors") or {}).items():
        if not isinstance(node, dict):
            continue
        for err in node.get("errors") or []:
            detail = f": {err.get('details')}" if err.get("details") else ""
            parts.append(f"node {node_id} ({node.get('class_type', '?')}): {err.get('message', '?')}{detail}")
    return _short("; ".join(parts), 600)


def read_preview(frame: bytes) -> bytes | None:
    """The image of a binary preview frame, or None for other frames."""
    if len(frame) < 8:
        return None
    (event,) = struct.unpack(">I", frame[:4])
    if event == PREVIEW_IMAGE:
        return frame[8:]
    if event == PREVIEW_IMAGE_WITH_METADATA:
        (length,) = struct.unpack(">I", frame[4:8])
        return frame[8 + length:]
    return None


class ComfyUI(SessionOwner):
    """Generator for ComfyUI servers; jobs go to the least-loaded healthy one."""

    provider = PROVIDER

    def __init__(
        self,
        servers: list[str],
        workflows: Mapping[str, str | Path],
        *,
        price_per_image_usd: float = 0.0,
        timeout_s: float = 300.0,
        down_for_s: float = 30.0,
    ):
        if not workflows:
            raise ValueError("no workflows: add [generators.comfyui.workflows] name = \"workflow_api.json\"")
        if price_per_image_usd < 0:
            raise ValueError(f"price_per_image_usd cannot be negative, not {price_per_image_usd}")
        self._workflows = {name: load_workflow(name, path) for name, path in workflows.items()}
        self._specs = {name: w.spec() for name, w in self._workflows.items()}
        self._pool = ServerPool(servers, _probe, what="ComfyUI", down_for_s=down_for_s)
        self._price = float(price_per_image_usd)
        self._timeout_s = timeout_s
        self._session: aiohttp.ClientSession | None = None

    def models(self) -> list[ModelSpec]:
        return list(self._specs.values())

    def unavailable_reason(self) -> str | None:
        return None  # the servers' health is probed for each job

    def estimate_cost(self, request: GenerationRequest) -> float:
        return self._price


    async def generate(
        self, request: GenerationRequest, progress: ProgressCallback | None = None
    ) -> GeneratedImage:
        workflow = self._workflows.get(request.model)
        if workflow is None:
            raise UnsupportedRequest(f"model {request.model!r} is not a ComfyUI workflow here")
        spec = self._specs[workflow.name]
        spec.check(request)
        if "$image" in workflow.placeholders and request.source_image is None:
            raise UnsupportedRequest(f"{spec.name} needs an input image")
        seed = request.seed if request.seed is not None else secrets.randbelow(2**31)
        session = self._http()
        server = await self._pool.pick(session)
        with self._pool.claim(server):
            data = await _Job(self, session, server, workflow, progress).run(request, seed)
        fetched = await checked_png(data, expected_size=(request.width, request.height))
        return GeneratedImage(
            data=fetched.png, width=fetched.width, height=fetched.height, model=spec.name,
            provider=PROVIDER, seed=seed if spec.honours_seed else None, cost_usd=self._price,
        )


async def _probe(session: aiohttp.ClientSession, url: str) -> int:
    """Jobs running and waiting on a ComfyUI server; its /system_stats must answer too."""
    queue, stats = await asyncio.gather(get_json(session, f"{url}/queue", "/queue"),
                                        get_json(session, f"{url}/system_stats", "/system_stats"))
    if not isinstance(queue, dict) or not isinstance(stats, dict) or "devices" not in stats:
        raise ServerDown("/queue or /system_stats answered in an unknown format (is it ComfyUI?)")
    return len(queue.get("queue_running") or []) + len(queue.get("queue_pending") or [])


class _Job:
    """One workflow run on one server."""

    def __init__(self, gen: ComfyUI, session: aiohttp.ClientSession, server: Server, workflow: Workflow,
                 progress: ProgressCallback | None):
        self.gen, self.session, self.server, self.workflow = gen, session, server, workflow
        self.url = server.url
        self.progress = progress
        self.prompt_id: str | None = None
        self.fraction = 0.0

    async def run(self, request: GenerationRequest, seed: int) -> bytes:
        """The output image's bytes; TransientGeneratorError when the server fails or dies."""
        import aiohttp

        client_id = uuid.uuid4().hex
        try:
            async with asyncio.timeout(self.gen._timeout_s):
                async with self.session.ws_connect(f"{self.url}/ws?clientId={client_id}", heartbeat=30,
                                                   max_msg_size=MAX_IMAGE_BYTES) as ws:
                    values = request_values(request, seed)
                    values.update(await self._uploads(request))
                    await self._submit(fill(self.workflow.graph, values), client_id)
                    await self._follow(ws)
                return await self._output()
        except asyncio.CancelledError:
            await self._stop()
            raise
        except TimeoutError:
            await self._stop()
            raise TransientGeneratorError(
                f"ComfyUI at {self.url} did not finish within {self.gen._timeout_s:g} s") from None
        except (aiohttp.ClientError, ServerDown) as exc:
            self.gen._pool.mark_down(self.server, describe_failure(exc))
            raise TransientGeneratorError(
                f"ComfyUI at {self.url} failed mid-job: {describe_failure(exc)}") from None

    async def _uploads(self, request: GenerationRequest) -> dict[str, str]:
        names = {}
        wanted = [("$image", request.source_image), ("$mask", request.mask_image)]
        for placeholder, png in wanted:
            if placeholder not in self.workflow.placeholders:
                continue
            mode = "L" if placeholder == "$mask" else "RGB"
            data = await asyncio.to_thread(_input_png, png, (request.width, request.height), mode)
            names[placeholder] = await self._upload(data)
        return names

    async def _upload(self, png: bytes) -> str:
        import aiohttp

        form = aiohttp.FormData()
        form.add_field("image", png, filename=f"easel-{uuid.uuid4().hex}.png", content_type="image/png")
        form.add_field("overwrite", "true")
        form.add_field("type", "input")
        async with self.session.post(f"{self.url}/upload/image", data=form) as resp:
            body = await _json_or_none(resp)
            if resp.status != 200 or not isinstance(body, dict) or "name" not in body:
                raise self._http_error("/upload/image", resp.status, body)
        sub = body.get("subfolder") or ""
        return f"{sub}/{body['name']}" if sub else body["name"]

    async def _submit(self, graph: dict[str, Any], client_id: str) -> None:
        async with self.session.post(f"{self.url}/prompt", json={"prompt": graph, "client_id": client_id}) as resp:
            body = await _json_or_none(resp)
            if resp.status == 200 and isinstance(body, dict) and isinstance(body.get("prompt_id"), str):
                self.prompt_id = body["prompt_id"]
                return
            raise self._http_error("/prompt", resp.status, body)

    def _http_error(self, route: str, status: int, body: Any) -> GeneratorError:
        if status >= 500:
            return TransientGeneratorError(f"ComfyUI at {self.url} failed with HTTP {status} on {route}")
        if status == 200:
            return GeneratorError(f"ComfyUI at {self.url} answered {route} in an unknown format")
        return GeneratorError(
            f"ComfyUI refused workflow {self.workflow.name} (HTTP {status}): {describe_refusal(body)}")

    async def _follow(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        """Read the websocket until our prompt is done; raise on its error or a closed socket."""
        import aiohttp

        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.BINARY:
                await self._preview(msg.data)
            elif msg.type == aiohttp.WSMsgType.TEXT and self._handle(_message(msg.data)):
                return
        raise ServerDown("the server closed the websocket before the job finished")

    def _handle(self, message: Any) -> bool:
        """Act on one JSON message; True once our prompt has finished."""
        kind, data = message.get("type"), message.get("data")
        if not isinstance(data, dict) or data.get("prompt_id") not in (None, self.prompt_id):
            return False
        if kind == "progress" and isinstance(data.get("value"), int) and isinstance(data.get("max"), int) \
                and data["max"] > 0:
            self.fraction = min(1.0, max(0.0, data["value"] / data["max"]))
            if self.progress:
                self.progress(self.fraction, None)
        elif kind == "execution_error":
            raise GeneratorError(
                f"ComfyUI workflow {self.workflow.name} failed in node {data.get('node_id')} "
                f"({data.get('node_type')}): {data.get('exception_type', 'error')}: "
                f"{_short(data.get('exception_message', ''))}")
        elif kind == "execution_interrupted":
            raise TransientGeneratorError(f"the job was interrupted on ComfyUI at {self.url}")
        elif kind == "execution_success" or (kind == "executing" and data.get("node") is None
                                             and data.get("prompt_id") == self.prompt_id):
            return self.prompt_id is not None
        return False

    async def _preview(self, frame: bytes) -> None:
        image = read_preview(frame)
        if image is None or self.progress is None:
            return
        png = await asyncio.to_thread(_preview_png, image)
        if png is not None:
            self.progress(self.fraction, png)

    async def _output(self) -> bytes:
        history = await get_json(self.session, f"{self.url}/history/{self.prompt_id}", "/history")
        entry = history.get(self.prompt_id) if isinstance(history, dict) else None
        if not isinstance(entry, dict):
            raise GeneratorError(f"ComfyUI at {self.url} has no history for the job")
        images = [img for out in (entry.get("outputs") or {}).values() if isinstance(out, dict)
                  for img in out.get("images") or [] if isinstance(img, dict) and "filename" in img]
        images.sort(key=lambda img: img.get("type") != "output")  # saved outputs before previews
        if not images:
            raise GeneratorError(f"ComfyUI workflow {self.workflow.name} made no image (has it a SaveImage node?)")
        first = images[0]
        query = {"filename": first["filename"], "subfolder": first.get("subfolder", ""),
                 "type": first.get("type", "output")}
        return await _read_bounded(self.session, f"{self.url}/view", query)

    async def _stop(self) -> None:
        """Delete our prompt from the queue while it waits, else interrupt it (best effort)."""
        if self.prompt_id is None:
            return
        import aiohttp

        try:
            async with asyncio.timeout(STOP_TIMEOUT_S):
                queue = await get_json(self.session, f"{self.url}/queue", "/queue")
                if self.prompt_id in _ids(queue, "queue_pending"):
                    async with self.session.post(f"{self.url}/queue", json={"delete": [self.prompt_id]}):
                        pass
                    queue = await get_json(self.session, f"{self.url}/queue", "/queue")
                if self.prompt_id in _ids(queue, "queue_running"):
                    async with self.session.post(f"{self.url}/interrupt", json={"prompt_id": self.prompt_id}):
                        pass
        except (TimeoutError, aiohttp.ClientError, ServerDown) as exc:
            log.warning("could not stop ComfyUI job %s at %s: %s", self.prompt_id, self.url,
                        describe_failure(exc))


def _message(text: str) -> dict[str, Any]:
    """A websocket text message as a dict ({} for anything else: it is ignored)."""
    try:
        message = json.loads(text)
    except ValueError:
        return {}
    return message if isinstance(message, dict) else {}


def _ids(queue: Any, key: str) -> set[str]:
    """The prompt ids in a /queue list (items are [number, prompt_id, prompt, extra, outputs])."""
    items = queue.get(key) or [] if isinstance(queue, dict) else []
    return {item[1] for item in items if isinstance(item, list) and len(item) > 1}


async def _json_or_none(resp: aiohttp.ClientResponse) -> Any:
    try:
        return await resp.json(content_type=None)
    except ValueError:
        return None


async def _read_bounded(session: aiohttp.ClientSession, url: str, query: dict[str, str]) -> bytes:
    async with session.get(url, params=query) as resp:
        if resp.status != 200:
            raise GeneratorError(f"ComfyUI answered HTTP {resp.status} for its output image")
        body = bytearray()
        async for chunk in resp.content.iter_chunked(64 * 1024):
            body += chunk
            if len(body) > MAX_IMAGE_BYTES:
                raise GeneratorError(f"ComfyUI's output image is over {MAX_IMAGE_BYTES // 2**20} MiB")
        return bytes(body)


def _input_png(png: bytes | None, size: tuple[int, int], mode: str) -> bytes:
    """An input image at the request's size (a missing mask: all white, everything redrawn)."""
    from PIL import Image

    from generators.images import decode_image, encode_png

    if png is None:
        return encode_png(Image.new(mode, size, 255))
    image = decode_image(png).image.convert(mode)
    if image.size != size:
        image = image.resize(size, Image.Resampling.LANCZOS)
    return encode_png(image)


def _preview_png(data: bytes) -> bytes | None:
    """A preview frame's image as PNG, or None when it does not decode."""
    from generators.images import ImageRejected, decode_image, encode_png

    try:
        return encode_png(decode_image(data, max_pixels=4096 * 4096).image)
    except ImageRejected:
        return None
