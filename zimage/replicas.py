"""Scale-out on Ray Serve: one UI, one queue and one history over many GPUs (and machines).

    python app.py --model tiny --replicas 2 --replica-gpus 0     # a local Ray instance, 2 CPU replicas
    python app.py --replicas 8 --ray-address auto                 # join a running Ray cluster
    serve run deploy/ray/serve_config.yaml                        # Ray's own CLI (ingress as a deployment)

Three deployments in one Serve application (APP_NAME):

    Engine   EngineReplica: the in-process `Engine` (engine.py) on one GPU (`num_gpus`), one generation at a time
             (`max_ongoing_requests=1`). Loads and warms up in its constructor, so Serve counts it RUNNING only
             when it is ready; `check_health` raises once the engine is fatal (CUDA error, too many OOMs), so Serve
             replaces it. `generate` streams ("started", id), ("progress", (done, total)) ... ("result", result);
             cancelling the call (asyncio.CancelledError in the replica) sets the engine's cancel event, which it
             honours between denoising steps.
    Board    ReplicaBoard: each replica reports its counters, pid and state here every second (a handle call
             cannot pick a replica, and a broadcast would wait behind a running generation).
    Ingress  only under `serve run/deploy`: the same FastAPI app as `python app.py` (api.py, ui.py, security.py,
             metrics, outputs) built by `server.create_service` around a RemoteEngine. Under
             `python app.py --replicas N` the app.py process itself is the ingress (supervisord supervises it).

RemoteEngine offers the engine interface (interface.ImageEngine) over the deployment handles, so the front ends,
the GPU queue, the metrics and the outputs store are the ones the single-process service uses:

  - resolve() runs in the ingress and is request.resolve: pure validation, the random seed fixed there. The
    engine's own part of resolving (memory refusal and plan, the prompt's token count, which needs the tokenizer)
    runs in the replica (Engine.plan) before its GPU lock, so the ingress loads no model files.
  - the ingress's GPU queue runs `concurrency` (= replicas) generations at once and does admission: the place in
    line counts all waiting work, and a full line is "busy" / HTTP 429 + Retry-After as before. Serve's
    max_queued_requests (= --queue-size) is a second limit at the handle; its BackPressureError is also a 429.
  - images cross the process boundary as uint8 numpy arrays (no PNG encode/decode; Ray ships them out of band);
    the ingress encodes the response and writes the outputs once (one history index).
  - a request whose replica died (SIGKILL, node lost) or turned fatal is sent again to another replica (same job,
    same seeds, same pixels), at most REPLACEMENT_TRIES times; then 503.

Nothing imports this module (nor Ray) unless --replicas or `serve run` asks for it.
"""

from __future__ import annotations

import asyncio
import bisect
import copyreg
import dataclasses
import logging
import os
import sys
import threading
import time

import numpy as np

# Ray reads these when it is imported: every replica's log lines in full (no "repeated 3x across cluster"), without
# colour codes, in the driver's (the app's) log, where the supervision monitor and people read them.
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_COLOR_PREFIX", "0")

import ray  # noqa: E402
from ray import serve  # noqa: E402
from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError, TaskCancelledError
from ray.serve.exceptions import (BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError,
                                  RequestCancelledError)

from . import request as requests
from .engine import Engine, EngineStats
from .interface import EngineState, EngineStatus, ProgressFn, start_in_background
from .metrics import SECONDS_BUCKETS
from .outcomes import QueueFull
from .request import EngineUnavailable, GenerationCancelled, GenerationRequest, GenerationResult, Job, OutOfMemory
from .settings import Settings

log = logging.getLogger("zimage.replicas")

APP_NAME = "zimage"
ENGINE, BOARD, INGRESS = "Engine", "Board", "Ingress"
LORA_LISTING_SECONDS = 10.0
REPORT_SECONDS = 1.0  # replicas report to the board this often
STALE_SECONDS = 5.0  # a report older than this is a replica that is gone
POLL_SECONDS = 1.0  # the ingress reads Serve's status and the board this often
REPLACEMENT_TRIES = 2  # times a request is sent again when its replica died or turned fatal
HEALTH_CHECK_SECONDS = 5.0
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


