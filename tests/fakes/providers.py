"""Fake OpenAI, Replicate and Together servers on 127.0.0.1, speaking each provider's wire format,
for driving the real SDKs in tests.

Each fake records every request it gets (method, path, headers without Authorization, JSON body or
multipart parts), answers API calls as the provider would (including its validation errors and
error envelopes), makes images with PIL at the requested size, and hosts output files itself, so
tests can script expiring URLs, failing downloads and bad bytes. A test scripts a behaviour by
queueing `Reply`s for a route (429, 500, a hang, an HTML page, a body trickling in...), by setting `make_output` (HTML, a truncated
PNG, a decompression bomb), `output_policy` (how output URLs behave) or, on FakeReplicate,
`outcome` (how predictions end).
"""
from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import io
import itertools
import json
import struct
import time
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from PIL import Image

HTML_ERROR_PAGE = b"<!DOCTYPE html><html><head><title>502 Bad Gateway</title></head><body></body></html>"


@functools.lru_cache(maxsize=64)
def image_bytes(width: int, height: int, fmt: str = "PNG", shade: int = 0) -> bytes:
    """A non-blank image of the given size, PNG unless `fmt` says otherwise (WEBP, JPEG)."""
    ramp = Image.linear_gradient("L")
    img = Image.merge(
        "RGB",
        (
            ramp.resize((width, height)),
            ramp.transpose(Image.Transpose.ROTATE_90).resize((width, height)),
            Image.new("L", (width, height), shade % 256),
        ),
    )
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"compress_level": 1} if fmt == "PNG" else {}))
    return buf.getvalue()


