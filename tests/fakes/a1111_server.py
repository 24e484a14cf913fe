"""A fake AUTOMATIC1111 web UI API on 127.0.0.1, in a thread of its own (easel asks a server for
its checkpoints with a blocking call when the router is built, as a real server in another
process would answer it), speaking its wire format: `/sdapi/v1/txt2img` and `img2img` (JSON with
base64 images and the `info` string holding the seed), `/sdapi/v1/progress` (with the current
preview), `/sdapi/v1/interrupt`, `/sdapi/v1/sd-models`, `/sdapi/v1/samplers`; FastAPI's 422
for a value of the wrong type, and A1111's `{"error", "detail", "body", "errors"}` for failures.

Switches: `busy_jobs` (job_count reported for other clients' work), `step_delay_s` (a slow job),
`die_after_steps` (drops the connection and stops listening mid-job), `fail_with` (a 500 with
that error), `down` (every request is dropped: a dead server that still accepts connections).
"""
from __future__ import annotations

import asyncio
import base64
import io
import json
import random
import threading
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from PIL import Image

from tests.fakes.providers import image_bytes

CHECKPOINTS = [
    {"title": "v1-5-pruned-emaonly.safetensors [6ce0161689]", "model_name": "v1-5-pruned-emaonly",
     "hash": "6ce0161689", "sha256": "6ce0161689b3853acaa03779ec93eafe75a02f4ced659bee03f50797806fa2fa",
     "filename": "/models/Stable-diffusion/v1-5-pruned-emaonly.safetensors", "config": None},
    {"title": "sd_xl_base_1.0.safetensors [31e35c80fc]", "model_name": "sd_xl_base_1.0", "hash": "31e35c80fc",
     "sha256": "31e35c80fc4829d14f90153f4c74cd59c90b779f6afe05a74cd6120b893f7e5b",
     "filename": "/models/Stable-diffusion/sd_xl_base_1.0.safetensors", "config": None},
]
SAMPLERS = ["DPM++ 2M", "DPM++ SDE", "Euler a", "Euler", "DDIM", "UniPC"]
FIELDS = {"prompt": str, "negative_prompt": str, "seed": int, "width": int, "height": int, "steps": int,
          "cfg_scale": (int, float), "batch_size": int, "n_iter": int, "sampler_name": str,
          "denoising_strength": (int, float), "init_images": list, "mask": str}


@dataclass
class Call:
    method: str
    path: str
    json: Any = None


CALL = web.RequestKey("call", Call)


