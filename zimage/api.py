"""HTTP routes beside the Gradio UI: health, readiness, metrics, and OpenAI-style image generation.

Every client mistake answers 4xx in OpenAI's error shape {"error": {"message", "type", "param", "code"}}.
Unknown request fields are ignored (OpenAI clients send `model`, `user`, `style`, ...).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import logging
import re
import time
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import images, request as requests, security
from .outcomes import Outcome, QueueFull, outcome_of
from .presets import MAX_SIDE, MAX_STEPS, MIN_SIDE, MIN_STEPS, SIZE_MULTIPLE, TIERS
from .request import MAX_IMAGES, MAX_PROMPT_CHARS, SEED_MAX, EngineError, GenerationRequest, RequestError

log = logging.getLogger("zimage.api")

# OpenAI's quality names, mapped to our tiers ("auto" and "standard" are the default tier).
QUALITY_ALIASES = {"low": "Draft", "medium": "Standard", "standard": "Standard", "auto": "Standard",
                   "high": "High", "hd": "High"}


class LoraItem(BaseModel):
    name: str = Field(..., description="A LoRA file's name in the server's LoRA folder, without '.safetensors'")
    scale: float = Field(1.0, ge=-requests.LORA_SCALE_LIMIT, le=requests.LORA_SCALE_LIMIT,
                         description="Strength: 1 as trained, 0 off, negative inverts it")


class ImagesGenerationBody(BaseModel):
    """Documents the request body in /openapi.json; parsing is done by hand for clearer messages."""

    prompt: str = Field(..., description=f"What to draw (up to {MAX_PROMPT_CHARS} characters; 512 text tokens "
                                         "are used)")
    n: int = Field(1, ge=1, le=MAX_IMAGES, description=f"Number of images, 1-{MAX_IMAGES}; image i uses seed + i")
    size: str | None = Field(None, description=f"'WxH' (multiples of {SIZE_MULTIPLE}, {MIN_SIDE}-{MAX_SIDE}), or "
                                               "'auto' for the quality's size")
    quality: str | None = Field("Standard", description=f"{', '.join(TIERS)} (or low/medium/high/hd/auto)")
    aspect: str | None = Field("1:1", description="Extension: aspect ratio for the quality's area when size is unset")
    response_format: str = Field("b64_json", description="Only b64_json: images are not hosted")
    output_format: str = Field("png", description="png (with parameters metadata), jpeg or webp")
    seed: int | None = Field(None, description=f"Extension: 0..{SEED_MAX}, or -1/null for random")
    steps: int | None = Field(None, ge=MIN_STEPS, le=MAX_STEPS,
                              description="Extension: denoising steps (default: the quality's)")
    loras: list[LoraItem] | None = Field(None, description="Extension: LoRAs from the server's LoRA folder (GET "
                                         "/v1/loras), at most --max-loras; also `<lora:name:scale>` in the prompt")


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


def outcome_response(outcome: Outcome) -> JSONResponse:
    headers = {"Retry-After": str(outcome.retry_after)} if outcome.retry_after else None
    return error_response(outcome.http_status, outcome.message, outcome.error_type, outcome.param, outcome.code,
                          headers)


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
                                height=height, steps=body.get("steps"), seed=body.get("seed"), n=body.get("n", 1),
                                loras=body.get("loras"))
    return request, output_format.lower()


async def parse_json_body(request: Request) -> tuple[GenerationRequest, str, dict]:
    raw = await request.body()  # its size was limited while it was read (security.py)
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON ({exc})") from None
    except RecursionError:
        raise ApiError(400, "the request body is nested too deeply to parse") from None
    gen_request, output_format = parse_generation_body(body)
    return gen_request, output_format, body


def in_api_terms(exc: RequestError, body: dict) -> RequestError:
    """The engine's field names in the client's: width/height came from `size`, the preset is `quality`."""
    if exc.param in ("width", "height") and body.get("size") not in (None, "auto"):
        return RequestError(f"size {body['size']!r}: {exc}", "size")
    if exc.param == "preset":
        return RequestError(str(exc), "quality")
    return exc


def install(app: FastAPI, *, engine, queue, store, metrics, settings) -> None:
    """Add the routes and the OpenAI-shaped error handlers to `app`."""
    router = APIRouter()
    auth = settings.auth_pair()

    def check_auth(request: Request) -> None:
        failure = security.check_api_credentials(request, auth)  # bytes, constant time, throttled per address
        if failure is not None:
            raise ApiError(failure.status, failure.message, failure.type, code=failure.code, headers=failure.headers)

    @router.get("/healthz")
    def healthz():
        """200 while the process serves requests, loading and warming included."""
        return {"status": "ok", "state": str(engine.status().state)}

    @router.get("/readyz")
    def readyz():
        """200 once the model is loaded and warm; 503 before that and after a fatal error."""
        status = engine.status()
        body = {"state": str(status.state), "model": settings.model, "warm_shapes": list(status.warm),
                "engine": engine.describe() if status.loaded else None}
        if status.detail:
            body["detail"] = status.detail
        if store.last_error:
            body["outputs_error"] = store.last_error
        if hasattr(engine, "replica_summary"):  # Ray Serve (replicas.py): {"ready", "total", "replicas": [...]}
            body["replicas"] = engine.replica_summary()
        return JSONResponse(body, status_code=200 if status.ready else 503)

    @router.get("/metrics")
    def prometheus_metrics(request: Request):
        check_auth(request)
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    # /docs works offline: Swagger UI's assets come from the swagger-ui-bundle package, not a CDN.
    import swagger_ui_bundle

    docs_assets = {name: Path(swagger_ui_bundle.swagger_ui_path) / name
                   for name in ("swagger-ui-bundle.js", "swagger-ui.css", "favicon-32x32.png")}

    @router.get("/docs", include_in_schema=False)
    def docs():
        return get_swagger_ui_html(openapi_url="/openapi.json", title="Z-Image-Turbo studio API",
                                   swagger_js_url="/docs-assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs-assets/swagger-ui.css",
                                   swagger_favicon_url="/docs-assets/favicon-32x32.png")

    @router.get("/docs-assets/{name}", include_in_schema=False)
    def docs_asset(name: str):
        if name not in docs_assets:  # these three files only, never a path
            raise ApiError(404, f"no such documentation asset: {name!r}")
        return FileResponse(docs_assets[name])

    async def serve(request: Request, route: str, parse) -> JSONResponse | dict:
        """The one path of both image routes: parse, cheap checks (a mistake is a 400 even when the queue is
        full), engine state, a place in the one queue, engine.resolve off the event loop (it tokenizes), the
        run (a disconnected client cancels it), then encode, save and answer. `parse(request)` gives
        (GenerationRequest, output format, the client's fields for error names)."""
        check_auth(request)

        def refuse(outcome: Outcome) -> JSONResponse:
            metrics.observe_outcome(outcome.status, route)
            return outcome_response(outcome)

        fields: dict = {}
        try:
            gen_request, output_format, fields = await parse(request)
            await asyncio.to_thread(requests.resolve, gen_request)  # decodes edit inputs: off the event loop
            engine.status().check()
            ticket = queue.admit()
        except ApiError as exc:
            metrics.observe_outcome("invalid", route)
            return error_response(exc.status, exc.message, exc.type, exc.param, headers=exc.headers)
        except RequestError as exc:
            return refuse(outcome_of(in_api_terms(exc, fields)))
        except (EngineError, QueueFull) as exc:
            return refuse(outcome_of(exc))

        try:
            job = await asyncio.to_thread(engine.resolve, gen_request)
        except RequestError as exc:
            queue.leave(ticket)
            return refuse(outcome_of(in_api_terms(exc, fields)))
        try:
            work = asyncio.ensure_future(queue.run(ticket, job))
            while not work.done():
                await asyncio.wait({work}, timeout=0.25)
                if not work.done() and await request.is_disconnected():
                    ticket.cancel.set()  # the client went away: stop at the next step, free the GPU
            result = work.result()
        except asyncio.CancelledError:  # the handler itself was cancelled (a proxy saw the client go): stop too
            ticket.cancel.set()  # the GPU thread stops at the next step (or the request leaves the line)
            work.cancel()  # nobody waits for its answer any more
            raise
        except Exception as exc:
            outcome = outcome_of(exc)
            if outcome.status == "error":
                log.exception("generation failed")
            return refuse(outcome)

        metrics.observe_result(result, route)
        t0 = time.perf_counter()
        data, encoded = await asyncio.to_thread(_encode_all, result, output_format, settings.model)
        metrics.observe_stage(f"encode_{output_format}", time.perf_counter() - t0)
        # The PNGs with metadata are written in the background; a PNG response hands over its bytes.
        store.save(result, png=encoded if output_format == "png" else None)
        warnings = list(result.warnings)
        png_bytes = (sum(len(blob) for blob in encoded) if output_format == "png"
                     else 3 * result.width * result.height * len(encoded))  # an uncompressed PNG's size at most
        save_problem = store.problem(png_bytes)
        if save_problem:
            warnings.append(f"images are not being saved to the outputs folder: {save_problem}")
        task = ({"task": result.task, "strength": result.strength, "input_sha256": result.input_sha256}
                if job.task != "text-to-image" else {})
        if result.loras:
            task["loras"] = result.loras
        return {"created": int(time.time()), "data": data, "output_format": output_format,
                "size": f"{result.width}x{result.height}", "quality": result.preset,
                "zimage": {**task, "seeds": result.seeds, "steps": result.steps, "timings": result.timings,
                           "peak_vram_bytes": result.peak_vram_bytes, "warnings": warnings,
                           **({"replica": result.replica} if result.replica else {})}}

    @router.get("/v1/loras")
    async def loras(request: Request):
        """The LoRA folder, rescanned: each file's name (what requests use), rank, size, layers, whether it loads
        (and why not) and whether it is on the device now; plus the limits requests must keep."""
        check_auth(request)
        listing = await asyncio.to_thread(engine.list_loras)  # reads file headers: off the event loop
        return {"object": "list", "data": listing, "max_loras": settings.max_loras if settings.loras_enabled() else 0,
                "rank_budget": settings.lora_rank, "scale_range": [-requests.LORA_SCALE_LIMIT,
                                                                   requests.LORA_SCALE_LIMIT]}

    @router.post("/v1/images/generations", openapi_extra={"requestBody": {
        "required": True, "content": {"application/json": {"schema": ImagesGenerationBody.model_json_schema()}}}})
    async def generations(request: Request):
        return await serve(request, "openai", parse_json_body)

    @router.post("/v1/images/edits", openapi_extra={"requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": ImagesEditForm.model_json_schema()}}}})
    async def edits(request: Request):
        return await serve(request, "openai_edit", parse_edit_form)

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


