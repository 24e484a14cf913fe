"""Fake Google (Vertex AI and the Gemini API) and Fireworks servers on 127.0.0.1, speaking each
one's wire format, for driving the real google-genai SDK and easel's aiohttp client in tests.

Built on tests/fakes/providers.py's FakeServer: every request is recorded, replies can be scripted
(`script(route, Reply(...))`), outputs come from `make_output` (a truncated PNG, HTML...).
A prompt containing one of `blocked_terms` is refused the way each provider refuses: Imagen
answers a prediction with only a `raiFilteredReason`, Gemini a candidate with finish reason
IMAGE_SAFETY and no image, Fireworks a blanked image with `Finish-Reason: CONTENT_FILTERED`.
"""
from __future__ import annotations

import base64
from typing import Any

from aiohttp import web

from tests.fakes.providers import RECORD, FakeServer, Reply, image_bytes

IMAGEN_MODELS = {"imagen-4.0-generate-001", "imagen-4.0-fast-generate-001", "imagen-4.0-ultra-generate-001"}
GEMINI_IMAGE_MODELS = {"gemini-2.5-flash-image"}
IMAGEN_SIZES = {"1:1": (1024, 1024), "3:4": (896, 1280), "4:3": (1280, 896), "9:16": (768, 1408),
                "16:9": (1408, 768)}
GEMINI_SIZES = {"1:1": (1024, 1024), "2:3": (832, 1248), "3:2": (1248, 832), "3:4": (864, 1184),
                "4:3": (1184, 864), "4:5": (896, 1152), "5:4": (1152, 896), "9:16": (768, 1344),
                "16:9": (1344, 768), "21:9": (1536, 672)}
RAI_REASON = (
    "Your current safety filter threshold filtered out the generated image. You will not be charged"
    " for blocked images. Try rephrasing the prompt. Support codes: 56562880"
)


def google_error(status: int, message: str, code: str, headers: dict[str, str] | None = None,
                 details: list[dict[str, Any]] | None = None) -> Reply:
    """Google's error envelope (google.rpc.Status as JSON)."""
    error: dict[str, Any] = {"code": status, "message": message, "status": code}
    if details:
        error["details"] = details
    return Reply(status=status, json={"error": error}, headers=headers or {})


def _google_invalid(status: int, message: str, code: str = "INVALID_ARGUMENT", **extra: Any) -> web.Response:
    return web.json_response({"error": {"code": status, "message": message, "status": code, **extra}},
                             status=status)


class FakeGoogle(FakeServer):
    """Vertex AI express mode (`POST /v1beta1/publishers/google/models/{model}:predict` and
    `:generateContent`) and the Gemini API (`POST /v1/models/{model}:generateContent`), the key
    in `x-goog-api-key`. Routes for `script`: "predict", "generateContent"."""

    def __init__(self, api_key: str = "AIzaSy-test-4c2e9b7d") -> None:
        super().__init__(api_key)
        self.blocked_terms = ("forbidden",)
        self.keys_seen: list[str] = []  # the x-goog-api-key of every API call

    def add_routes(self, app: web.Application) -> None:
        # FakeServer checks `Authorization: Bearer`; Google's key travels in x-goog-api-key.
        app.middlewares.insert(0, self._google_key)
        app.router.add_post("/v1beta1/publishers/google/models/{call}", self._vertex)
        app.router.add_post("/v1/models/{call}", self._gemini_api)

    @web.middleware
    async def _google_key(self, request: web.Request, handler: Any) -> web.StreamResponse:
        key = request.headers.get("x-goog-api-key", "")
        self.keys_seen.append(key)
        headers = {k: v for k, v in request.headers.items() if k.lower() != "x-goog-api-key"}
        headers["Authorization"] = f"Bearer {key}"
        return await handler(request.clone(headers=headers))

    def unauthorized(self, presented: str) -> web.Response:
        # Vertex answers 401; the Gemini API answers 400 with reason API_KEY_INVALID. Neither
        # quotes the key (this fake does not either).
        return _google_invalid(
            400, "API key not valid. Please pass a valid API key.",
            details=[{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID",
                      "domain": "googleapis.com"}])

    def _blocked(self, prompt: str) -> bool:
        return any(term in prompt.lower() for term in self.blocked_terms)

    async def _vertex(self, request: web.Request) -> web.StreamResponse:
        model, _, method = request.match_info["call"].partition(":")
        if method == "predict":
            return await self._predict(request, model)
        if method == "generateContent":
            return await self._generate_content(request, model)
        return _google_invalid(404, f"Method {method!r} not found.", "NOT_FOUND")

    async def _gemini_api(self, request: web.Request) -> web.StreamResponse:
        model, _, method = request.match_info["call"].partition(":")
        if method != "generateContent":  # the Gemini API has no Imagen :predict in this fake
            return _google_invalid(404, f"Method {method!r} not found.", "NOT_FOUND")
        return await self._generate_content(request, model)

    async def _predict(self, request: web.Request, model: str) -> web.StreamResponse:
        if (reply := await self.scripted("predict", request)) is not None:
            return reply
        if model not in IMAGEN_MODELS:
            return _google_invalid(404, f"Publisher Model `publishers/google/models/{model}` not found.",
                                   "NOT_FOUND")
        body = request[RECORD].json or {}
        instances, params = body.get("instances") or [{}], body.get("parameters") or {}
        prompt = instances[0].get("prompt")
        if not prompt:
            return _google_invalid(400, "Prompt is required.")
        count = params.get("sampleCount", 4)
        if not 1 <= count <= 4:
            return _google_invalid(400, "sampleCount must be between 1 and 4.")
        ratio = params.get("aspectRatio", "1:1")
        if ratio not in IMAGEN_SIZES:
            return _google_invalid(400, f"Unsupported aspect ratio: {ratio}.")
        if "seed" in params and params.get("addWatermark", True):
            return _google_invalid(400, "Seed is not supported when watermark is enabled.")
        if self._blocked(prompt):
            entry: dict[str, Any] = {"raiFilteredReason": RAI_REASON} if params.get("includeRaiReason") else {}
            return web.json_response({"predictions": [entry]} if entry else {})
        mime = (params.get("outputOptions") or {}).get("mimeType", "image/png")
        data = self.make_output(*IMAGEN_SIZES[ratio])
        predictions = [{"bytesBase64Encoded": base64.b64encode(data).decode(), "mimeType": mime}
                       for _ in range(count)]
        return web.json_response({"predictions": predictions})

    async def _generate_content(self, request: web.Request, model: str) -> web.StreamResponse:
        if (reply := await self.scripted("generateContent", request)) is not None:
            return reply
        if model not in GEMINI_IMAGE_MODELS:
            return _google_invalid(404, f"models/{model} is not found.", "NOT_FOUND")
        body = request[RECORD].json or {}
        contents = body.get("contents") or []
        prompt = " ".join(p.get("text", "") for c in contents for p in c.get("parts", []))
        config = body.get("generationConfig") or {}
        ratio = (config.get("imageConfig") or {}).get("aspectRatio", "1:1")
        if ratio not in GEMINI_SIZES:
            return _google_invalid(400, f"Unsupported aspect ratio: {ratio}.")
        usage = {"promptTokenCount": len(prompt.split()), "candidatesTokenCount": 1290,
                 "totalTokenCount": len(prompt.split()) + 1290}
        if self._blocked(prompt):
            candidate = {"content": {"role": "model", "parts": []}, "finishReason": "IMAGE_SAFETY", "index": 0}
            return web.json_response({"candidates": [candidate], "usageMetadata": usage, "modelVersion": model})
        data = self.make_output(*GEMINI_SIZES[ratio])
        parts: list[dict[str, Any]] = [
            {"inlineData": {"mimeType": "image/png", "data": base64.b64encode(data).decode()}}]
        candidate = {"content": {"role": "model", "parts": parts}, "finishReason": "STOP", "index": 0}
        return web.json_response({"candidates": [candidate], "usageMetadata": usage, "modelVersion": model})


