"""Prometheus metrics for /metrics. The engine keeps plain counters; this module turns them into metrics
at scrape time, so the engine never imports prometheus_client."""

from __future__ import annotations

import logging
from typing import Callable

from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, disable_created_metrics,
                               generate_latest)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .interface import EngineState
from .units import GIB

log = logging.getLogger("zimage.metrics")
disable_created_metrics()  # the *_created series double the output and no dashboard uses them

SECONDS_BUCKETS = (0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0, 60.0, 120.0)
STAGE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
VRAM_BUCKETS = tuple(g * GIB for g in (2, 4, 8, 10, 12, 14, 16, 20, 24, 32, 48, 80))


class Metrics:
    def __init__(self, engine, queue_depth: Callable[[], int], max_waiting: Callable[[], int] | None = None,
                 store=None):
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("zimage_requests", "Generation requests by outcome and front end",
                                ["status", "route"], registry=registry)
        self.generation_seconds = Histogram("zimage_generation_seconds", "Engine time per request, by preset",
                                            ["preset"], buckets=SECONDS_BUCKETS, registry=registry)
        self.stage_seconds = Histogram("zimage_stage_seconds", "Seconds per pipeline stage",
                                       ["stage"], buckets=STAGE_BUCKETS, registry=registry)
        self.peak_vram = Histogram("zimage_peak_vram_bytes", "Peak GPU memory allocated per request",
                                   buckets=VRAM_BUCKETS, registry=registry)
        Gauge("zimage_queue_depth", "Requests waiting for the GPU (UI, Gradio API and JSON API together)",
              registry=registry).set_function(queue_depth)
        Gauge("zimage_inflight", "Generations running on the GPU", registry=registry).set_function(
            lambda: engine.stats.inflight)
        ProcessCollector(registry=registry)  # process_resident_memory_bytes and friends
        registry.register(_EngineCollector(engine, store, max_waiting or (lambda: engine.stats.max_waiting)))

    def observe_result(self, result, route: str) -> None:
        self.requests.labels("ok", route).inc()
        self.generation_seconds.labels(result.preset).observe(result.timings["total"])
        for stage in ("text_encode", "denoise", "decode"):
            self.stage_seconds.labels(stage).observe(result.timings[stage])
        if result.peak_vram_bytes is not None:
            self.peak_vram.observe(result.peak_vram_bytes)

    def observe_outcome(self, status: str, route: str) -> None:
        """`status` is an outcomes.Outcome's label (outcomes.STATUSES)."""
        self.requests.labels(status, route).inc()

    def observe_stage(self, stage: str, seconds: float) -> None:
        self.stage_seconds.labels(stage).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector:
    """Engine counters and GPU memory, read when Prometheus scrapes."""

    def __init__(self, engine, store, max_waiting: Callable[[], int]):
        self.engine, self.store, self.max_waiting = engine, store, max_waiting
        self._nvml_handle = None
        self._nvml_failed = False

    def collect(self):
        stats = self.engine.stats
        oom = CounterMetricFamily("zimage_oom", "Out-of-memory events (handled, failed after retry, fatal)",
                                  labels=["kind"])
        for kind in ("handled", "failed", "fatal"):
            oom.add_metric([kind], stats.oom[kind])
        yield oom
        yield CounterMetricFamily("zimage_cancelled", "Generations cancelled by the caller", value=stats.cancelled)
        if self.store is not None:
            yield CounterMetricFamily("zimage_save_errors", "Images that could not be written to the outputs folder",
                                      value=self.store.errors)
            yield CounterMetricFamily("zimage_saved_images", "Images written to the outputs folder",
                                      value=self.store.saved)
        state = GaugeMetricFamily("zimage_engine_state", "1 for the engine's current state", labels=["state"])
        current = self.engine.status().state
        for name in EngineState:
            state.add_metric([name.value], 1.0 if current is name else 0.0)
        yield state
        yield GaugeMetricFamily("zimage_engine_max_concurrency", "Most generations ever seen on the GPU at once (1)",
                                value=stats.max_concurrent)
        yield GaugeMetricFamily("zimage_engine_max_waiting", "Most requests ever seen waiting for or holding the GPU",
                                value=self.max_waiting())
        yield from self._gpu_memory()

    def _gpu_memory(self):
        device = self.engine.describe()["device"]
        if not device.startswith("cuda") or self._nvml_failed:
            return
        try:
            import pynvml

            if self._nvml_handle is None:
                pynvml.nvmlInit()
                index = int(device.split(":")[1]) if ":" in device else 0
                self._nvml_handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            info = pynvml.nvmlDeviceGetMemoryInfo(self._nvml_handle)
        except Exception as exc:  # no driver library, no permission: report nothing rather than fail the scrape
            self._nvml_failed = True
            log.warning("GPU memory metrics off: %s", exc)
            return
        yield GaugeMetricFamily("zimage_gpu_memory_used_bytes", "GPU memory in use (all processes, NVML)",
                                value=info.used)
        yield GaugeMetricFamily("zimage_gpu_memory_total_bytes", "GPU memory size (NVML)", value=info.total)
        import torch

        yield GaugeMetricFamily("zimage_torch_reserved_bytes", "Memory held by this process's CUDA caching allocator",
                                value=torch.cuda.memory_reserved(device))
