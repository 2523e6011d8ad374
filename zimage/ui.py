"""The Gradio UI: a thin layer of widgets over the engine interface, the GPU queue and the outputs store.

Generation is one Gradio event, exposed to programs as `api_name="generate"`; it waits in the service's one
GPU queue (gpu_queue.py) beside JSON-API requests and shows its place in line. Saving the full PNGs is a
chained event, so encoding them never holds up the next person's generation; the gallery shows fast JPEG
previews meanwhile.
"""

from __future__ import annotations

import asyncio

import gradio as gr
import numpy as np

from . import images, presets, request as requests
from .interface import EngineState
from .outcomes import QueueFull, outcome_of
from .request import MAX_IMAGES, SEED_MAX, EngineError, GenerationCancelled, GenerationRequest
from .units import GIB

EXAMPLE_PROMPTS = [
    "A cinematic photo of a red fox in a snowy birch forest at dawn, soft golden light, 85mm lens",
    "一只橘猫趴在洒满阳光的窗台上，水彩画风格",
    'A vintage travel poster of a steam train crossing a mountain bridge, bold title text "Z-IMAGE"',
    "雨后的上海外滩夜景，霓虹灯倒映在湿漉漉的街道上，电影感",
]


def example_prompts(model: str) -> list[str]:
    """The demo model only knows shapes and colours; the real model gets real prompts."""
    if model == "tiny":
        try:
            from .demo import EXAMPLE_PROMPTS as demo_prompts
        except ImportError:
            return EXAMPLE_PROMPTS
        return list(demo_prompts)
    return EXAMPLE_PROMPTS


def aspect_choices(tier: str) -> list[tuple[str, str]]:
    return [(f"{name} · {presets.size_label(tier, name)}", name) for name in presets.ASPECTS]


def size_note(tier: str, aspect: str) -> str:
    t = presets.TIERS.get(tier, presets.TIERS[presets.DEFAULT_TIER])
    note = f"**{presets.size_label(t.name, aspect)}** · {t.steps} steps · {t.description}"
    return note


def info_line(result) -> str:
    t = result.timings
    parts = [f"seed{'s' if len(result.seeds) > 1 else ''} {', '.join(map(str, result.seeds))}",
             f"{result.width}×{result.height}", f"{result.steps} steps", result.preset,
             f"encode {t['text_encode']:.2f} s · denoise {t['denoise']:.2f} s · decode {t['decode']:.2f} s · "
             f"total {t['total']:.2f} s"]
    if getattr(result, "task", "text-to-image") != "text-to-image":
        parts.insert(1, f"{result.task} · strength {result.strength:g}")
    if getattr(result, "loras", None):
        parts.insert(1, "LoRA " + ", ".join(f"{entry['name']} {entry['scale']:g}" for entry in result.loras))
    if result.peak_vram_bytes is not None:
        parts.append(f"peak VRAM {result.peak_vram_bytes / GIB:.1f} GiB")
    line = " · ".join(parts)
    for warning in result.warnings:
        line += f"\n\n⚠️ {warning}"
    return line


def run_details(result) -> dict:
    """What programs calling api_name="generate" need besides the pictures."""
    return {"seeds": result.seeds, "width": result.width, "height": result.height, "steps": result.steps,
            "preset": result.preset, "timings": result.timings, "peak_vram_bytes": result.peak_vram_bytes,
            "warnings": result.warnings, "loras": getattr(result, "loras", []),
            **({"replica": result.replica} if result.replica else {})}


def lora_text(*rows) -> str:
    """The LoRA picker's rows (name, scale, name, scale, ...) as the `loras` text the engine reads."""
    picked = [(name, scale) for name, scale in zip(rows[::2], rows[1::2]) if name]
    return ", ".join(f"{name}:{float(scale if scale is not None else 1.0):g}" for name, scale in picked)


def lora_choices(listing: list[dict]) -> tuple[list[tuple[str, str]], str]:
    """Picker choices (usable files of the folder) and a note on the files that cannot be used."""
    choices = [("none", "")] + [(f"{e['name']} · rank {e['rank']}", e["name"]) for e in listing if e["ok"]]
    broken = [f"⚠️ `{e['file']}`: {e['error']}" for e in listing if not e["ok"]]
    note = "\n\n".join(broken) if broken else ("" if len(choices) > 1 else
                                                "No LoRAs yet: put `.safetensors` files in the LoRA folder "
                                                "and press ↻.")
    return choices, note


