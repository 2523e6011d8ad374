"""The engine interface every front end uses, and that an in-process engine and a remote replica both offer.

    status()                               -> EngineStatus: state, detail, what is warm
    resolve(GenerationRequest)             -> Job (validated; RequestError says what to change)
    generate(Job, on_progress, cancel)     -> GenerationResult (EngineError subclasses on failure)
    describe()                             -> dict: model, device, dtype, attention, compile, fp8, memory profile
    list_loras()                           -> list of dicts: the LoRA folder's files (name, rank, size, layers,
                                              whether each loads and why not, whether it is on the device now)

Front ends (UI, JSON API, metrics, CLI, warm-up) import this module and `request`, never the engine's
insides. `Engine` in engine.py is the in-process implementation.
"""

from __future__ import annotations

import enum
import threading
from dataclasses import dataclass, field
from typing import Callable, Protocol

from .request import EngineUnavailable, GenerationRequest, GenerationResult, Job

ProgressFn = Callable[[int, int], None]  # (steps done, steps in the whole request)


class EngineState(str, enum.Enum):
    LOADING = "loading"  # reading weights, placing, compiling
    WARMING = "warming"  # loaded; warm-up generations running
    READY = "ready"
    FAILED = "failed"  # loading or warm-up failed; the process should exit
    FATAL = "fatal"  # a fatal device error (or too many OOMs): refuses work until restarted

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class EngineStatus:
    state: EngineState
    detail: str = ""  # why, for failed/fatal
    loaded: bool = False  # the model is loaded (describe() is complete)
    warm: tuple[dict, ...] = field(default_factory=tuple)  # warm-up report: one entry per shape served warm

    @property
    def ready(self) -> bool:
        return self.state is EngineState.READY

    def check(self, allow_warming: bool = False) -> None:
        """Raise EngineUnavailable, saying why, unless an engine in this state takes work."""
        state = self.state
        if state is EngineState.READY or (allow_warming and state is EngineState.WARMING):
            return
        if state is EngineState.WARMING:
            raise EngineUnavailable("the model is warming up; try again in a few seconds")
        if state is EngineState.LOADING:
            raise EngineUnavailable("the model is still loading; try again shortly")
        if state is EngineState.FATAL:
            raise EngineUnavailable(f"the engine stopped after a fatal error ({self.detail}) and waits to be "
                                    "restarted; under supervisord that happens automatically")
        raise EngineUnavailable(f"the model failed to load: {self.detail}")


class ImageEngine(Protocol):
    def status(self) -> EngineStatus: ...

    def resolve(self, request: GenerationRequest) -> Job: ...

    def generate(self, job: Job, on_progress: ProgressFn | None = None,
                 cancel: threading.Event | None = None) -> GenerationResult: ...

    def describe(self) -> dict: ...

    def list_loras(self) -> list[dict]: ...


def start_in_background(start: Callable[[], None], mark_failed: Callable[[str], None],
                        on_failure: Callable[[BaseException], None]) -> threading.Thread:
    """Run an engine's `start` (load, warm up) on a background thread, so the server answers /healthz meanwhile;
    if it fails, `mark_failed` records why and `on_failure` is called (app.py stops the server)."""
    import logging

    def run() -> None:
        try:
            start()
        except BaseException as exc:  # noqa: BLE001 - reported to the caller, which stops the server
            mark_failed(str(exc))
            logging.getLogger("zimage.engine").error("start-up failed: %s", exc)
            on_failure(exc)

    thread = threading.Thread(target=run, name="zimage-engine-start", daemon=True)
    thread.start()
    return thread