def truncated_png(width: int, height: int) -> bytes:
    data = image_bytes(width, height)
    return data[: len(data) // 2]


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


@functools.lru_cache(maxsize=1)
def decompression_bomb_png() -> bytes:
    """A valid ~80 KB PNG that decodes to 9000x9000 pixels (81 MB of zeros)."""
    width = height = 9000
    packer = zlib.compressobj(9)
    row = bytes(width + 1)  # a filter byte, then the pixels
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    chunks = _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + chunks


@dataclass
class Reply:
    """A scripted answer to the next call of a route. `delay_s` before answering: a large one is a
    hanging server. `trickle_s`: the body is sent one byte every that many seconds (a server
    that keeps the connection alive without ever finishing its answer)."""

    status: int = 200
    json: Any = None
    body: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    trickle_s: float = 0.0


def html_page(status: int = 200, body: bytes = HTML_ERROR_PAGE) -> Reply:
    """An HTML page where the API's JSON was due (a proxy's or a CDN's error page)."""
    return Reply(status=status, body=body, headers={"Content-Type": "text/html; charset=utf-8"})


def _openai_envelope(message: str, type: str, param: str | None, code: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def openai_error(
    status: int,
    message: str,
    *,
    type: str = "invalid_request_error",
    code: str | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> Reply:
    """OpenAI's error envelope (Together uses the same)."""
    return Reply(status=status, json=_openai_envelope(message, type, param, code), headers=headers or {})


def _openai_invalid(status: int, message: str, param: str | None, code: str | None) -> web.Response:
    return web.json_response(_openai_envelope(message, "invalid_request_error", param, code), status=status)


def _problem(status: int, title: str, detail: str) -> dict[str, Any]:
    """Replicate's RFC 7807 problem details."""
    return {"title": title, "detail": detail, "status": status}


def replicate_error(status: int, title: str, detail: str, headers: dict[str, str] | None = None) -> Reply:
    return Reply(status=status, json=_problem(status, title, detail), headers=headers or {})


def _replicate_not_found() -> web.Response:
    detail = "The requested resource could not be found."
    return web.json_response(_problem(404, "Not found", detail), status=404)


@dataclass
class FormPart:
    name: str
    filename: str | None
    content_type: str | None
    data: bytes

    @property
    def text(self) -> str:
        return self.data.decode()


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]  # lower-case names; Authorization left out
    json: Any = None
    form: dict[str, FormPart] = field(default_factory=dict)


RECORD = web.RequestKey("record", RecordedRequest)  # the handler's view of what was recorded


@dataclass
class HostPolicy:
    """How a hosted file answers: `fail_first` statuses (with `retry_after` when set) before
    serving it, then 404 once it has been served `expire_after` times (a signed URL that expired).
    `delay_s` before each answer; `chunked` sends it without a Content-Length; `trickle_s` sends
    it one byte every that many seconds."""

    expire_after: int | None = None
    fail_first: tuple[int, ...] = ()
    retry_after: str | None = None
    delay_s: float = 0.0
    chunked: bool = False
    content_type: str = "image/png"
    trickle_s: float = 0.0


@dataclass
class _Hosted:
    data: bytes
    policy: HostPolicy
    failures_left: deque[int]
    served: int = 0
    requests: int = 0


class FakeServer:
    """Shared machinery: the aiohttp app, request log, scripted replies, auth and file hosting."""

    def __init__(self, api_key: str = "test-key-7c1d9e") -> None:
        self.api_key = api_key
        self.requests: list[RecordedRequest] = []
        self.make_output: Callable[[int, int], bytes] = image_bytes
        self.output_policy = HostPolicy()
        self.hosted: dict[str, _Hosted] = {}
        self._scripts: dict[str, deque[Reply]] = {}
        self._ids = itertools.count(1)
        self._stopping = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.base_url = ""  # http://127.0.0.1:PORT, once started
        self.latency_s = 0.0  # how long every API call takes (hosted files answer at once)

    # -- scripting and inspection --

    def script(self, route: str, *replies: Reply) -> None:
        """Answer the next calls of `route` with `replies`, in order; then behave normally."""
        self._scripts.setdefault(route, deque()).extend(replies)

    def calls(self, method: str, path_prefix: str) -> list[RecordedRequest]:
        return [r for r in self.requests if r.method == method and r.path.startswith(path_prefix)]

    def host(self, data: bytes, policy: HostPolicy | None = None) -> str:
        """Serve `data` at a new URL on this server; returns the URL."""
        policy = policy or HostPolicy()
        name = f"out-{next(self._ids)}.png"
        self.hosted[name] = _Hosted(data=data, policy=policy, failures_left=deque(policy.fail_first))
        return f"{self.base_url}/files/{name}"

    def hosted_at(self, url: str) -> _Hosted:
        return self.hosted[url.rsplit("/", 1)[1]]

    def _host_output(self, width: int, height: int) -> str:
        return self.host(self.make_output(width, height), self.output_policy)

    # -- lifecycle --

    async def start(self) -> FakeServer:
        app = web.Application(middlewares=[self._record], client_max_size=64 * 1024 * 1024)
        app.router.add_get("/files/{name}", self._serve_file)
        self.add_routes(app)
        self._runner = web.AppRunner(app, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.base_url = f"http://127.0.0.1:{port}"
        return self

    async def stop(self) -> None:
        self._stopping.set()  # ends hanging replies
        if self._runner is not None:
            await self._runner.cleanup()

    async def __aenter__(self) -> FakeServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def add_routes(self, app: web.Application) -> None:
        raise NotImplementedError

    def unauthorized(self, presented: str) -> web.Response:
        raise NotImplementedError

    # -- request handling --

    @web.middleware
    async def _record(self, request: web.Request, handler: Callable) -> web.StreamResponse:
        headers = {k.lower(): v for k, v in request.headers.items() if k.lower() != "authorization"}
        record = RecordedRequest(method=request.method, path=request.path, headers=headers)
        if request.content_type == "application/json":
            record.json = await request.json()
        elif request.content_type == "multipart/form-data":
            reader = await request.multipart()
            async for part in reader:
                record.form[part.name] = FormPart(
                    name=part.name,
                    filename=part.filename,
                    content_type=part.headers.get("Content-Type"),
                    data=bytes(await part.read()),
                )
        self.requests.append(record)
        request[RECORD] = record
        if not request.path.startswith("/files/"):
            presented = request.headers.get("Authorization", "")
            if presented != f"Bearer {self.api_key}":
                return self.unauthorized(presented.removeprefix("Bearer "))
            if self.latency_s:
                await self._pause(self.latency_s)
        return await handler(request)

    async def scripted(self, route: str, request: web.Request) -> web.StreamResponse | None:
        """The next scripted reply for `route`, after its delay; None when nothing is scripted."""
        queue = self._scripts.get(route)
        if not queue:
            return None
        reply = queue.popleft()
        if reply.delay_s:
            await self._pause(reply.delay_s)
        headers = dict(reply.headers)
        if reply.json is not None:
            body = json.dumps(reply.json).encode()
            headers.setdefault("Content-Type", "application/json")
        else:
            body = reply.body or b""
        if reply.trickle_s:
            return await self._trickle(request, body, reply.trickle_s, status=reply.status, headers=headers)
        return web.Response(body=body, status=reply.status, headers=headers)

    async def _trickle(
        self, request: web.Request, body: bytes, interval_s: float, *, status: int = 200,
        headers: dict[str, str] | None = None,
    ) -> web.StreamResponse:
        """Send `body` (with its Content-Length) one byte every `interval_s` seconds, until it is
        all sent, the client hangs up or the server stops."""
        response = web.StreamResponse(status=status, headers=headers or {})
        response.content_length = len(body)
        await response.prepare(request)
        try:
            for i in range(len(body)):
                await response.write(body[i : i + 1])
                await self._pause(interval_s)
                if self._stopping.is_set():
                    return response
            await response.write_eof()
        except ConnectionError:  # the client gave up
            pass
        return response

    async def _pause(self, seconds: float) -> None:
        """Sleep, but stop early when the server stops (so a hanging reply ends with the test)."""
        try:
            await asyncio.wait_for(self._stopping.wait(), seconds)
        except TimeoutError:
            pass

    async def _serve_file(self, request: web.Request) -> web.StreamResponse:
        hosted = self.hosted.get(request.match_info["name"])
        if hosted is None:
            return web.Response(status=404, text="not found")
        policy = hosted.policy
        hosted.requests += 1
        if policy.delay_s:
            await self._pause(policy.delay_s)
        if hosted.failures_left:
            headers = {"Retry-After": policy.retry_after} if policy.retry_after else {}
            status = hosted.failures_left.popleft()
            return web.Response(status=status, text="upstream trouble", headers=headers)
        if policy.expire_after is not None and hosted.served >= policy.expire_after:
            expired = "<Error><Code>BlobNotFound</Code></Error>"
            return web.Response(status=404, content_type="application/xml", text=expired)
        hosted.served += 1
        if policy.trickle_s:
            headers = {"Content-Type": policy.content_type}
            return await self._trickle(request, hosted.data, policy.trickle_s, headers=headers)
        if not policy.chunked:
            return web.Response(body=hosted.data, content_type=policy.content_type)
        response = web.StreamResponse(headers={"Content-Type": policy.content_type})
        response.enable_chunked_encoding()
        await response.prepare(request)
        for start in range(0, len(hosted.data), 64 * 1024):
            await response.write(hosted.data[start : start + 64 * 1024])
        await response.write_eof()
        return response


MISSING = "missing_required_parameter"


def _size(value: str) -> tuple[int, int]:
    w, h = value.split("x")
    return int(w), int(h)


class FakeOpenAI(FakeServer):
    """`POST /v1/images/generations` (JSON) and `POST /v1/images/edits` (multipart), for DALL-E 3
    and GPT Image 1. Routes for `script`: "generations", "edits". `force_url` answers with a URL
    even where b64_json was asked for (as some OpenAI-compatible servers do)."""

    MODELS = {
        "dall-e-3": {
            "sizes": {"1024x1024", "1792x1024", "1024x1792"},
            "quality": {"standard", "hd"},
            "params": {"model", "prompt", "n", "size", "quality", "style", "response_format", "user"},
        },
        "gpt-image-1": {
            "sizes": {"1024x1024", "1536x1024", "1024x1536", "auto"},
            "quality": {"low", "medium", "high", "auto"},
            "params": {
                "model", "prompt", "n", "size", "quality", "output_format", "output_compression",
                "background", "moderation", "user",
            },
        },
    }
    # GPT Image 1's output tokens per image, by size and quality (what it bills at $40 / 1M).
    OUTPUT_TOKENS = {
        ("1024x1024", "low"): 272, ("1024x1024", "medium"): 1056, ("1024x1024", "high"): 4160,
        ("1536x1024", "low"): 408, ("1536x1024", "medium"): 1584, ("1536x1024", "high"): 6240,
        ("1024x1536", "low"): 408, ("1024x1536", "medium"): 1584, ("1024x1536", "high"): 6240,
    }
    INPUT_IMAGE_TOKENS = 323  # per image part of an edit

    def __init__(self, api_key: str = "sk-test-7c1d9e0f2a") -> None:
        super().__init__(api_key)
        self.force_url = False

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/images/generations", self._generations)
        app.router.add_post("/v1/images/edits", self._edits)
        app.router.add_post("/v1/chat/completions", self._chat)

    def unauthorized(self, presented: str) -> web.Response:
        # OpenAI quotes the key it got (partly masked); this fake quotes all of it, which is worse.
        message = (
            f"Incorrect API key provided: {presented}. You can find your API key at "
            "https://platform.openai.com/account/api-keys."
        )
        return _openai_invalid(401, message, None, "invalid_api_key")

    def _invalid(self, message: str, param: str | None, code: str | None = "invalid_value") -> web.Response:
        return _openai_invalid(400, message, param, code)

    def _check(self, params: dict[str, Any]) -> web.Response | None:
        model = params.get("model", "dall-e-2")
        rules = self.MODELS.get(model)
        if rules is None:
            return self._invalid(f"Invalid value for 'model' = {model}.", "model")
        for name in params:
            if name not in rules["params"]:
                return self._invalid(f"Unknown parameter: '{name}'.", name, "unknown_parameter")
        if not params.get("prompt"):
            return self._invalid("Missing required parameter: 'prompt'.", "prompt", MISSING)
        if params.get("size", "1024x1024") not in rules["sizes"]:
            return self._invalid(f"Invalid value: '{params['size']}'.", "size")
        if "quality" in params and params["quality"] not in rules["quality"]:
            return self._invalid(f"Invalid value: '{params['quality']}'.", "quality")
        if model == "dall-e-3" and int(params.get("n", 1)) != 1:
            return self._invalid("You must provide n=1 for this model.", "n", None)
        return None

    def _image_entry(self, model: str, size: str, response_format: str | None) -> dict[str, Any]:
        width, height = _size(size if size != "auto" else "1024x1024")
        as_url = model == "dall-e-3" and response_format != "b64_json"
        if as_url or self.force_url:
            return {"url": self._host_output(width, height)}
        return {"b64_json": base64.b64encode(self.make_output(width, height)).decode()}

    def _usage(self, params: dict[str, Any], input_images: int) -> dict[str, Any]:
        key = (params.get("size", "1024x1024"), params.get("quality", "medium"))
        text_tokens = len(params["prompt"].split())
        image_tokens = input_images * self.INPUT_IMAGE_TOKENS
        output_tokens = self.OUTPUT_TOKENS.get(key, 1056)
        return {
            "input_tokens": text_tokens + image_tokens,
            "input_tokens_details": {"text_tokens": text_tokens, "image_tokens": image_tokens},
            "output_tokens": output_tokens,
            "total_tokens": text_tokens + image_tokens + output_tokens,
        }

    async def _generations(self, request: web.Request) -> web.Response:
        if (reply := await self.scripted("generations", request)) is not None:
            return reply
        params = request[RECORD].json
        if (error := self._check(params)) is not None:
            return error
        model = params["model"]
        entry = self._image_entry(model, params.get("size", "1024x1024"), params.get("response_format"))
        body: dict[str, Any] = {"created": int(time.time()), "data": [entry]}
        if model == "dall-e-3":
            entry["revised_prompt"] = f"A detailed illustration of {params['prompt']}"
        else:
            body.update(output_format=params.get("output_format", "png"), usage=self._usage(params, 0))
        return web.json_response(body)

    # What the fake's chat model answers: the user's prompt with this added (route "chat").
    enhancement = ", a sweeping landscape at golden hour, dramatic lighting, oil painting"

    async def _chat(self, request: web.Request) -> web.Response:
        """Chat completions without streaming, as a prompt enhancer calls them."""
        if (reply := await self.scripted("chat", request)) is not None:
            return reply
        params = request[RECORD].json
        if params.get("stream"):
            return self._invalid("This fake does not stream.", "stream")
        messages = params.get("messages") or []
        if not params.get("model") or not messages:
            return self._invalid("Missing required parameter: 'messages'.", "messages", MISSING)
        prompt = messages[-1]["content"]
        answer = prompt + self.enhancement
        prompt_tokens = sum(len(m["content"].split()) for m in messages)
        completion_tokens = len(answer.split())
        return web.json_response({
            "id": f"chatcmpl-{next(self._ids)}", "object": "chat.completion", "created": int(time.time()),
            "model": params["model"],
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": answer}}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        })

    async def _edits(self, request: web.Request) -> web.Response:
        if (reply := await self.scripted("edits", request)) is not None:
            return reply
        form = request[RECORD].form
        params = {name: part.text for name, part in form.items() if part.filename is None}
        if "image" not in form:
            return self._invalid("Missing required parameter: 'image'.", "image", MISSING)
        if params.get("model") != "gpt-image-1":
            return self._invalid("Invalid value for 'model': only GPT image models can edit.", "model")
        if (error := self._check(params)) is not None:
            return error
        entry = self._image_entry(params["model"], params.get("size", "1024x1024"), None)
        body = {
            "created": int(time.time()),
            "data": [entry],
            "output_format": params.get("output_format", "png"),
            "usage": self._usage(params, 1 + ("mask" in form)),
        }
        return web.json_response(body)


class FakeTogether(FakeServer):
    """Together's OpenAI-compatible `POST /v1/images/generations`, with its own fields (width,
    height, steps, seed) and its own envelope (no `created`). Route for `script`: "generations"."""

    MODEL = "black-forest-labs/FLUX.1-schnell"

    def __init__(self, api_key: str = "tgp-test-5b3e8d1c") -> None:
        super().__init__(api_key)
        self.force_url = False

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/images/generations", self._generations)

    def unauthorized(self, presented: str) -> web.Response:
        return _openai_invalid(401, f"Invalid API key provided: {presented}", None, "invalid_api_key")

    async def _generations(self, request: web.Request) -> web.Response:
        if (reply := await self.scripted("generations", request)) is not None:
            return reply
        params = request[RECORD].json
        if params.get("model") != self.MODEL:
            message = f"Unable to access model {params.get('model')}."
            return _openai_invalid(404, message, "model", "model_not_available")
        width, height = int(params.get("width", 1024)), int(params.get("height", 768))
        entry: dict[str, Any]
        if params.get("response_format") == "b64_json" and not self.force_url:
            entry = {"b64_json": base64.b64encode(self.make_output(width, height)).decode()}
        else:
            entry = {"url": self._host_output(width, height)}
        entry.update(index=0, timings={"inference": 0.21})
        body = {"id": f"tg-{next(self._ids)}", "model": self.MODEL, "object": "list", "data": [entry]}
        return web.json_response(body)


@dataclass
class Outcome:
    """How the fake's next predictions end: after `polls` GETs answered "processing", they
    "succeed", "fail" with `error`, or "hang" (stay processing until cancelled)."""

    kind: str = "succeed"
    polls: int = 1
    error: str = "NSFW content detected. Try running it again, or try a different prompt."


@dataclass
class _Prediction:
    data: dict[str, Any]
    outcome: Outcome
    polls_left: int
    size: tuple[int, int]


class FakeReplicate(FakeServer):
    """Replicate's predictions API for official models: create (`POST /v1/models/{owner}/{name}/
    predictions`, honouring `Prefer: wait`), poll (`GET /v1/predictions/{id}`), cancel, and file
    uploads (`POST /v1/files`). Routes for `script`: "create", "get", "cancel", "files"."""

    # What each official model's `aspect_ratio` makes (at 1 megapixel).
    FLUX_SIZES = {
        "1:1": (1024, 1024), "16:9": (1344, 768), "9:16": (768, 1344), "3:2": (1216, 832),
        "2:3": (832, 1216), "4:5": (896, 1088), "5:4": (1088, 896), "3:4": (896, 1152),
        "4:3": (1152, 896), "21:9": (1536, 640), "9:21": (640, 1536),
    }
    MODELS = {
        "black-forest-labs/flux-schnell": {"steps": (1, 4), "list_output": True},
        "black-forest-labs/flux-dev": {"steps": (1, 50), "list_output": True},
        "black-forest-labs/flux-1.1-pro": {"steps": None, "list_output": False},
    }

    def __init__(self, api_key: str = "r8_test_3f9a1b7c") -> None:
        super().__init__(api_key)
        self.outcome = Outcome()
        self.predictions: dict[str, _Prediction] = {}
        self.uploads: dict[str, bytes] = {}
        self.cancelled: list[str] = []
        self.created = asyncio.Event()  # set when a prediction is created

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/models/{owner}/{name}/predictions", self._create)
        app.router.add_get("/v1/predictions/{id}", self._get)
        app.router.add_post("/v1/predictions/{id}/cancel", self._cancel)
        app.router.add_post("/v1/files", self._upload)

    def unauthorized(self, presented: str) -> web.Response:
        return web.json_response(_problem(401, "Unauthenticated", f"Invalid token: {presented}"), status=401)

    def _invalid_input(self, message: str) -> web.Response:
        field_name = message.split(":")[0]
        body = {
            "title": "Input validation failed",
            "detail": f"- {message}",
            "status": 422,
            "invalid_fields": [{"type": "invalid", "field": field_name, "description": message}],
        }
        return web.json_response(body, status=422)

    def _validate(
        self, model: str, model_input: dict[str, Any]
    ) -> tuple[tuple[int, int] | None, web.Response | None]:
        """The output size the input asks for, or a 422 like Replicate's."""
        if not isinstance(model_input.get("prompt"), str) or not model_input["prompt"]:
            return None, self._invalid_input("input: prompt is required")
        low_high = self.MODELS[model]["steps"]
        steps = model_input.get("num_inference_steps")
        if steps is not None and (low_high is None or not low_high[0] <= steps <= low_high[1]):
            return None, self._invalid_input(f"input.num_inference_steps: Must be between {low_high}")
        if "image" in model_input:
            upload_id = str(model_input["image"]).rsplit("/", 1)[-1]
            if upload_id not in self.uploads:
                return None, self._invalid_input("input.image: Does not match format 'uri'")
            with Image.open(io.BytesIO(self.uploads[upload_id])) as source:
                return source.size, None
        ratio = model_input.get("aspect_ratio", "1:1")
        if ratio == "custom" and model.endswith("flux-1.1-pro"):
            width, height = model_input.get("width"), model_input.get("height")
            for side, value in (("width", width), ("height", height)):
                if not isinstance(value, int) or not 256 <= value <= 1440:
                    return None, self._invalid_input(f"input.{side}: Must be from 256 to 1440")
            return (width // 32 * 32, height // 32 * 32), None
        if ratio not in self.FLUX_SIZES:
            ratios = ", ".join(self.FLUX_SIZES)
            return None, self._invalid_input(f"input.aspect_ratio: Must be one of {ratios}")
        return self.FLUX_SIZES[ratio], None

    def _urls(self, prediction_id: str) -> dict[str, str]:
        api = f"{self.base_url}/v1/predictions/{prediction_id}"
        return {
            "get": api,
            "cancel": f"{api}/cancel",
            "stream": f"{self.base_url}/stream/{prediction_id}",
            "web": f"https://replicate.com/p/{prediction_id}",
        }

    def _advance(self, prediction: _Prediction) -> None:
        """One step of processing, as seen by a poll."""
        data = prediction.data
        if data["status"] in ("succeeded", "failed", "canceled"):
            return
        data.update(status="processing", started_at=data["started_at"] or _now())
        if prediction.outcome.kind == "hang":
            data["logs"] = "Using seed: 1\n 25%|██▌       | 1/4 [00:00<00:01, 2.9it/s]"
            return
        if prediction.polls_left > 0:
            prediction.polls_left -= 1
            data["logs"] = "Using seed: 1\n 50%|█████     | 2/4 [00:00<00:00, 3.1it/s]"
            return
        self._finish(prediction)

    def _finish(self, prediction: _Prediction) -> None:
        data = prediction.data
        data.update(completed_at=_now(), metrics={"predict_time": 0.8, "image_count": 1})
        if prediction.outcome.kind == "fail":
            data.update(status="failed", error=prediction.outcome.error)
            return
        url = self._host_output(*prediction.size)
        list_output = self.MODELS[data["model"]]["list_output"]
        data.update(
            status="succeeded",
            output=[url] if list_output else url,
            logs=data["logs"] + "\n100%|██████████| 4/4 [00:01<00:00, 3.2it/s]",
        )

    async def _create(self, request: web.Request) -> web.Response:
        if (reply := await self.scripted("create", request)) is not None:
            return reply
        model = f"{request.match_info['owner']}/{request.match_info['name']}"
        if model not in self.MODELS:
            return _replicate_not_found()
        body = request[RECORD].json or {}
        model_input = body.get("input")
        if not isinstance(model_input, dict):
            return self._invalid_input("input: is required")
        size, error = self._validate(model, model_input)
        if error is not None:
            return error
        prediction_id = f"q{next(self._ids)}x7kd3r9pmrg0cm2xe8h"
        data = {
            "id": prediction_id,
            "model": model,
            "version": "hidden",
            "input": model_input,
            "logs": "",
            "output": None,
            "data_removed": False,
            "error": None,
            "status": "starting",
            "created_at": _now(),
            "started_at": None,
            "completed_at": None,
            "urls": self._urls(prediction_id),
        }
        prediction = _Prediction(data, outcome=self.outcome, polls_left=self.outcome.polls, size=size)
        self.predictions[prediction_id] = prediction
        self.created.set()
        prefer = request.headers.get("Prefer", "")
        if prefer.startswith("wait"):
            # The model runs while the request is held: up to `wait` seconds (60 by default).
            hold_s = float(prefer.partition("=")[2] or 60)
            if self.outcome.kind == "hang":
                await self._pause(hold_s)
                data["status"] = "processing"
            else:
                self._finish(prediction)
        return web.json_response(data, status=201)

    async def _get(self, request: web.Request) -> web.Response:
        if (reply := await self.scripted("get", request)) is not None:
            return reply
        prediction = self.predictions.get(request.match_info["id"])
        if prediction is None:
            return _replicate_not_found()
        self._advance(prediction)
        return web.json_response(prediction.data)

    async def _cancel(self, request: web.Request) -> web.Response:
        if (reply := await self.scripted("cancel", request)) is not None:
            return reply
        prediction = self.predictions.get(request.match_info["id"])
        if prediction is None:
            return _replicate_not_found()
        self.cancelled.append(prediction.data["id"])
        if prediction.data["status"] not in ("succeeded", "failed", "canceled"):
            prediction.data.update(status="canceled", completed_at=_now())
        return web.json_response(prediction.data)

    async def _upload(self, request: web.Request) -> web.Response:
        if (reply := await self.scripted("files", request)) is not None:
            return reply
        part = request[RECORD].form.get("content")
        if part is None:
            return web.json_response(_problem(400, "Bad request", "content is required"), status=400)
        file_id = f"upl{next(self._ids)}"
        self.uploads[file_id] = part.data
        digest = hashlib.sha256(part.data).hexdigest()
        body = {
            "id": file_id,
            "name": part.filename or "file",
            "content_type": part.content_type or "",
            "size": len(part.data),
            "etag": digest[:32],
            "checksums": {"sha256": digest},
            "metadata": {},
            "created_at": _now(),
            "expires_at": None,
            "urls": {"get": f"{self.base_url}/v1/files/{file_id}"},
        }
        return web.json_response(body, status=201)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime())