def editor_inputs(value) -> tuple:
    """gr.ImageEditor's value -> (init image, mask or None). The painted strokes, on any layer, are the area to
    repaint (a white-on-black "L" mask the image's size); nothing painted means image-to-image."""
    import PIL.Image

    if not value or value.get("background") is None:
        return None, None
    image = value["background"]
    painted = None
    for layer in value.get("layers") or []:
        if layer is None:
            continue
        alpha = layer.convert("RGBA").getchannel("A")
        painted = alpha if painted is None else PIL.Image.fromarray(
            (np.maximum(np.asarray(painted), np.asarray(alpha.resize(painted.size))))).convert("L")
    if painted is None or painted.getextrema()[1] == 0:
        return image, None
    if painted.size != image.size:
        painted = painted.resize(image.size, PIL.Image.Resampling.NEAREST)
    return image, painted.point(lambda v: 255 if v > 0 else 0)


def editor_value(image) -> dict:
    """An image as gr.ImageEditor's value, unpainted (Send to Edit)."""
    return {"background": image, "layers": [], "composite": image}


STATE_LABELS = {EngineState.LOADING: "⏳ loading the model…",
                EngineState.WARMING: "🔥 warming up (compiling and trying each size)…",
                EngineState.READY: "✅ ready", EngineState.FAILED: "❌ failed to load: {detail}",
                EngineState.FATAL: "❌ stopped after a fatal error, waiting for a restart: {detail}"}


ERROR_TITLES = {"invalid": "Invalid request", "busy": "Busy", "unavailable": "Not ready yet",
                "oom": "Out of GPU memory", "error": "Server error"}
# "Error" is the title of Gradio's own input checks (a seed below the Number's minimum, say): a client mistake.
HTTP_STATUS_BY_TITLE = {"Invalid request": 400, "Error": 400, "Busy": 429, "Not ready yet": 503,
                        "Out of GPU memory": 503}


