"""HTTP routes beside the Gradio UI: health, readiness, metrics, and OpenAI-style image generation.

Every client mistake answers 4xx in OpenAI's error shape {"error": {"message", "type", "param", "code"}}.
Unknown request fields are ignored (OpenAI clients send `model`, `user`, `style`, ...).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
import re
import threading
import time

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import images, presets, security
from .request import (EngineUnavailable, GenerationCancelled, GenerationRequest, OutOfMemory, RequestError)

log = logging.getLogger("zimage.api")

MAX_BODY_BYTES = 1 << 20  # 1 MiB: a prompt is capped at 16 Ki characters anyway
# OpenAI's quality names, mapped to our tiers ("auto" and "standard" are the default tier).
QUALITY_ALIASES = {"low": "Draft", "medium": "Standard", "standard": "Standard", "auto": "Standard",
                   "high": "High", "hd": "High"}


class ImagesGenerationBody(BaseModel):
    """Documents the request body in /openapi.json; parsing is done by hand for clearer messages."""

    prompt: str = Field(..., description="What to draw (up to 16384 characters; 512 text tokens are used)")
    n: int = Field(1, ge=1, le=4, description="Number of images, 1-4; image i uses seed + i")
    size: str | None = Field(None, description="'WxH' (multiples of 16, 256-2048), or 'auto' for the quality's size")
    quality: str | None = Field("Standard", description="Draft, Standard, High, Ultra (or low/medium/high/hd/auto)")
    aspect: str | None = Field("1:1", description="Extension: aspect ratio for the quality's area when size is unset")
    response_format: str = Field("b64_json", description="Only b64_json: images are not hosted")
    output_format: str = Field("png", description="png (with parameters metadata), jpeg or webp")
    seed: int | None = Field(None, description="Extension: 0..2^32-1, or -1/null for random")
    steps: int | None = Field(None, ge=1, le=16, description="Extension: denoising steps (default: the quality's)")


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}


def error_response(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                        status_code=status, headers=headers)


class WaitingRoom:
    """Admission for the JSON API: requests waiting for (or holding) the GPU, bounded by the queue size
    together with the UI's Gradio queue, so a flood of API calls gets 429s instead of piling up threads."""

    def __init__(self, limit: int, ui_waiting):
        self.limit, self.ui_waiting = limit, ui_waiting
        self.count = 0
        self._lock = threading.Lock()

    def try_enter(self) -> bool:
        with self._lock:
            # One request may hold the GPU while `limit` wait, as in Gradio's queue.
            if self.count + self.ui_waiting() >= self.limit + 1:
                return False
            self.count += 1
            return True

    def leave(self) -> None:
        with self._lock:
            self.count -= 1


