"""A fake ComfyUI server on 127.0.0.1, speaking ComfyUI's wire format (server.py, execution.py):
`POST /prompt` validated against a small node catalogue (a placeholder left as a string where an
INT is due is refused as ComfyUI refuses it), `/ws?clientId=` with `status`,
`execution_start`, `execution_cached`, `executing`, `progress`, `executed`, `execution_error`,
`execution_interrupted` messages and binary preview frames (event 1, image type 1: JPEG),
`/history/{id}`, `/view`, `/upload/image`, `/queue` (GET, and POST with "delete"), `/interrupt`,
`/system_stats`. Outputs are real PNGs (Pillow) at the workflow's size, or its input image's.

Switches: `others_pending` (other clients' jobs in the queue, for load), `paused` (nothing starts:
a job stays pending), `step_delay_s` (a slow job), `die_after_steps` (closes every socket and
stops listening mid-job), `fail_after_steps` (an `execution_error` with that message).
"""
from __future__ import annotations

import asyncio
import io
import itertools
import json
import struct
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web
from PIL import Image

from tests.fakes.providers import image_bytes

CHECKPOINTS = ("v1-5-pruned-emaonly.safetensors", "sd_xl_base_1.0.safetensors")
LINK, INT, FLOAT, STR = "link", "INT", "FLOAT", "STRING"
# class_type -> input -> type (links are [node_id, output_index]); every node's inputs are required.
NODES: dict[str, dict[str, str]] = {
    "CheckpointLoaderSimple": {"ckpt_name": "ckpt"},
    "CLIPTextEncode": {"text": STR, "clip": LINK},
    "EmptyLatentImage": {"width": INT, "height": INT, "batch_size": INT},
    "KSampler": {"seed": INT, "steps": INT, "cfg": FLOAT, "sampler_name": STR, "scheduler": STR,
                 "denoise": FLOAT, "model": LINK, "positive": LINK, "negative": LINK, "latent_image": LINK},
    "VAEDecode": {"samples": LINK, "vae": LINK},
    "VAEEncode": {"pixels": LINK, "vae": LINK},
    "LoadImage": {"image": "upload"},
    "LoadImageMask": {"image": "upload", "channel": STR},
    "SetLatentNoiseMask": {"samples": LINK, "mask": LINK},
    "SaveImage": {"filename_prefix": STR, "images": LINK},
}
OUTPUT_NODES = {"SaveImage"}
SYSTEM_STATS = {
    "system": {"os": "posix", "python_version": "3.11.9", "comfyui_version": "0.3.40",
               "embedded_python": False, "ram_total": 64 * 2**30, "ram_free": 48 * 2**30},
    "devices": [{"name": "cuda:0 NVIDIA GeForce RTX 4090 : cudaMallocAsync", "type": "cuda", "index": 0,
                 "vram_total": 24 * 2**30, "vram_free": 20 * 2**30, "torch_vram_total": 0,
                 "torch_vram_free": 0}]}


@dataclass
class Prompt:
    prompt_id: str
    number: int
    graph: dict[str, Any]
    client_id: str
    interrupted: bool = False


@dataclass
class Recorded:
    method: str
    path: str
    json: Any = None
    form: dict[str, Any] = field(default_factory=dict)


RECORD = web.RequestKey("record", Recorded)


def _validation_error(node_id: str, class_type: str, kind: str, message: str, details: str) -> dict[str, Any]:
    return {"errors": [{"type": kind, "message": message, "details": details, "extra_info": {}}],
            "dependent_outputs": [], "class_type": class_type}


def node_error(node_id: str, node: dict[str, Any], uploads: dict[str, bytes]) -> dict[str, Any] | None:
    """ComfyUI's validation of one node: its class exists and every input has its type."""
    class_type = node.get("class_type")
    schema = NODES.get(class_type)
    if schema is None:
        return _validation_error(node_id, str(class_type), "invalid_prompt", f"Cannot execute because node {class_type} does not exist.", "")
    inputs = node.get("inputs") or {}
    for name, kind in schema.items():
        value = inputs.get(name)
        if name not in inputs:
            return _validation_error(node_id, class_type, "required_input_missing", "Required input is missing", name)
        ok = {LINK: lambda v: isinstance(v, list), STR: lambda v: isinstance(v, str),
              INT: lambda v: type(v) is int, FLOAT: lambda v: type(v) in (int, float),
              "ckpt": lambda v: isinstance(v, str) and v in CHECKPOINTS,
              "upload": lambda v: isinstance(v, str) and v in uploads}[kind](value)
        if not ok and kind in (INT, FLOAT):
            return _validation_error(node_id, class_type, "invalid_input_type",
                                     f"Failed to convert an input value to a {kind} value",
                                     f"{name}, {value}, could not convert string to {kind.lower()}: {value!r}")
        if not ok and kind == "ckpt":
            return _validation_error(node_id, class_type, "value_not_in_list", "Value not in list",
                                     f"ckpt_name: '{value}' not in {list(CHECKPOINTS)}")
        if not ok:
            return _validation_error(node_id, class_type, "custom_validation_failed",
                                     "Custom validation failed for node", f"{name} - Invalid image file: {value}")
    return None