class GradioErrorStatus:
    """ASGI middleware: Gradio's REST route (`/gradio_api/run/<api_name>`) answers every error with HTTP 500;
    programs should see what the JSON API says for the same thing: 400 for their mistakes, 429 when busy, 503
    when not ready. A full Gradio queue on `/gradio_api/queue/join` stays 503, because Gradio's own clients
    (gradio_client, the browser UI) read exactly 503 as "queue full"; it gains a Retry-After header."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if not (path.startswith("/gradio_api/run/") or path == "/gradio_api/queue/join"):
            return await self.app(scope, receive, send)
        start: dict = {}
        body = bytearray()

        async def capture(message):
            if message["type"] == "http.response.start" and message["status"] in (500, 503):
                start.update(message)
                return
            if start and message["type"] == "http.response.body":
                body.extend(message.get("body", b""))
                if message.get("more_body"):
                    return
                await send({**start, **self._status(start, bytes(body))})
                await send({"type": "http.response.body", "body": bytes(body)})
                return
            await send(message)

        await self.app(scope, receive, capture)

    @staticmethod
    def _status(start: dict, body: bytes) -> dict:
        import json

        try:
            payload = json.loads(body)
        except ValueError:
            return {}
        if start["status"] == 500 and isinstance(payload, dict) and payload.get("title") in HTTP_STATUS_BY_TITLE:
            return {"status": HTTP_STATUS_BY_TITLE[payload["title"]]}
        if start["status"] == 503 and isinstance(payload, dict) and "Queue is full" in str(payload.get("detail")):
            return {"headers": [*start.get("headers", []), (b"retry-after", b"5")]}
        return {}


class GenerateArgsCompat:
    """ASGI middleware: Gradio needs a value for every input, and `generate` gained one (`loras`, last). A
    body with the six values of the earlier signature -- on the REST routes (`/gradio_api/run/generate`,
    `/gradio_api/call/generate`) or joining the queue with generate's `fn_index` -- gets the new input's default
    ("": LoRAs only from the prompt's <lora:...> tags), so callers written for it keep working (gradio_client
    fills defaults itself)."""

    PATHS = ("/gradio_api/run/generate", "/gradio_api/call/generate")
    QUEUE = "/gradio_api/queue/join"
    LEGACY_INPUTS = 6

    def __init__(self, app, generate_fn_index: int | None = None):
        self.app, self.fn_index = app, generate_fn_index

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "").rstrip("/") if scope["type"] == "http" else ""
        if scope["type"] != "http" or scope.get("method") != "POST" or (
                path not in self.PATHS and not (path == self.QUEUE and self.fn_index is not None)):
            return await self.app(scope, receive, send)
        import json

        body, more, first = bytearray(), True, None
        while more:  # the body's size is already bounded by security.py, in front of this
            message = await receive()
            if message["type"] != "http.request":
                first = message
                break
            body += message.get("body", b"")
            more = message.get("more_body", False)
        try:
            payload = json.loads(body) if body else None
        except ValueError:
            payload = None
        if (isinstance(payload, dict) and isinstance(payload.get("data"), list)
                and len(payload["data"]) == self.LEGACY_INPUTS
                and (path != self.QUEUE or payload.get("fn_index") == self.fn_index)):
            payload["data"].append("")
            body = bytearray(json.dumps(payload).encode())
            scope = {**scope, "headers": [(k, v) for k, v in scope["headers"] if k != b"content-length"]
                     + [(b"content-length", str(len(body)).encode())]}
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return first or {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def status_line(engine) -> str:
    d, status = engine.describe(), engine.status()
    state = STATE_LABELS[status.state].format(detail=status.detail)
    extras = f" · {d['device']} · {d['dtype']}"
    if status.loaded:
        extras += f" · attention {d['attention']}" + (" · compiled" if d["compiled"] else "") + (
            " · fp8" if d["fp8"] else "")
    return f"**{d['model']}**{extras} — {state}"


def build(engine, queue, store, metrics, settings) -> gr.Blocks:
    running = {}  # session -> gpu_queue.Ticket of its generation in line or running
    lora_rows = settings.max_loras if settings.loras_enabled() else 0  # the LoRA picker: a name and scale per row

    async def generate(prompt, quality, aspect, seed, random_seed, count, loras="", request: gr.Request = None,
                       progress=gr.Progress()):
        req = GenerationRequest(prompt=prompt, preset=quality, aspect=aspect,
                                seed=None if random_seed else seed, n=count, loras=loras or None)
        return await run_request(req, request, progress)

    async def edit(value, prompt, strength, quality, seed, random_seed, request: gr.Request, progress=gr.Progress()):
        image, mask = editor_inputs(value)
        if image is None:
            refuse(requests.RequestError("upload or paste an image to edit first", "image"))
        if image.mode in ("RGBA", "LA", "P"):
            image = image.convert("RGB")  # the editor's own transparency is not a mask here: strokes are
        req = GenerationRequest(prompt=prompt, preset=quality, aspect=None, image=image, mask=mask,
                                strength=strength, seed=None if random_seed else seed)
        # Decoding and resizing the input takes a moment: the cheap checks run off the event loop here.
        return await run_request(req, request, progress, check_in_thread=True)

    async def run_request(req, request, progress, check_in_thread: bool = False):
        try:
            if check_in_thread:
                await asyncio.to_thread(requests.resolve, req)
            else:
                requests.resolve(req)  # cheap checks first: a mistake is reported even when the queue is full
            engine.status().check()
            ticket = queue.admit()
        except (EngineError, QueueFull) as exc:
            refuse(exc)
        session = request.session_hash if request is not None else None
        if session:
            running[session] = ticket
        work = None
        try:
            job = await asyncio.to_thread(engine.resolve, req)  # tokenizes: off the event loop
            # The engine reports steps on the GPU thread, where gr.Progress finds no event (its context is the
            # event loop's) and drops them: the step is kept here and shown from this loop.
            step: dict = {}
            work = asyncio.ensure_future(queue.run(ticket, job, lambda done, total: step.update(now=(done, total))))
            while not work.done():
                ahead = queue.position(ticket)
                if ahead:
                    progress((0, job.denoise_steps * len(job.seeds)), desc=f"In queue: {ahead} ahead of you",
                             unit="steps")
                elif step:
                    progress(step["now"], desc="Denoising", unit="steps")
                await asyncio.wait({work}, timeout=0.25)
            result = work.result()
        except GenerationCancelled:
            metrics.observe_outcome("cancelled", "ui")
            return None, "Cancelled.", None, gr.update(), None
        except EngineError as exc:
            refuse(exc)
        except asyncio.CancelledError:  # Gradio cancelled the event (a Gradio API cancel): stop the work as well
            ticket.cancel.set()  # the GPU thread stops at the next step (or the request leaves the line)
            if work is not None:
                work.cancel()  # nobody waits for its answer any more
            raise
        finally:
            queue.leave(ticket)  # no-op once it ran; frees the place of a request resolve refused
            if session and running.get(session) is ticket:
                running.pop(session)
        metrics.observe_result(result, "ui")
        saving = store.save(result)  # full PNGs with metadata, written in the background
        return result.images, info_line(result), run_details(result), result.seeds[0], (result, saving)

    def refuse(exc: BaseException):
        outcome = outcome_of(exc)
        metrics.observe_outcome(outcome.status, "ui")
        # A user's mistake or a busy server is not a server fault: no traceback in the log for it. The title
        # also tells GradioErrorStatus which HTTP status Gradio's REST route should have answered.
        raise gr.Error(outcome.message, title=ERROR_TITLES[outcome.status],
                       print_exception=outcome.status == "error") from None

    def report_saved(pending):
        """Wait for the background PNG writes of the last run, then offer the files and refresh history."""
        if not pending:
            return gr.update(), gr.update(), gr.update()
        result, futures = pending
        paths, errors = [], []
        for future in futures:
            try:
                paths.append(str(future.result(timeout=120)))
            except OSError as exc:  # counted by the store (zimage_save_errors_total)
                errors.append(f"{exc.strerror or exc}")
        line = info_line(result)
        if errors:
            line += f"\n\n⚠️ could not save to the outputs folder: {errors[0]} — the images above are not kept"
        return paths or None, line, history_items()

    def cancel_running(request: gr.Request):
        ticket = running.get(request.session_hash) if request is not None else None
        if ticket is None:
            return gr.update(), gr.update()
        ticket.cancel.set()
        return None, "Cancelled."

    def history_items():
        return [(e["path"], f"{e['prompt'][:80]} · seed {e['seed']}") for e in store.recent(24)]

    def on_quality(tier, aspect):
        # Only relabel the sizes: setting the value here would undo an aspect set in the same update
        # (Send to Generate sets quality and aspect together).
        return gr.update(choices=aspect_choices(tier)), size_note(tier, aspect)

    def read_back(data):
        if not data:
            return None, "", gr.update(interactive=False)
        try:
            meta = images.read_parameters(data)
        except Exception as exc:  # any unreadable upload: say so, never crash the page
            return None, f"⚠️ {exc}", gr.update(interactive=False)
        text = images.parameters_text({**{"steps": "?", "sampler": "?", "guidance_scale": presets.GUIDANCE_SCALE, "seed": "?",
                                          "width": "?", "height": "?", "model": "?", "preset": "?"}, **meta})
        return meta, text, gr.update(interactive=True)

    def send_to_form(meta):
        if not meta:
            return (gr.update(),) * (8 + 2 * lora_rows)
        tier = meta.get("preset") if meta.get("preset") in presets.TIERS else presets.DEFAULT_TIER
        size = (meta.get("width"), meta.get("height"))
        aspect = next((a for a in presets.ASPECTS if presets.preset_size(tier, a) == size), presets.DEFAULT_ASPECT)
        seed = meta.get("seed")
        loras = [(entry.get("name", ""), entry.get("scale", 1.0)) for entry in meta.get("loras") or []]
        rows = []
        for i in range(lora_rows):  # the picker: each LoRA with its scale, then empty rows
            name, scale = loras[i] if i < len(loras) else ("", 1.0)
            rows += [gr.update(value=name), gr.update(value=scale)]
        text = ", ".join(f"{name}:{float(scale):g}" for name, scale in loras)
        return (meta.get("prompt", ""), tier, gr.update(choices=aspect_choices(tier), value=aspect),
                seed if seed is not None else -1, seed is None, size_note(tier, aspect), gr.Tabs(selected="generate"),
                text, *rows)

    def refresh_loras():
        choices, note = lora_choices(engine.list_loras())
        return (*[gr.update(choices=choices) for _ in range(lora_rows)], note)

    with gr.Blocks(title="Z-Image-Turbo studio") as demo:
        status = gr.Markdown(status_line(engine), elem_id="status")
        timer = gr.Timer(2.0)
        last = gr.State(None)
        with gr.Tabs() as tabs:
            with gr.Tab("Generate", id="generate"):
                with gr.Row():
                    with gr.Column(scale=2):
                        prompt = gr.Textbox(label="Prompt", lines=3, elem_id="prompt",
                                            placeholder="Describe the image (English or 中文)")
                        with gr.Row():
                            quality = gr.Dropdown(list(presets.TIERS), value=presets.DEFAULT_TIER, label="Quality",
                                                  elem_id="quality")
                            aspect = gr.Dropdown(aspect_choices(presets.DEFAULT_TIER), value=presets.DEFAULT_ASPECT,
                                                 label="Aspect", elem_id="aspect")
                        note = gr.Markdown(size_note(presets.DEFAULT_TIER, presets.DEFAULT_ASPECT))
                        with gr.Row():
                            seed = gr.Number(value=-1, precision=0, label="Seed", minimum=-1, maximum=SEED_MAX)
                            random_seed = gr.Checkbox(value=True, label="Random seed")
                            reuse = gr.Button("♻️ Reuse last seed", size="sm")
                        count = gr.Slider(1, MAX_IMAGES, value=1, step=1, precision=0, label="Images")
                        with gr.Accordion("LoRA", open=False, visible=lora_rows > 0):
                            pickers = []
                            for i in range(lora_rows):
                                with gr.Row():
                                    pickers.append(gr.Dropdown([("none", "")], value="", label=f"LoRA {i + 1}",
                                                               allow_custom_value=True, scale=3,
                                                               elem_id=f"lora-{i + 1}"))
                                    pickers.append(gr.Slider(-requests.LORA_SCALE_LIMIT, requests.LORA_SCALE_LIMIT,
                                                             value=1.0, step=0.05, label="scale", scale=2,
                                                             elem_id=f"lora-scale-{i + 1}"))
                            loras = gr.Textbox("", label="LoRAs sent (name:scale, …; <lora:name:scale> in the "
                                                         "prompt works too)", elem_id="loras", max_lines=1)
                            with gr.Row():
                                lora_note = gr.Markdown()
                                lora_refresh = gr.Button("↻ Rescan LoRA folder", size="sm")
                        with gr.Row():
                            go = gr.Button("Generate", variant="primary", elem_id="generate")
                            stop = gr.Button("Cancel", variant="stop", elem_id="cancel")
                        gr.Examples(example_prompts(settings.model), inputs=[prompt], label="Examples")
                    with gr.Column(scale=3):
                        gallery = gr.Gallery(label="Result", format="jpeg", columns=2, height=560,
                                             elem_id="result", object_fit="contain")
                        info = gr.Markdown(elem_id="info")
                        with gr.Accordion("Run details", open=False):
                            details = gr.JSON(label="Run details")
                        files = gr.Files(label="PNG files (with parameters)", interactive=False)
                        to_edit = gr.Button("Send to Edit", size="sm", elem_id="send-to-edit")
            with gr.Tab("Edit", id="edit"):
                with gr.Row():
                    with gr.Column(scale=2):
                        editor = gr.ImageEditor(label="Image: paint over the area to repaint (inpainting); paint "
                                                      "nothing to change the whole picture (image-to-image)",
                                                type="pil", image_mode="RGBA", format="png", layers=False,
                                                brush=gr.Brush(colors=["#ffffff"], color_mode="fixed",
                                                               default_size=40),
                                                sources=("upload", "clipboard"), height=520, elem_id="editor")
                        edit_prompt = gr.Textbox(label="Prompt", lines=2, elem_id="edit-prompt",
                                                 placeholder="Describe the result (the painted area, or the whole)")
                        strength = gr.Slider(0, 1, value=requests.DEFAULT_STRENGTH[requests.IMAGE_TO_IMAGE],
                                             step=0.05, label="Strength: 0 keeps the input, 1 repaints fully",
                                             elem_id="strength")
                        with gr.Row():
                            edit_quality = gr.Dropdown(list(presets.TIERS), value=presets.DEFAULT_TIER,
                                                       label="Quality (steps; the size is the input's)")
                            edit_seed = gr.Number(value=-1, precision=0, label="Seed", minimum=-1, maximum=SEED_MAX)
                            edit_random = gr.Checkbox(value=True, label="Random seed")
                        with gr.Row():
                            edit_go = gr.Button("Edit", variant="primary", elem_id="edit")
                            edit_stop = gr.Button("Cancel", variant="stop", elem_id="edit-cancel")
                    with gr.Column(scale=3):
                        edit_gallery = gr.Gallery(label="Result", format="jpeg", columns=2, height=560,
                                                  elem_id="edit-result", object_fit="contain")
                        edit_info = gr.Markdown(elem_id="edit-info")
                        edit_files = gr.Files(label="PNG files (with parameters)", interactive=False)
            with gr.Tab("History", id="history"):
                history = gr.Gallery(label="Recent outputs (kept across restarts)", columns=6, height=640)
                with gr.Row():
                    refresh = gr.Button("Refresh", size="sm")
                    history_to_edit = gr.Button("Send selected to Edit", size="sm", elem_id="history-to-edit")
            with gr.Tab("Read PNG parameters", id="read"):
                upload = gr.File(label="Drop a PNG made here or by an A1111-compatible tool", type="binary",
                                 file_types=[".png"])
                params_text = gr.Textbox(label="parameters", lines=4, interactive=False)
                params = gr.JSON(label="Parsed")
                send = gr.Button("Send to Generate", interactive=False)

        last_seed = gr.State(None)
        # UI-only events stay out of the Gradio API listing: programs see `generate` alone.
        quality.change(on_quality, [quality, aspect], [aspect, note], queue=False, api_visibility="private")
        aspect.change(lambda t, a: size_note(t, a), [quality, aspect], note, queue=False, api_visibility="private")
        reuse.click(lambda s: (s if s is not None else -1, s is None), last_seed, [seed, random_seed], queue=False,
                    api_visibility="private")
        run = go.click(generate, [prompt, quality, aspect, seed, random_seed, count, loras],
                       [gallery, info, details, last_seed, last], api_name="generate",
                       concurrency_limit=settings.queue_size + queue.workers)
        demo.generate_fn_index = run.get("id")  # for GenerateArgsCompat (six-value calls of the old signature)
        for picker in pickers:  # the picker writes the `loras` text that `generate` reads
            picker.change(lora_text, pickers, loras, queue=False, api_visibility="private")
        lora_refresh.click(refresh_loras, None, [*pickers[::2], lora_note], queue=False, api_visibility="private")
        # Open the result on its first image: the preview shows it whole, where the grid would cut a square
        # image's bottom off. A separate UI-only step, so the API's output stays a plain list of images.
        run.then(lambda: gr.Gallery(selected_index=0), None, gallery, queue=False, api_visibility="private")
        run.then(report_saved, last, [files, info, history], concurrency_limit=None, api_visibility="private")
        stop.click(cancel_running, None, [gallery, info], cancels=[run], queue=False, api_visibility="private")
        refresh.click(history_items, None, history, queue=False, api_visibility="private")
        upload.change(read_back, upload, [params, params_text, send], queue=False, api_visibility="private")
        send.click(send_to_form, params, [prompt, quality, aspect, seed, random_seed, note, tabs, loras, *pickers],
                   queue=False, api_visibility="private")

        edit_last, edit_details, history_pick = gr.State(None), gr.State(None), gr.State(None)
        edit_run = edit_go.click(edit, [editor, edit_prompt, strength, edit_quality, edit_seed, edit_random],
                                 [edit_gallery, edit_info, edit_details, edit_seed, edit_last],
                                 concurrency_limit=settings.queue_size + queue.workers, api_visibility="private")
        edit_run.then(lambda: gr.Gallery(selected_index=0), None, edit_gallery, queue=False, api_visibility="private")
        edit_run.then(report_saved, edit_last, [edit_files, edit_info, history], concurrency_limit=None,
                      api_visibility="private")
        edit_stop.click(cancel_running, None, [edit_gallery, edit_info], cancels=[edit_run], queue=False,
                        api_visibility="private")

        def send_result_to_edit(pending, text):
            if not pending:
                return gr.update(), gr.update(), gr.update()
            result, _ = pending
            return editor_value(result.images[0]), result.prompt or text, gr.Tabs(selected="edit")

        to_edit.click(send_result_to_edit, [last, prompt], [editor, edit_prompt, tabs], queue=False,
                      api_visibility="private")

        def pick_history(evt: gr.SelectData):
            return evt.index

        def send_history_to_edit(index):
            entries = store.recent(24)
            if index is None or not 0 <= index < len(entries):
                return gr.update(), gr.update(), gr.update()
            import PIL.Image

            with PIL.Image.open(entries[index]["path"]) as image:
                picture = image.convert("RGB")
            return editor_value(picture), entries[index].get("prompt", ""), gr.Tabs(selected="edit")

        history.select(pick_history, None, history_pick, queue=False, api_visibility="private")
        history_to_edit.click(send_history_to_edit, history_pick, [editor, edit_prompt, tabs], queue=False,
                              api_visibility="private")

        def tick():
            state = engine.status().state
            return status_line(engine), gr.Timer(active=state in (EngineState.LOADING, EngineState.WARMING))

        timer.tick(tick, None, [status, timer], queue=False, api_visibility="private")
        demo.load(lambda: (status_line(engine), history_items()), None, [status, history], queue=False,
                  api_visibility="private")
        if lora_rows:
            demo.load(refresh_loras, None, [*pickers[::2], lora_note], queue=False, api_visibility="private")
    return demo