def parse_generation_body(body) -> tuple[GenerationRequest, str]:
    """OpenAI images body -> (engine request, output format). Raises ApiError (400)."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object with at least a 'prompt' field")
    if "prompt" not in body:
        raise ApiError(400, "'prompt' is required: describe the image you want", param="prompt")
    response_format = body.get("response_format") or "b64_json"
    if response_format != "b64_json":
        raise ApiError(400, f"response_format {response_format!r} is not supported: this server does not host images; "
                       "use 'b64_json'", param="response_format")
    output_format = body.get("output_format") or "png"
    if not isinstance(output_format, str) or output_format.lower() not in images.FORMATS:
        raise ApiError(400, f"output_format {output_format!r} is not supported: use png, jpeg or webp",
                       param="output_format")
    quality = body.get("quality")
    if isinstance(quality, str) and quality.strip().lower() in QUALITY_ALIASES:
        quality = QUALITY_ALIASES[quality.strip().lower()]
    width = height = None
    size = body.get("size")
    if size is not None and size != "auto":
        match = re.fullmatch(r"\s*(\d{1,5})\s*[xX×]\s*(\d{1,5})\s*", size) if isinstance(size, str) else None
        if not match:
            raise ApiError(400, f"size {size!r} is not 'WIDTHxHEIGHT' (for example '1024x1024'), or 'auto'",
                           param="size")
        width, height = int(match.group(1)), int(match.group(2))
    request = GenerationRequest(prompt=body["prompt"], preset=quality, aspect=body.get("aspect"), width=width,
                                height=height, steps=body.get("steps"), seed=body.get("seed"), n=body.get("n", 1))
    return request, output_format.lower()


def install(app: FastAPI, *, engine, store, metrics, settings, ui_waiting) -> None:
    """Add the routes and the OpenAI-shaped error handlers to `app`."""
    router = APIRouter()
    waiting_room = WaitingRoom(settings.queue_size, ui_waiting)
    auth = settings.auth_pair()
    recent_seconds = [5.0]  # moving estimate of one request's time, for Retry-After

    def check_auth(request: Request) -> None:
        failure = security.check_api_credentials(request, auth)  # bytes, constant time, throttled per address
        if failure is not None:
            raise ApiError(failure.status, failure.message, failure.type, code=failure.code, headers=failure.headers)

    @router.get("/healthz")
    def healthz():
        """200 while the process serves requests, loading and warming included."""
        return {"status": "ok", "state": engine.state}

    @router.get("/readyz")
    def readyz():
        """200 once the model is loaded and warm; 503 before that and after a fatal error."""
        body = {"state": engine.state, "model": settings.model, "warm_shapes": engine.warm_shapes,
                "engine": engine.describe() if engine.pipe is not None else None}
        if engine.state_detail:
            body["detail"] = engine.state_detail
        if store.last_error:
            body["outputs_error"] = store.last_error
        return JSONResponse(body, status_code=200 if engine.state == "ready" else 503)

    @router.get("/metrics")
    def prometheus_metrics(request: Request):
        check_auth(request)
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @router.post("/v1/images/generations", openapi_extra={"requestBody": {
        "required": True, "content": {"application/json": {"schema": ImagesGenerationBody.model_json_schema()}}}})
    async def generations(request: Request):
        check_auth(request)
        route = "openai"
        try:
            raw = await request.body()
            if len(raw) > MAX_BODY_BYTES:
                raise ApiError(413, f"request body is {len(raw)} bytes; the limit is {MAX_BODY_BYTES}")
            try:
                body = json.loads(raw)
            except (ValueError, UnicodeDecodeError) as exc:
                raise ApiError(400, f"the request body is not valid JSON ({exc})") from None
            except RecursionError:
                raise ApiError(400, "the request body is nested too deeply to parse") from None
            gen_request, output_format = parse_generation_body(body)
            job = engine.resolve(gen_request)
        except RequestError as exc:
            metrics.observe_outcome("invalid", route)
            return error_response(400, str(exc), param=exc.param)
        except ApiError as exc:
            metrics.observe_outcome("invalid", route)
            return error_response(exc.status, exc.message, exc.type, exc.param, headers=exc.headers)

        try:
            engine.check_available()
        except EngineUnavailable as exc:
            metrics.observe_outcome("unavailable", route)
            return error_response(503, str(exc), "service_unavailable", headers={"Retry-After": "5"})
        if not waiting_room.try_enter():
            metrics.observe_outcome("busy", route)
            retry = max(1, math.ceil(recent_seconds[0] * (waiting_room.count + 1)))
            return error_response(429, f"the server is busy ({settings.queue_size} requests already waiting); "
                                  f"retry in about {retry} s", "server_busy", code="queue_full",
                                  headers={"Retry-After": str(retry)})
        cancel = threading.Event()
        try:
            work = asyncio.ensure_future(asyncio.to_thread(engine.generate, job, cancel=cancel))
            while not work.done():
                await asyncio.wait({work}, timeout=0.25)
                if not work.done() and await request.is_disconnected():
                    cancel.set()  # the client went away: stop at the next step, free the GPU
            result = work.result()
        except GenerationCancelled:
            metrics.observe_outcome("cancelled", route)
            return error_response(499, "cancelled: the client disconnected", "cancelled")
        except OutOfMemory as exc:
            metrics.observe_outcome("oom", route)
            return error_response(503, str(exc), "insufficient_gpu_memory", code="out_of_memory")
        except EngineUnavailable as exc:
            metrics.observe_outcome("unavailable", route)
            return error_response(503, str(exc), "service_unavailable", headers={"Retry-After": "5"})
        except Exception:
            metrics.observe_outcome("error", route)
            log.exception("generation failed")
            return error_response(500, "internal error while generating; see the server log", "server_error")
        finally:
            waiting_room.leave()

        recent_seconds[0] = 0.7 * recent_seconds[0] + 0.3 * result.timings["total"]
        metrics.observe_result(result, route)
        t0 = time.perf_counter()
        data = await asyncio.to_thread(_encode_all, result, output_format, settings.model)
        metrics.observe_stage(f"encode_{output_format}", time.perf_counter() - t0)
        store.save(result)  # PNG with metadata, written in the background
        warnings = list(result.warnings)
        if store.last_error:
            warnings.append(f"images are not being saved to the outputs folder: {store.last_error}")
        return {"created": int(time.time()), "data": data, "output_format": output_format,
                "size": f"{result.width}x{result.height}", "quality": result.preset,
                "zimage": {"seeds": result.seeds, "steps": result.steps, "timings": result.timings,
                           "peak_vram_bytes": result.peak_vram_bytes, "warnings": warnings}}

    app.include_router(router)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return error_response(exc.status, exc.message, exc.type, exc.param, exc.code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", [])[1:]) or None
        return error_response(400, f"{param or 'request'}: {first.get('msg', 'invalid request')}", param=param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code >= 500:
            return error_response(exc.status_code, str(exc.detail), "server_error", headers=exc.headers)
        return error_response(exc.status_code, str(exc.detail), headers=exc.headers)


def _encode_all(result, output_format: str, model: str) -> list[dict]:
    return [{"b64_json": base64.b64encode(images.encode(image, output_format, images.metadata(result, seed, model)))
             .decode(), "seed": seed, "revised_prompt": result.prompt}
            for image, seed in zip(result.images, result.seeds)]