def _encode_all(result, output_format: str, model: str) -> tuple[list[dict], list[bytes]]:
    """Response entries, and each image's encoded bytes."""
    encoded = [images.encode(image, output_format, images.metadata(result, seed, model))
               for image, seed in zip(result.images, result.seeds)]
    data = [{"b64_json": base64.b64encode(blob).decode(), "seed": seed, "revised_prompt": result.prompt}
            for blob, seed in zip(encoded, result.seeds)]
    return data, encoded


# ---- POST /v1/images/edits: image-to-image and inpainting, OpenAI's multipart shape ------------------------------
# Two input files (image, mask) at their limit plus the text fields; anything past this is refused while reading.
MAX_EDIT_BODY_BYTES = security.BODY_LIMITS["/v1/images/edits"]
EDIT_FIELDS = ("prompt", "n", "size", "quality", "aspect", "response_format", "output_format", "seed", "steps",
               "strength", "loras")


class ImagesEditForm(BaseModel):
    """Documents the multipart form in /openapi.json; parsing is done by hand for clearer messages."""

    image: bytes = Field(..., description="The picture to edit: PNG, JPEG or WebP, at most "
                                          f"{requests.MAX_INPUT_BYTES >> 20} MiB and "
                                          f"{requests.MAX_INPUT_PIXELS // 1_000_000} MP", json_schema_extra={
                                              "format": "binary"})
    mask: bytes | None = Field(None, description="Optional, the image's size: its transparent pixels are the area to "
                                                 "repaint (OpenAI's convention); a mask without transparency repaints "
                                                 "its white pixels. With a mask the task is inpainting, without it "
                                                 "image-to-image", json_schema_extra={"format": "binary"})
    prompt: str = Field(..., description="What the result should show")
    n: int = Field(1, ge=1, le=MAX_IMAGES)
    size: str | None = Field(None, description="'WxH' (multiples of 16), or 'auto'/unset for the input's size snapped "
                                               "to multiples of 16 keeping its aspect ratio")
    quality: str | None = Field("Standard", description="Sets the steps; with `aspect`, also the size")
    strength: float | None = Field(None, ge=0, le=1, description="Extension: 0 keeps the input, 1 repaints fully "
                                                                 "(default 0.6; 1.0 with a mask)")
    response_format: str = Field("b64_json")
    output_format: str = Field("png")
    seed: int | None = Field(None)
    steps: int | None = Field(None, ge=MIN_STEPS, le=MAX_STEPS)
    loras: str | None = Field(None, description="Extension: LoRAs as text, 'name:scale, name' (or a JSON list)")


