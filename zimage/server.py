"""Assembles the service: engine + GPU queue + outputs store + metrics + HTTP routes + Gradio UI in one
FastAPI app. The engine loads and warms in the background (Engine.start_in_background), so /healthz answers
from the first second."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import gradio as gr
from fastapi import FastAPI

from . import api, security, ui
from .engine import Engine
from .gpu_queue import GenerationQueue
from .metrics import Metrics
from .outputs import OutputStore
from .settings import Settings

log = logging.getLogger("zimage.server")


@dataclass
class Service:
    app: FastAPI
    engine: Engine
    queue: GenerationQueue
    store: OutputStore
    metrics: Metrics


def create_service(settings: Settings, engine: Engine | None = None) -> Service:
    engine = engine or Engine(settings)
    store = OutputStore(settings.outputs, settings.model)
    queue = GenerationQueue(engine, settings.queue_size, workers=getattr(engine, "concurrency", 1))  # Ray: replicas
    metrics = Metrics(engine, queue_depth=lambda: queue.waiting + engine.waiting,
                      max_waiting=lambda: max(queue.max_waiting, engine.stats.max_waiting), store=store)
    if hasattr(engine, "metrics_collector"):  # Ray Serve (replicas.py): the zimage_replica_* series
        metrics.registry.register(engine.metrics_collector())
    demo = ui.build(engine, queue, store, metrics, settings)
    # Gradio hands every UI event to our queue at once (its handler is async: a waiting one holds no thread);
    # the GPU queue above decides who waits and who is told "busy", for the UI and the JSON API alike.
    demo.queue(max_size=settings.queue_size, default_concurrency_limit=settings.queue_size + queue.workers)

    app = FastAPI(title="Z-Image-Turbo studio", version="1", docs_url=None, redoc_url=None)  # /docs: api.py

    async def finish_writing_outputs() -> None:
        # Here, not after uvicorn returns: on SIGTERM uvicorn re-raises the signal as its loop ends, which
        # would kill the process with images still queued for writing.
        await asyncio.to_thread(store.close)

    app.router.add_event_handler("shutdown", finish_writing_outputs)
    api.install(app, engine=engine, queue=queue, store=store, metrics=metrics, settings=settings)
    settings.outputs.mkdir(parents=True, exist_ok=True)
    # The outputs folder is not an allowed path: the UI gets Gradio's cached copies of the images it shows, and
    # the folder itself (history.jsonl: every prompt) is never served; security.py refuses it as well.
    app = gr.mount_gradio_app(app, demo, path="/", auth=settings.auth_pair(), ssr_mode=False,
                              show_error=True, max_file_size=security.UPLOAD_FILE_LIMIT,
                              auth_message="Z-Image-Turbo studio")
    app.add_middleware(ui.GradioErrorStatus)
    # generate's six-value calls (the signature before LoRAs) get the new `loras` input's default
    app.add_middleware(ui.GenerateArgsCompat, generate_fn_index=getattr(demo, "generate_fn_index", None))
    security.install(app, settings)  # Host/Origin checks, body limits, login throttle: in front of everything
    return Service(app=app, engine=engine, queue=queue, store=store, metrics=metrics)
