"""Assembles the service: engine + outputs store + metrics + HTTP routes + Gradio UI in one FastAPI app,
and loads/warms the engine in the background so /healthz answers from the first second."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Callable

import gradio as gr
from fastapi import FastAPI

from . import api, security, ui
from .engine import Engine
from .metrics import Metrics
from .outputs import OutputStore
from .settings import Settings

log = logging.getLogger("zimage.server")


@dataclass
class Service:
    app: FastAPI
    engine: Engine
    store: OutputStore
    metrics: Metrics


def create_service(settings: Settings, engine: Engine | None = None) -> Service:
    engine = engine or Engine(settings)
    store = OutputStore(settings.outputs, settings.model)
    queue_holder: list[gr.Blocks] = []

    def ui_waiting() -> int:
        """Events waiting in Gradio's queue (not yet running)."""
        queue = getattr(queue_holder[0], "_queue", None) if queue_holder else None
        return len(queue) if queue is not None else 0

    metrics = Metrics(engine, queue_depth=lambda: ui_waiting() + engine.waiting, store=store)
    demo = ui.build(engine, store, metrics, settings)
    demo.queue(max_size=settings.queue_size, default_concurrency_limit=1)
    queue_holder.append(demo)

    app = FastAPI(title="Z-Image-Turbo studio", version="1", docs_url="/docs", redoc_url=None)
    api.install(app, engine=engine, store=store, metrics=metrics, settings=settings, ui_waiting=ui_waiting)
    settings.outputs.mkdir(parents=True, exist_ok=True)
    # The outputs folder is not an allowed path: the UI gets Gradio's cached copies of the images it shows, and
    # the folder itself (history.jsonl: every prompt) is never served; security.py refuses it as well.
    app = gr.mount_gradio_app(app, demo, path="/", auth=settings.auth_pair(), ssr_mode=False,
                              show_error=True, max_file_size=security.UPLOAD_FILE_LIMIT,
                              auth_message="Z-Image-Turbo studio")
    security.install(app, settings)  # Host/Origin checks, body limits, login throttle: in front of everything
    return Service(app=app, engine=engine, store=store, metrics=metrics)


def start_engine(service: Service, on_failure: Callable[[BaseException], None]) -> threading.Thread:
    """Load, then warm up, on a background thread; `on_failure` is called if either fails."""
    from warmup import warm_up

    def run() -> None:
        engine = service.engine
        try:
            engine.load()
            if engine.settings.warmup_enabled():
                warm_up(engine)
            else:
                engine.mark_ready()
        except BaseException as exc:  # noqa: BLE001 - reported to the caller, which stops the server
            engine.state, engine.state_detail = "failed", str(exc)
            log.error("start-up failed: %s", exc)
            on_failure(exc)

    thread = threading.Thread(target=run, name="zimage-engine-start", daemon=True)
    thread.start()
    return thread
