"""One mapping from what happened to a generation to what every front end reports: the metric label
(`zimage_requests_total{status}`), the HTTP status and OpenAI error type for the JSON API, and the message
the UI shows. UI and API both call `outcome_of`; neither keeps its own table.
"""

from __future__ import annotations

from dataclasses import dataclass

from .request import EngineUnavailable, GenerationCancelled, OutOfMemory, RequestError

# Metric labels: ok | invalid (4xx) | busy (queue full) | cancelled | oom | unavailable | error
STATUSES = ("ok", "invalid", "busy", "cancelled", "oom", "unavailable", "error")


@dataclass(frozen=True)
class Outcome:
    status: str  # metric label, one of STATUSES
    http_status: int
    error_type: str  # OpenAI's error "type"
    message: str
    param: str | None = None
    code: str | None = None
    retry_after: int | None = None  # seconds, for 429/503 answers


class QueueFull(Exception):
    """The GPU queue is full; `retry_after` estimates when a place frees up."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


def outcome_of(exc: BaseException) -> Outcome:
    """What to report for an exception raised by resolve/generate (or the queue in front of them)."""
    if isinstance(exc, RequestError):
        return Outcome("invalid", 400, "invalid_request_error", str(exc), param=exc.param)
    if isinstance(exc, QueueFull):
        return Outcome("busy", 429, "server_busy", str(exc), code="queue_full", retry_after=exc.retry_after)
    if isinstance(exc, GenerationCancelled):
        return Outcome("cancelled", 499, "cancelled", "cancelled: the client disconnected")
    if isinstance(exc, OutOfMemory):
        return Outcome("oom", 503, "insufficient_gpu_memory", str(exc), code="out_of_memory")
    if isinstance(exc, EngineUnavailable):
        return Outcome("unavailable", 503, "service_unavailable", str(exc), retry_after=5)
    return Outcome("error", 500, "server_error", "internal error while generating; see the server log")