async def read_bounded(request: Request, limit: int) -> bytes:
    """The request body, refused (413) as soon as it passes `limit` bytes: a declared Content-Length first, then
    the bytes as they arrive (chunked uploads declare none)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body is {declared} bytes; the limit is {limit} "
                            f"(images up to {requests.MAX_INPUT_BYTES >> 20} MiB each)")
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > limit:
            raise ApiError(413, f"request body is over the limit of {limit} bytes "
                                f"(images up to {requests.MAX_INPUT_BYTES >> 20} MiB each)")
    return bytes(raw)


async def parse_edit_form(request: Request) -> tuple[GenerationRequest, str, dict]:
    """multipart/form-data -> (engine request, output format, the text fields as sent). Raises ApiError (4xx)."""
    from starlette.datastructures import UploadFile

    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        raise ApiError(415, "send multipart/form-data with an 'image' file and a 'prompt' field "
                            "(as OpenAI's /v1/images/edits takes them)")
    raw = await read_bounded(request, MAX_EDIT_BODY_BYTES)

    async def replay():
        return {"type": "http.request", "body": raw, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=4, max_fields=64)
    except Exception as exc:  # malformed multipart: python-multipart's and Starlette's errors alike
        raise ApiError(400, f"the multipart body could not be read ({str(exc)[:200]})") from None

    async def file_bytes(name: str):
        items = form.getlist(name) + form.getlist(f"{name}[]")
        if not items:
            return None
        if len(items) > 1:
            raise ApiError(400, f"send one '{name}'; got {len(items)}", param=name)
        item = items[0]
        if not isinstance(item, UploadFile):
            raise ApiError(400, f"'{name}' must be a file (PNG, JPEG or WebP), not a text field", param=name)
        return await item.read()

    fields = {}
    for key in EDIT_FIELDS:
        value = form.get(key)
        if value is not None and not isinstance(value, str):
            raise ApiError(400, f"'{key}' must be a text field, not a file", param=key)
        if value is not None and value != "":
            fields[key] = value
    image, mask = await file_bytes("image"), await file_bytes("mask")
    if image is None:
        raise ApiError(400, "'image' is required: the picture to edit (PNG, JPEG or WebP)", param="image")
    if "prompt" not in fields:
        raise ApiError(400, "'prompt' is required: describe the result you want", param="prompt")
    base, output_format = parse_generation_body({k: v for k, v in fields.items() if k not in ("strength",)})
    return (dataclasses.replace(base, aspect=fields.get("aspect"), n=fields.get("n", 1), image=image, mask=mask,
                                strength=fields.get("strength")), output_format, fields)