class FakeComfyUI:
    def __init__(self) -> None:
        self.requests: list[Recorded] = []
        self.prompts: dict[str, Prompt] = {}  # every prompt accepted
        self.uploads: dict[str, bytes] = {}
        self.history: dict[str, Any] = {}
        self.outputs: dict[tuple[str, str, str], bytes] = {}  # (type, subfolder, filename) -> PNG
        self.pending: list[Prompt] = []
        self.running: Prompt | None = None
        self.others_pending = 0
        self.paused = False
        self.steps_default = 4
        self.step_delay_s = 0.0
        self.die_after_steps: int | None = None
        self.fail_after_steps: tuple[int, str] | None = None
        self.base_url = ""
        self._numbers = itertools.count()
        self._sockets: dict[str, set[web.WebSocketResponse]] = {}
        self._wake = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._worker: asyncio.Task | None = None

    # -- inspection --

    def calls(self, method: str, path: str) -> list[Recorded]:
        return [r for r in self.requests if r.method == method and r.path == path]

    # -- lifecycle --

    async def __aenter__(self) -> FakeComfyUI:
        app = web.Application(middlewares=[self._record], client_max_size=64 * 2**20)
        for route, handler in (("/prompt", self._prompt), ("/queue", self._queue_post),
                               ("/interrupt", self._interrupt), ("/upload/image", self._upload)):
            app.router.add_post(route, handler)
        for route, handler in (("/ws", self._ws), ("/queue", self._queue), ("/system_stats", self._stats),
                               ("/history/{prompt_id}", self._history), ("/view", self._view)):
            app.router.add_get(route, handler)
        self._runner = web.AppRunner(app, shutdown_timeout=0.2)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.base_url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        self._worker = asyncio.create_task(self._work())
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def stop(self) -> None:
        if self._worker is not None and self._worker is not asyncio.current_task():
            self._worker.cancel()
        for sockets in list(self._sockets.values()):
            for ws in list(sockets):
                await ws.close()
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    def resume(self) -> None:
        self.paused = False
        self._wake.set()

    # -- HTTP --

    @web.middleware
    async def _record(self, request: web.Request, handler: Any) -> web.StreamResponse:
        record = Recorded(request.method, request.path)
        if request.content_type == "application/json":
            record.json = await request.json()
        elif request.content_type == "multipart/form-data":
            async for part in await request.multipart():
                record.form[part.name] = (part.filename, bytes(await part.read()))
        self.requests.append(record)
        request[RECORD] = record
        return await handler(request)

    async def _stats(self, request: web.Request) -> web.Response:
        return web.json_response(SYSTEM_STATS)

    def _item(self, p: Prompt) -> list[Any]:
        return [p.number, p.prompt_id, p.graph, {"client_id": p.client_id}, ["9"]]

    async def _queue(self, request: web.Request) -> web.Response:
        others = [[1000 + i, f"other-{i}", {}, {"client_id": "other"}, []] for i in range(self.others_pending)]
        running = [self._item(self.running)] if self.running else []
        return web.json_response({"queue_running": running,
                                  "queue_pending": [self._item(p) for p in self.pending] + others})

    async def _queue_post(self, request: web.Request) -> web.Response:
        body = request[RECORD].json or {}
        if body.get("clear"):
            self.pending.clear()
        for prompt_id in body.get("delete") or []:
            self.pending = [p for p in self.pending if p.prompt_id != prompt_id]
        return web.Response(status=200)

    async def _interrupt(self, request: web.Request) -> web.Response:
        body = request[RECORD].json or {}
        if self.running and body.get("prompt_id") in (None, self.running.prompt_id):
            self.running.interrupted = True
        return web.Response(status=200)

    async def _upload(self, request: web.Request) -> web.Response:
        form = request[RECORD].form
        if "image" not in form:
            return web.Response(status=400)
        filename, data = form["image"]
        self.uploads[filename] = data
        return web.json_response({"name": filename, "subfolder": "", "type": "input"})

    async def _history(self, request: web.Request) -> web.Response:
        prompt_id = request.match_info["prompt_id"]
        return web.json_response({prompt_id: self.history[prompt_id]} if prompt_id in self.history else {})

    async def _view(self, request: web.Request) -> web.Response:
        key = (request.query.get("type"), request.query.get("subfolder"), request.query.get("filename"))
        data = self.outputs.get(key)
        if data is None:
            return web.Response(status=404)
        return web.Response(body=data, content_type="image/png")

    async def _prompt(self, request: web.Request) -> web.Response:
        body = request[RECORD].json or {}
        graph = body.get("prompt")
        if not isinstance(graph, dict):
            return web.json_response({"error": {"type": "invalid_prompt", "message": "Cannot execute because a node is missing the class_type property.", "details": "", "extra_info": {}}, "node_errors": []}, status=400)
        if not any(n.get("class_type") in OUTPUT_NODES for n in graph.values()):
            return web.json_response({"error": {"type": "prompt_no_outputs", "message": "Prompt has no outputs", "details": "", "extra_info": {}}, "node_errors": []}, status=400)
        errors = {nid: err for nid, node in graph.items() if (err := node_error(nid, node, self.uploads))}
        if errors:
            return web.json_response({"error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation", "details": "", "extra_info": {}}, "node_errors": errors}, status=400)
        prompt = Prompt(str(uuid.uuid4()), next(self._numbers), graph, body.get("client_id", ""))
        self.prompts[prompt.prompt_id] = prompt
        self.pending.append(prompt)
        self._wake.set()
        return web.json_response({"prompt_id": prompt.prompt_id, "number": prompt.number, "node_errors": {}})

    # -- the websocket --

    async def _ws(self, request: web.Request) -> web.WebSocketResponse:
        client_id = request.query.get("clientId") or uuid.uuid4().hex
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self._sockets.setdefault(client_id, set()).add(ws)
        await ws.send_json({"type": "status", "data": {"status": {"exec_info": {
            "queue_remaining": len(self.pending) + self.others_pending}}, "sid": client_id}})
        try:
            async for msg in ws:
                if msg.type == WSMsgType.ERROR:
                    break
        finally:
            self._sockets[client_id].discard(ws)
        return ws

    async def _send(self, client_id: str, kind: str, data: dict[str, Any]) -> None:
        for ws in list(self._sockets.get(client_id, ())):
            await ws.send_str(json.dumps({"type": kind, "data": data}))

    async def _send_preview(self, client_id: str, jpeg: bytes) -> None:
        frame = struct.pack(">I", 1) + struct.pack(">I", 1) + jpeg
        for ws in list(self._sockets.get(client_id, ())):
            await ws.send_bytes(frame)

    # -- running prompts --

    async def _work(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self.pending and not self.paused:
                self.running = self.pending.pop(0)
                try:
                    await self._execute(self.running)
                finally:
                    self.running = None

    def _size(self, graph: dict[str, Any]) -> tuple[int, int]:
        for node in graph.values():
            if node["class_type"] == "EmptyLatentImage":
                return node["inputs"]["width"], node["inputs"]["height"]
            if node["class_type"] == "LoadImage":
                return Image.open(io.BytesIO(self.uploads[node["inputs"]["image"]])).size
        return 512, 512

    async def _execute(self, p: Prompt) -> None:
        pid, cid = p.prompt_id, p.client_id
        await self._send(cid, "execution_start", {"prompt_id": pid, "timestamp": int(time.time() * 1000)})
        await self._send(cid, "execution_cached", {"nodes": [], "prompt_id": pid, "timestamp": 0})
        sampler = next(nid for nid, n in p.graph.items() if n["class_type"] == "KSampler")
        steps = p.graph[sampler]["inputs"]["steps"]
        await self._send(cid, "executing", {"node": sampler, "display_node": sampler, "prompt_id": pid})
        preview = image_bytes(64, 64, "JPEG")
        for step in range(1, steps + 1):
            await asyncio.sleep(self.step_delay_s)
            if self.die_after_steps is not None and step > self.die_after_steps:
                asyncio.get_running_loop().create_task(self.stop())
                await asyncio.sleep(3600)
            if p.interrupted:
                await self._send(cid, "execution_interrupted", {"prompt_id": pid, "node_id": sampler,
                                                                "node_type": "KSampler", "executed": []})
                return await self._finish(p, "error", {})
            if self.fail_after_steps is not None and step > self.fail_after_steps[0]:
                return await self._fail(p, sampler, self.fail_after_steps[1])
            await self._send(cid, "progress", {"value": step, "max": steps, "prompt_id": pid, "node": sampler})
            await self._send_preview(cid, preview)
        save = next(nid for nid, n in p.graph.items() if n["class_type"] == "SaveImage")
        await self._send(cid, "executing", {"node": save, "display_node": save, "prompt_id": pid})
        name = f"ComfyUI_{p.number:05d}_.png"
        self.outputs[("output", "", name)] = image_bytes(*self._size(p.graph), shade=p.number)
        images = [{"filename": name, "subfolder": "", "type": "output"}]
        await self._send(cid, "executed", {"node": save, "display_node": save, "output": {"images": images},
                                           "prompt_id": pid})
        await self._send(cid, "execution_success", {"prompt_id": pid, "timestamp": 0})
        await self._finish(p, "success", {save: {"images": images}})

    async def _fail(self, p: Prompt, node: str, message: str) -> None:
        data = {"prompt_id": p.prompt_id, "node_id": node, "node_type": "KSampler", "executed": [],
                "exception_message": message, "exception_type": "torch.OutOfMemoryError",
                "traceback": ["Traceback (most recent call last):\n", "..."], "current_inputs": {},
                "current_outputs": {}}
        await self._send(p.client_id, "execution_error", data)
        await self._finish(p, "error", {}, [["execution_error", data]])

    async def _finish(self, p: Prompt, status: str, outputs: dict[str, Any], messages: list | None = None) -> None:
        self.history[p.prompt_id] = {
            "prompt": self._item(p), "outputs": outputs,
            "status": {"status_str": status, "completed": status == "success", "messages": messages or []},
            "meta": {}}
        await self._send(p.client_id, "executing", {"node": None, "prompt_id": p.prompt_id})