class FakeA1111:
    def __init__(self, checkpoints: list[dict[str, Any]] | None = None) -> None:
        self.checkpoints = CHECKPOINTS if checkpoints is None else checkpoints
        self.requests: list[Call] = []
        self.busy_jobs = 0
        self.step_delay_s = 0.0
        self.list_delay_s = 0.0  # before answering /sd-models (a slow server at discovery)
        self.die_after_steps: int | None = None
        self.fail_with: str | None = None
        self.down = False
        self.base_url = ""
        self._state = {"job_count": 0, "sampling_step": 0, "sampling_steps": 0}
        self._preview: bytes | None = None
        self._interrupted = False
        self._lock: asyncio.Lock | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None

    def calls(self, method: str, path: str) -> list[Call]:
        return [c for c in list(self.requests) if c.method == method and c.path == path]

    # -- lifecycle (its own thread and event loop) --

    def __enter__(self) -> FakeA1111:
        started = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._serve, args=(started,), daemon=True)
        self._thread.start()
        started.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None and self._thread is not None
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _serve(self, started: threading.Event) -> None:
        assert self._loop is not None
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._start())
        started.set()
        self._loop.run_forever()
        pending = asyncio.all_tasks(self._loop)  # handlers still sleeping in a slow or dying job
        for task in pending:
            task.cancel()
        self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self._loop.close()

    async def _models(self, request: web.Request) -> web.Response:
        await asyncio.sleep(self.list_delay_s)
        return web.json_response(self.checkpoints)

    async def _start(self) -> None:
        self._lock = asyncio.Lock()
        app = web.Application(middlewares=[self._record], client_max_size=64 * 2**20)
        app.router.add_get("/sdapi/v1/sd-models", self._models)
        app.router.add_get("/sdapi/v1/samplers", lambda r: web.json_response(
            [{"name": n, "aliases": [f"k_{n.lower().replace(' ', '_')}"], "options": {}} for n in SAMPLERS]))
        app.router.add_get("/sdapi/v1/progress", self._progress)
        app.router.add_post("/sdapi/v1/interrupt", self._interrupt)
        app.router.add_post("/sdapi/v1/txt2img", self._generate)
        app.router.add_post("/sdapi/v1/img2img", self._generate)
        self._runner = web.AppRunner(app, shutdown_timeout=0.2)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.base_url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"

    async def _stop(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    # -- HTTP --

    @web.middleware
    async def _record(self, request: web.Request, handler: Any) -> web.StreamResponse:
        body = await request.json() if request.content_type == "application/json" else None
        call = Call(request.method, request.path, body)
        self.requests.append(call)
        request[CALL] = call
        if self.down:
            assert request.transport is not None
            request.transport.abort()
            await asyncio.sleep(3600)
        return await handler(request)

    async def _progress(self, request: web.Request) -> web.Response:
        job_count = self._state["job_count"] + self.busy_jobs
        step, steps = self._state["sampling_step"], self._state["sampling_steps"]
        preview = None
        if self._preview is not None and request.query.get("skip_current_image") == "false":
            preview = base64.b64encode(self._preview).decode()
        return web.json_response({
            "progress": step / steps if steps else 0.0, "eta_relative": 0.5 if steps else 0.0,
            "state": {"skipped": False, "interrupted": self._interrupted, "stopping_generation": False,
                      "job": "", "job_count": job_count, "job_timestamp": "20250101000000", "job_no": 0,
                      "sampling_step": step, "sampling_steps": steps},
            "current_image": preview, "textinfo": None})

    async def _interrupt(self, request: web.Request) -> web.Response:
        self._interrupted = True
        return web.json_response({})

    def _invalid(self, body: Any) -> web.Response | None:
        """FastAPI's 422 for a field of the wrong type."""
        if not isinstance(body, dict):
            return web.json_response({"detail": [{"loc": ["body"], "msg": "field required", "type": "value_error.missing"}]}, status=422)
        for name, kind in FIELDS.items():
            if name in body and (not isinstance(body[name], kind) or isinstance(body[name], bool)):
                return web.json_response({"detail": [{"loc": ["body", name], "msg": f"value is not a valid {kind}",
                                                      "type": "type_error"}]}, status=422)
        return None

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        body = request[CALL].json
        if (invalid := self._invalid(body)) is not None:
            return invalid
        assert self._lock is not None
        async with self._lock:  # A1111 runs one job at a time
            return await self._run(request, body)

    async def _run(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        if self.fail_with is not None:
            return web.json_response({"error": "OutOfMemoryError", "detail": "", "body": "",
                                      "errors": self.fail_with}, status=500)
        steps, width, height = body.get("steps", 20), body.get("width", 512), body.get("height", 512)
        self._interrupted = False
        self._state.update(job_count=1, sampling_step=0, sampling_steps=steps)
        try:
            for step in range(1, steps + 1):
                await asyncio.sleep(self.step_delay_s)
                if self.die_after_steps is not None and step > self.die_after_steps:
                    assert request.transport is not None
                    request.transport.abort()
                    asyncio.get_running_loop().create_task(self._stop())
                    await asyncio.sleep(3600)
                if self._interrupted:
                    break
                self._state["sampling_step"] = step
                self._preview = image_bytes(32, 32, shade=step)
        finally:
            self._state.update(job_count=0, sampling_step=0, sampling_steps=0)
            self._preview = None
        seed = body.get("seed", -1)
        seed = random.randint(0, 2**32 - 1) if seed == -1 else seed
        if body.get("init_images"):
            source = Image.open(io.BytesIO(base64.b64decode(body["init_images"][0])))
            assert source.size  # decodes
        image = image_bytes(width, height, shade=seed % 256)
        checkpoint = (body.get("override_settings") or {}).get("sd_model_checkpoint", CHECKPOINTS[0]["title"])
        info = {"prompt": body.get("prompt", ""), "all_prompts": [body.get("prompt", "")],
                "negative_prompt": body.get("negative_prompt", ""), "seed": seed, "all_seeds": [seed],
                "subseed": 1234, "all_subseeds": [1234], "width": width, "height": height,
                "sampler_name": body.get("sampler_name", "DPM++ 2M"), "cfg_scale": body.get("cfg_scale", 7.0),
                "steps": steps, "sd_model_name": checkpoint.split(".")[0], "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
                "denoising_strength": body.get("denoising_strength"), "infotexts": [f"{body.get('prompt')}\nSeed: {seed}"]}
        return web.json_response({"images": [base64.b64encode(image).decode()], "parameters": body,
                                  "info": json.dumps(info)})