FIREWORKS_RATIOS = {"1:1": (1024, 1024), "21:9": (1536, 640), "16:9": (1344, 768), "3:2": (1216, 832),
                    "5:4": (1088, 896), "4:5": (896, 1088), "2:3": (832, 1216), "9:16": (768, 1344),
                    "9:21": (640, 1536)}
FIREWORKS_MODELS = {"flux-1-schnell-fp8": (1, 4), "flux-1-dev-fp8": (1, 50)}


def fireworks_error(status: int, message: str, type: str = "invalid_request_error",
                    headers: dict[str, str] | None = None) -> Reply:
    """Fireworks' error envelope."""
    return Reply(status=status, json={"error": {"object": "error", "type": type, "code": type, "message": message}},
                 headers=headers or {})


def _fireworks_invalid(status: int, message: str, type: str = "invalid_request_error") -> web.Response:
    body = {"error": {"object": "error", "type": type, "code": type, "message": message}}
    return web.json_response(body, status=status)


class FakeFireworks(FakeServer):
    """`POST /inference/v1/workflows/accounts/fireworks/models/{model}/text_to_image`: with
    `Accept: image/*` the image bytes (headers Finish-Reason, Seed), with `Accept:
    application/json` base64 in JSON. Route for `script`: "text_to_image"."""

    def __init__(self, api_key: str = "fw_test_8d2a61c0f3") -> None:
        super().__init__(api_key)
        self.blocked_terms = ("forbidden",)

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/inference/v1/workflows/accounts/fireworks/models/{model}/text_to_image", self._t2i)

    def unauthorized(self, presented: str) -> web.Response:
        return _fireworks_invalid(401, "The API key you provided is invalid.", "unauthorized")

    async def _t2i(self, request: web.Request) -> web.StreamResponse:
        if (reply := await self.scripted("text_to_image", request)) is not None:
            return reply
        model = request.match_info["model"]
        if model not in FIREWORKS_MODELS:
            return _fireworks_invalid(404, f"Model not found, inaccessible, and/or not deployed: {model}",
                                      "not_found")
        body = request[RECORD].json or {}
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            return _fireworks_invalid(400, "prompt: field required")
        ratio = body.get("aspect_ratio", "1:1")
        if ratio not in FIREWORKS_RATIOS:
            return _fireworks_invalid(400, f"aspect_ratio: must be one of {', '.join(FIREWORKS_RATIOS)}")
        low, high = FIREWORKS_MODELS[model]
        steps = body.get("num_inference_steps", high if model.startswith("flux-1-schnell") else 28)
        if not low <= steps <= high:
            return _fireworks_invalid(400, f"num_inference_steps: must be between {low} and {high}")
        seed = body.get("seed") or 0
        size = FIREWORKS_RATIOS[ratio]
        filtered = any(term in prompt.lower() for term in self.blocked_terms)
        data = image_bytes(*size, shade=0) if filtered else self.make_output(*size)
        finish = "CONTENT_FILTERED" if filtered else "SUCCESS"
        if request.headers.get("Accept", "").startswith("image/"):
            return web.Response(body=data, content_type="image/png",
                                headers={"Finish-Reason": finish, "Seed": str(seed)})
        return web.json_response({"id": f"fw-{next(self._ids)}", "base64": [base64.b64encode(data).decode()],
                                  "finishReason": finish, "seed": seed})