# Errors cross from the replica to the ingress pickled. OutOfMemory takes (message, stage); pickle's default for an
# exception would rebuild it from its message alone and fail, so say how (the other errors' defaults work).
copyreg.pickle(OutOfMemory, lambda exc: (OutOfMemory, (str(exc), exc.stage)))


def replica_gpus(settings: Settings) -> float:
    """GPUs per replica: the number asked, or for auto 1 where the cluster has GPUs and 0 (CPU replicas) where not.
    Needs a connected Ray (ray.init) for auto."""
    if settings.replica_gpus != "auto":
        return float(settings.replica_gpus)
    return 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0


def _log_to_stdout(settings: Settings) -> None:
    """zimage.* log lines of a replica (or a `serve run` ingress) on its stdout, which Ray forwards to the driver's
    log, in the app's format: "cancelled ...", "oom handled ...", "fatal: ..." read as in the single process."""
    logger = logging.getLogger("zimage")
    if not any(getattr(h, "zimage_replica", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        handler.zimage_replica = True
        logger.addHandler(handler)
    logger.setLevel(settings.log_level.upper())
    logger.propagate = False


# ---- the replica ---------------------------------------------------------------------------------------------
class EngineReplica:
    """One Engine on one GPU (Ray pins it: CUDA_VISIBLE_DEVICES holds the one GPU it was given)."""

    def __init__(self, settings: Settings, board=None):
        _log_to_stdout(settings)
        from .loading import quiet_libraries

        quiet_libraries()
        context = serve.get_replica_context()
        self.id = context.replica_id.unique_id
        self.pid = os.getpid()
        self.node = ray.util.get_node_ip_address()
        self.board = board
        self.steps = 0  # denoising steps run, all requests: the tests' evidence that a cancel stopped the work
        self.started = time.time()
        self._loras: list[dict] = []  # the LoRA folder's listing, re-read every LORA_LISTING_SECONDS
        self._loras_at = float("-inf")
        if ray.get_runtime_context().get_accelerator_ids().get("GPU"):
            settings = settings.replace(device="cuda")  # the GPU Ray gave this replica is the only one it sees
        self.engine = Engine(settings)
        self._gpu_thread = None  # the engine runs on one thread per replica: one generation at a time
        self._stop = threading.Event()
        threading.Thread(target=self._report_loop, name="zimage-report", daemon=True).start()
        try:
            self.engine.start()
        except BaseException as exc:
            self.engine.mark_failed(str(exc))
            self._stop.set()
            log.error("replica %s: start-up failed: %s", self.id, exc)
            raise
        log.info("replica %s ready: pid %d on %s, %s", self.id, self.pid, self.node, self.engine.describe()["device"])

    async def generate(self, job: Job):
        """Streams ("started", replica id), ("progress", (done, total)) ..., ("result", GenerationResult with its
        images as uint8 arrays). Cancelling the call stops the engine at the next step; the call ends only once
        the engine has stopped, so the replica never runs two generations at once."""
        from concurrent.futures import ThreadPoolExecutor

        if self._gpu_thread is None:
            self._gpu_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="zimage-gpu")
        loop = asyncio.get_running_loop()
        cancel = threading.Event()
        latest: list = [None]
        wake = asyncio.Event()

        def on_progress(done: int, total: int) -> None:
            self.steps += 1
            latest[0] = (done, total)
            loop.call_soon_threadsafe(wake.set)

        def work() -> GenerationResult:
            return self.engine.generate(self.engine.plan(job), on_progress, cancel)

        future = loop.run_in_executor(self._gpu_thread, work)
        try:
            yield ("started", self.id)
            while not future.done():
                waiter = asyncio.ensure_future(wake.wait())
                await asyncio.wait({future, waiter}, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                if wake.is_set():
                    wake.clear()
                    yield ("progress", latest[0])  # the latest only: a slow reader never falls behind
            result = future.result()  # EngineError subclasses travel to the ingress as themselves
            yield ("result", dataclasses.replace(result, images=[np.asarray(im) for im in result.images],
                                                 replica=self.id))
        finally:
            if not future.done():  # cancelled (the caller cancelled, or went away): stop between steps
                cancel.set()
                try:
                    await asyncio.shield(future)
                except BaseException:  # noqa: BLE001 - GenerationCancelled, or cancelled again meanwhile
                    pass

    def check_health(self) -> None:
        """Serve calls this every few seconds; raising makes it replace the replica (a fresh process, a fresh CUDA
        context): the cluster's equivalent of the OOM monitor's supervisorctl restart."""
        status = self.engine.status()
        if status.state in (EngineState.FATAL, EngineState.FAILED):
            raise RuntimeError(f"engine {status.state}: {status.detail}")

    def report(self) -> dict:
        """What the board holds for this replica (also returned to a direct call)."""
        engine, stats = self.engine, self.engine.stats
        status = engine.status()
        entry = {"id": self.id, "pid": self.pid, "node": self.node, "state": status.state.value,
                 "detail": status.detail, "warm": list(status.warm), "steps": self.steps,
                 "completed": stats.completed, "cancelled": stats.cancelled, "failed": stats.failed,
                 "inflight": stats.inflight, "waiting": engine.waiting, "max_concurrent": stats.max_concurrent,
                 "max_waiting": stats.max_waiting, "oom": dict(stats.oom), "started": self.started,
                 "describe": engine.describe() if status.loaded else None, "time": time.time()}
        entry["gpu_memory"] = _gpu_memory(engine.device) if status.loaded else None
        entry["loras"] = self._lora_listing() if status.loaded else []
        return entry

    def _lora_listing(self) -> list[dict]:
        """The replica's LoRA folder (GET /v1/loras, the UI picker), re-read every LORA_LISTING_SECONDS: a direct
        call would wait behind a running generation (one call at a time per replica)."""
        now = time.monotonic()
        if now - self._loras_at >= LORA_LISTING_SECONDS:
            try:
                self._loras = self.engine.list_loras()
            except Exception as exc:  # noqa: BLE001 - a listing problem must not stop the reports
                log.warning("listing the LoRA folder failed: %s", exc)
            self._loras_at = now
        return self._loras

    def _report_loop(self) -> None:
        while not self._stop.wait(REPORT_SECONDS):
            if self.board is None:
                return
            try:
                self.board.report.remote(self.report()).result(timeout_s=10)
            except Exception as exc:  # noqa: BLE001 - the board restarting: report again next second
                log.debug("report to the board failed: %s", exc)

    def __del__(self):
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()


def _gpu_memory(device: str) -> dict | None:
    if not device.startswith("cuda"):
        return None
    import torch

    free, total = torch.cuda.mem_get_info(device)
    return {"used": total - free, "total": total, "reserved": torch.cuda.memory_reserved(device)}


class ReplicaBoard:
    """The replicas' latest reports, by replica id (replicas report every REPORT_SECONDS)."""

    def __init__(self):
        self._entries: dict[str, dict] = {}

    def report(self, entry: dict) -> None:
        self._entries[entry["id"]] = entry

    def snapshot(self) -> list[dict]:
        now = time.time()
        for key in [k for k, e in self._entries.items() if now - e["time"] > 600]:
            del self._entries[key]  # long gone: forget
        return list(self._entries.values())


# ---- the application -----------------------------------------------------------------------------------------
def engine_deployment(settings: Settings, gpus: float):
    return serve.deployment(EngineReplica, name=ENGINE).options(
        num_replicas=settings.replicas,
        max_ongoing_requests=1,  # one generation at a time per replica (and per GPU)
        max_queued_requests=settings.queue_size,  # the ingress's queue admits first; this is a second limit
        ray_actor_options={"num_cpus": 1, "num_gpus": gpus},
        health_check_period_s=HEALTH_CHECK_SECONDS,
        health_check_timeout_s=30,
        graceful_shutdown_timeout_s=60,  # a replica being stopped finishes its generation first
        max_constructor_retry_count=3,  # weights missing: fail the deployment after 3 tries, not 20
    )


def board_deployment(head: bool = False):
    options = {"num_cpus": 0}
    if head:
        options["resources"] = {"node:__internal_head__": 0.001}
    return serve.deployment(ReplicaBoard, name=BOARD).options(
        num_replicas=1, max_ongoing_requests=1000, ray_actor_options=options,
        logging_config={"enable_access_log": False})


def engine_application(settings: Settings, gpus: float):
    """Engine replicas + the board (under `python app.py --replicas N`: the app.py process is the ingress)."""
    return engine_deployment(settings, gpus).bind(settings, board_deployment().bind())


def deploy(settings: Settings):
    """Connect to Ray (a local instance, or --ray-address), run the engine application, return (engine handle,
    board handle). Blocks until every replica is up (RuntimeError if the deployment fails)."""
    connect(settings)
    gpus = replica_gpus(settings)
    log.info("deploying %d engine replica(s) with %g GPU(s) each on Ray Serve (app %r)", settings.replicas, gpus,
             APP_NAME)
    serve.start(proxy_location="Disabled")  # no Ray HTTP proxy: this process serves HTTP
    try:
        handle = serve.run(engine_application(settings, gpus), name=APP_NAME, route_prefix=None)
    except RuntimeError as exc:  # Serve's message names the deployment; the replica's own error says why
        raise RuntimeError(f"{exc} {_replica_error()}".strip()) from None
    return handle, serve.get_deployment_handle(BOARD, APP_NAME)


def _replica_error() -> str:
    """The last line of the traceback Serve keeps for the engine deployment's failed constructor (the error)."""
    try:
        app = serve.status().applications.get(APP_NAME)
        message = app.deployments[ENGINE].message if app and ENGINE in app.deployments else ""
    except Exception:  # noqa: BLE001 - only for the message
        return ""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return f"(a replica: {lines[-1][:600]})" if lines else ""


def connect(settings: Settings) -> None:
    if ray.is_initialized():
        return
    if settings.ray_address:
        ray.init(address=settings.ray_address, log_to_driver=True)
    else:
        # A local instance lives and dies with this process. Its dashboard is off unless asked for, and then on
        # loopback only (it can run code on the cluster).
        ray.init(include_dashboard=settings.ray_dashboard, dashboard_host="127.0.0.1", log_to_driver=True)


def stop(local: bool) -> None:
    """Take the application down: the whole local instance, or our application on a cluster we joined."""
    try:
        if local:
            serve.shutdown()
        else:
            serve.delete(APP_NAME)
    except Exception as exc:  # noqa: BLE001 - shutting down anyway
        log.warning("serve shutdown: %s", exc)
    ray.shutdown()


# ---- the engine interface over handles -----------------------------------------------------------------------
class RemoteEngine:
    """interface.ImageEngine over Ray Serve deployment handles; `server.create_service` takes it in place of Engine.

    `concurrency` generations run at once (one per replica: the GPU queue's worker count). status(), describe(),
    `stats` and `waiting` are read from a snapshot a poller thread refreshes every POLL_SECONDS (Serve's replica
    states, the board's reports), so none of them waits on the cluster."""

    def __init__(self, settings: Settings, handle=None, board=None):
        self.settings = settings
        self.concurrency = max(1, settings.replicas)
        self._handle, self._board = handle, board
        self._stream_handle = None
        self._owns_deployment = handle is None  # app.py: we deploy (and take down); `serve run`: Serve does
        self.stats = EngineStats()  # summed over the replicas (max for the max_* fields)
        self._failed: str | None = None
        self._ready = 0
        self._app_note = "starting Ray Serve"
        self._entries: list[dict] = []
        self._gone: dict[str, dict] = {}  # last reports of replicas that left: counters never go backwards
        self._seen: dict[str, dict] = {}
        self._waiting = 0  # sent to Serve, not yet started on a replica
        self._lock = threading.Lock()
        self._seconds: dict[str, list] = {}  # replica -> [bucket counts..., sum, count] (generation seconds)
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None

    # ---- the interface ----
    def status(self) -> EngineStatus:
        if self._failed:
            return EngineStatus(EngineState.FAILED, self._failed)
        ready, total, entries = self._ready, self.settings.replicas, self._entries
        detail = f"{ready} of {total} replicas ready"
        if ready:
            first = next((e for e in entries if e["state"] == "ready"), None)
            return EngineStatus(EngineState.READY, detail, loaded=True, warm=tuple(first["warm"]) if first else ())
        warming = any(e["state"] == "warming" for e in entries)
        note = f"; {self._app_note}" if self._app_note else ""
        return EngineStatus(EngineState.WARMING if warming else EngineState.LOADING, detail + note)

    def list_loras(self) -> list[dict]:
        """The LoRA folder as a ready replica last reported it (replicas share one folder layout: deploy the same
        files to every node)."""
        first = next((e for e in self._entries if e["state"] == "ready"), None)
        return list(first.get("loras") or []) if first else []

    def describe(self) -> dict:
        first = next((e["describe"] for e in self._entries if e["state"] == "ready" and e["describe"]), None) or {}
        s = self.settings
        base = {"model": s.model, "model_description": s.model, "dtype": s.dtype, "attention": s.attention,
                "compiled": False, "speed_switches": [], "fp8": False, "memory_profile": None, "usable_gib": None}
        base.update(first)
        replica_device = first.get("device", "cuda" if s.replica_gpus not in ("0", "auto") else "?")
        base["device"] = f"Ray Serve · {self._ready}/{s.replicas} replicas · {replica_device}"
        base["replica_device"] = replica_device
        return base

    def replica_summary(self) -> dict:
        """For /readyz: how many replicas are ready of how many wanted, and each one's report."""
        keys = ("id", "pid", "node", "state", "detail", "steps", "completed", "cancelled", "inflight")
        return {"ready": self._ready, "total": self.settings.replicas,
                "replicas": [{k: e.get(k) for k in keys} for e in self._entries]}

    def resolve(self, request: GenerationRequest) -> Job:
        """Validation only (request.resolve): the seed is fixed here; the replica adds the memory plan and the
        token count (Engine.plan)."""
        return requests.resolve(request)

    @property
    def waiting(self) -> int:
        return self._waiting

    def generate(self, job: Job, on_progress: ProgressFn | None = None,
                 cancel: threading.Event | None = None) -> GenerationResult:
        """Run `job` on a replica, streaming its progress; `cancel` stops it between steps (it cancels the Serve
        call). Sent again to another replica if the one running it died or turned fatal."""
        self.status().check()
        cancel = cancel or threading.Event()
        for attempt in range(REPLACEMENT_TRIES + 1):
            try:
                result = self._generate_once(job, on_progress, cancel)
            except _ReplicaLost as lost:
                if cancel.is_set():
                    raise GenerationCancelled("cancelled") from None
                if attempt == REPLACEMENT_TRIES:
                    raise EngineUnavailable(f"the replica running this request was lost ({lost}) and so were "
                                            f"{REPLACEMENT_TRIES} more tries; try again shortly") from None
                log.warning("replica lost while generating (%s); sending the request to another replica", lost)
                time.sleep(0.5 * (attempt + 1))  # a moment for Serve to stop routing to it
                continue
            self._observe(result)
            return result

    # ---- start-up: as Engine's ----
    def start_in_background(self, on_failure) -> threading.Thread:
        """Deploy the replicas (app.py) or wait for them (serve run) on a background thread; `on_failure` is called
        if that fails (the deployment failed: every replica's constructor failed, three times)."""
        return start_in_background(self.load, self.mark_failed, on_failure)

    def load(self) -> None:
        if not ray.is_initialized():
            raise RuntimeError("RemoteEngine.connect() must run first (on the main thread)")
        self._start_poller()
        if self._handle is None:
            self._handle, self._board = deploy(self.settings)
        self._refresh()

    def mark_failed(self, reason: str) -> None:
        self._failed = reason

    def shutdown(self) -> None:
        """app.py: the server stopped. Take down what we deployed."""
        if self._owns_deployment and ray.is_initialized():
            stop(local=not self.settings.ray_address)
        self._stop.set()

    def connect(self) -> None:
        """app.py calls this on its main thread, before uvicorn starts: a local instance's processes are started
        with PR_SET_PDEATHSIG, which Linux fires when the *thread* that started them ends (the start-up thread
        would take them down once the model is warm), and uvicorn's SIGTERM handler must be installed after
        Ray's, so that a stop drains requests instead of killing the process."""
        connect(self.settings)

    # ---- one try on one replica ----
    def _generate_once(self, job: Job, on_progress: ProgressFn | None, cancel: threading.Event) -> GenerationResult:
        if self._stream_handle is None:  # readiness (the poller) can come before serve.run returns the handle
            handle = self._handle or serve.get_deployment_handle(ENGINE, APP_NAME)
            self._stream_handle = handle.options(stream=True)
        with self._lock:
            self._waiting += 1
        started = False
        stream = self._stream_handle.generate.remote(job)
        finished = threading.Event()

        def watch() -> None:  # a cancel set by the UI, the API (client gone) or the queue: cancel the Serve call
            while not finished.wait(0.05):
                if cancel.is_set():
                    stream.cancel()
                    return

        threading.Thread(target=watch, name="zimage-cancel-watch", daemon=True).start()
        result = None
        try:
            for kind, payload in stream:
                if kind == "started":
                    started = True
                    with self._lock:
                        self._waiting -= 1
                elif kind == "progress" and on_progress is not None:
                    on_progress(*payload)
                elif kind == "result":
                    result = payload
        except (RequestCancelledError, TaskCancelledError) as exc:
            raise GenerationCancelled("cancelled") from exc
        except RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, EngineUnavailable):  # a fatal replica refusing work, until Serve replaces it
                raise _ReplicaLost(str(cause)) from None
            if isinstance(cause, BaseException):
                raise cause from None  # RequestError, OutOfMemory, GenerationCancelled...: as in process
            raise
        except (RayActorError, ActorUnavailableError, ReplicaUnavailableError) as exc:
            raise _ReplicaLost(type(exc).__name__) from None
        except DeploymentUnavailableError as exc:
            raise EngineUnavailable(f"no engine replica can take work: {exc.message}") from None
        except BackPressureError as exc:
            raise QueueFull(f"the server is busy ({exc}); retry shortly", round(exc.retry_after_s or 5)) from None
        finally:
            finished.set()
            if not started:
                with self._lock:
                    self._waiting -= 1
        if result is None:
            if cancel.is_set():
                raise GenerationCancelled("cancelled")
            raise _ReplicaLost("the stream ended without a result")
        import PIL.Image

        return dataclasses.replace(result, images=[PIL.Image.fromarray(np.array(a)) for a in result.images])

    def _observe(self, result: GenerationResult) -> None:
        seconds = result.timings["total"]
        with self._lock:
            row = self._seconds.setdefault(result.replica or "?", [0] * (len(SECONDS_BUCKETS) + 2))
            row[bisect.bisect_left(SECONDS_BUCKETS, seconds)] += 1  # the bucket with le >= seconds (or +Inf)
            row[-2] += seconds
            row[-1] += 1

    # ---- the snapshot ----
    def _start_poller(self) -> None:
        if self._poller is None:
            self._poller = threading.Thread(target=self._poll_loop, name="zimage-replicas", daemon=True)
            self._poller.start()

    def _poll_loop(self) -> None:
        while not self._stop.wait(POLL_SECONDS):
            try:
                self._refresh()
            except Exception as exc:  # noqa: BLE001 - Ray busy or restarting: keep the last snapshot
                log.debug("replica status: %s", exc)

    def _refresh(self) -> None:
        app = serve.status().applications.get(APP_NAME)
        running = 0
        if app is None:
            self._app_note = "the Serve application is not deployed yet"
        else:
            engine = app.deployments.get(ENGINE)
            running = engine.replica_states.get("RUNNING", 0) if engine else 0
            note = (engine.message if engine else "") or app.message
            self._app_note = f"Serve: {app.status.value}" + (f" ({note[:300]})" if note else "")
        if self._board is None and app is not None:
            self._board = serve.get_deployment_handle(BOARD, APP_NAME)
        entries = self._board.snapshot.remote().result(timeout_s=10) if self._board is not None else []
        now = time.time()
        fresh = sorted((e for e in entries if now - e["time"] < STALE_SECONDS), key=lambda e: e["started"])
        fresh_ids = {e["id"] for e in fresh}
        with self._lock:
            for rid, entry in self._seen.items():
                if rid not in fresh_ids:
                    self._gone[rid] = entry  # its last counters still count in the sums
            for rid in fresh_ids:
                self._gone.pop(rid, None)  # back (its reports were late): counted once, live
            self._seen = {e["id"]: e for e in fresh}
            # Ready: Serve routes to it (RUNNING) and its engine says ready (not fatal): the smaller count, since
            # Serve notices a dead replica a moment after its reports stop, and a fatal one before Serve does.
            self._ready = min(running, sum(1 for e in fresh if e["state"] == "ready"))
            self._entries = fresh
            self.stats = self._aggregate(fresh, list(self._gone.values()))

    @staticmethod
    def _aggregate(live: list[dict], gone: list[dict]) -> EngineStats:
        stats = EngineStats()
        for e in live + gone:
            stats.oom.update(e["oom"])
            stats.cancelled += e["cancelled"]
            stats.completed += e["completed"]
            stats.failed += e["failed"]
            stats.max_concurrent = max(stats.max_concurrent, e["max_concurrent"])
            stats.max_waiting = max(stats.max_waiting, e["max_waiting"])
        stats.inflight = sum(e["inflight"] for e in live)
        return stats

    # ---- /metrics: the replica-labelled series ----
    def metrics_collector(self):
        return _ReplicaCollector(self)


class _ReplicaLost(Exception):
    """The replica running a request died (or refused it as fatal): the request can go to another."""


class _ReplicaCollector:
    """zimage_replica_* series, one per replica (label `replica`), read at scrape time from the poller's snapshot
    and from the results the ingress received. The unlabelled zimage_* series are the sums (RemoteEngine.stats)."""

    def __init__(self, engine: RemoteEngine):
        self.engine = engine

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        engine = self.engine
        yield GaugeMetricFamily("zimage_replicas_ready", "Engine replicas ready for work", value=engine._ready)
        yield GaugeMetricFamily("zimage_replicas_target", "Engine replicas asked for (--replicas)",
                                value=engine.settings.replicas)
        entries = list(engine._entries)
        info = GaugeMetricFamily("zimage_replica_info", "1 per live replica: its pid and node",
                                 labels=["replica", "pid", "node"])
        state = GaugeMetricFamily("zimage_replica_engine_state", "1 for each replica's engine state",
                                  labels=["replica", "state"])
        gauges = {name: GaugeMetricFamily(f"zimage_replica_{name}", text, labels=["replica"]) for name, text in (
            ("inflight", "Generations running on the replica (0 or 1)"),
            ("queue_depth", "Generations waiting inside the replica for its GPU"))}
        counters = {name: CounterMetricFamily(f"zimage_replica_{name}", text, labels=["replica"]) for name, text in (
            ("steps", "Denoising steps the replica ran"),
            ("completed", "Generations the replica completed"),
            ("cancelled", "Generations cancelled on the replica"),
            ("failed", "Generations that failed on the replica"))}
        oom = CounterMetricFamily("zimage_replica_oom", "Out-of-memory events per replica", labels=["replica", "kind"])
        gpu = GaugeMetricFamily("zimage_replica_gpu_memory_used_bytes", "GPU memory in use on the replica's GPU",
                                labels=["replica"])
        for e in entries:
            rid = e["id"]
            info.add_metric([rid, str(e["pid"]), e["node"]], 1.0)
            for name in EngineState:
                state.add_metric([rid, name.value], 1.0 if e["state"] == name.value else 0.0)
            gauges["inflight"].add_metric([rid], e["inflight"])
            gauges["queue_depth"].add_metric([rid], e["waiting"])
            for name in counters:
                counters[name].add_metric([rid], e[name])
            for kind in ("handled", "failed", "fatal"):
                oom.add_metric([rid, kind], e["oom"].get(kind, 0))
            if e.get("gpu_memory"):
                gpu.add_metric([rid], e["gpu_memory"]["used"])
        yield from (info, state, *gauges.values(), *counters.values(), oom, gpu)
        seconds = HistogramMetricFamily("zimage_replica_generation_seconds", "Engine time per request, by replica",
                                        labels=["replica"])
        with engine._lock:
            rows = {rid: list(row) for rid, row in engine._seconds.items()}
        for rid, row in rows.items():
            cumulative, buckets = 0, []
            for le, count in zip([*map(str, SECONDS_BUCKETS), "+Inf"], row[:-2]):
                cumulative += count
                buckets.append((le, cumulative))
            seconds.add_metric([rid], buckets, row[-2])
        yield seconds


# ---- `serve run` / `serve deploy`: the ingress as a deployment -----------------------------------------------
def settings_from_args(args: dict | None) -> Settings:
    """The application's `args` (deploy/ray/serve_config.yaml) as settings: the same names as the flags, the same
    validation; ZIMAGE_* variables are read too (flags, here args, win)."""
    from .settings import OPTIONS, SettingsError

    names = {opt.name for opt in OPTIONS}
    argv = []
    for key, value in (args or {}).items():
        name = str(key).replace("-", "_")
        if name not in names:
            raise ValueError(f"unknown setting {key!r} in the application's args (see README, Configuration)")
        if isinstance(value, bool):
            value = "on" if value else "off"
        argv += [f"--{name.replace('_', '-')}", str(value)]
    try:
        return Settings.load(argv)
    except SettingsError as exc:
        raise ValueError(str(exc)) from None


class IngressReplica:
    """The studio's FastAPI app (UI, JSON API, health, metrics; security middleware in front) as Serve's ingress.
    One replica: one queue, one outputs folder and history index, on the head node."""

    def __init__(self, settings: Settings, engine, board):
        _log_to_stdout(settings)
        from .server import create_service

        self.engine = RemoteEngine(settings, engine, board)
        self.engine.start_in_background(lambda exc: None)  # a failure is logged, and fails check_health below
        self.service = create_service(settings, self.engine)

    def __serve_build_asgi_app__(self):
        return self.service.app

    def check_health(self) -> None:
        if self.engine.status().state is EngineState.FAILED:
            raise RuntimeError(self.engine.status().detail)


def build_app(args: dict | None = None):
    """Application builder for `serve run` / `serve deploy` (import_path: zimage.replicas:build_app)."""
    from .security import check_exposure
    from .settings import SettingsError

    settings = settings_from_args(args)
    if settings.replicas < 1:
        settings = settings.replace(replicas=1)
    try:
        check_exposure(settings)  # a non-loopback host needs auth, as for app.py
    except SettingsError as exc:
        raise ValueError(str(exc)) from None
    gpus = replica_gpus(settings)
    board = board_deployment(head=True).bind()
    engine = engine_deployment(settings, gpus).bind(settings, board)
    ingress = serve.deployment(serve.ingress()(IngressReplica), name=INGRESS).options(
        num_replicas=1,  # one queue, one history index
        max_ongoing_requests=1000,  # open UI pages and waiting API requests; our queue decides who waits
        ray_actor_options={"num_cpus": 0, "resources": {"node:__internal_head__": 0.001}},
        graceful_shutdown_timeout_s=45)
    return ingress.bind(settings, engine, board)
