"""One queue in front of the engine for every front end: UI, Gradio API and JSON API wait in the same line.

    ticket = queue.admit()                  # QueueFull (-> "busy" / HTTP 429) when `limit` already wait
    result = await queue.run(ticket, job, on_progress, cancel)
    queue.position(ticket)                  # how many are ahead, for the UI's "in queue" line

Generations run on one dedicated thread in arrival order, so a waiting generation never holds a thread
that image encoding, file writes or HTTP handling need (asyncio's default pool stays free for those), and
a finished image is encoded and returned at once. The engine's own FIFO lock still serialises direct
callers (CLI, benchmarks, tests). A cancel set while a request waits takes it out of the line.

`stop(reason)` (the service is shutting down): new requests and every running or waiting one get
EngineUnavailable (HTTP 503 + Retry-After) instead of a dropped connection; running ones stop at the next step.

`workers` generations run at once: 1 for the in-process engine, one per replica for Ray Serve (replicas.py),
so the line and the place in it count all waiting work across the replicas.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import threading
from concurrent.futures import ThreadPoolExecutor

from .interface import ImageEngine, ProgressFn
from .outcomes import QueueFull
from .request import EngineUnavailable, GenerationCancelled, GenerationResult, Job


class Ticket:
    __slots__ = ("number", "cancel")

    def __init__(self, number: int):
        self.number = number
        self.cancel = threading.Event()


class GenerationQueue:
    def __init__(self, engine: ImageEngine, limit: int, workers: int = 1):
        self.engine, self.limit, self.workers = engine, limit, workers
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="zimage-gpu")
        self._lock = threading.Lock()
        self._numbers = itertools.count()
        self._waiting: list[Ticket] = []  # admitted, not yet running, in arrival order
        self._running = 0
        self._running_tickets: set[Ticket] = set()
        self._stopping: str | None = None  # why new and unfinished work is refused (shutdown)
        self.max_waiting = 0  # most requests ever seen waiting for or holding the GPU (load-test evidence)
        self._recent_seconds = 5.0  # moving estimate of one request's time, for Retry-After

    @property
    def waiting(self) -> int:
        """Requests admitted and not yet running (the queue-depth gauge)."""
        with self._lock:
            return sum(1 for t in self._waiting if not t.cancel.is_set())

    def admit(self) -> Ticket:
        """A place in line, or QueueFull. `workers` requests may run while `limit` wait, as in Gradio's queue."""
        with self._lock:
            if self._stopping:
                raise EngineUnavailable(self._stopping)
            self._waiting = [t for t in self._waiting if not t.cancel.is_set()]
            if len(self._waiting) + self._running >= self.limit + self.workers:
                retry = max(1, math.ceil(self._recent_seconds * (len(self._waiting) + 1) / self.workers))
                raise QueueFull(f"the server is busy ({len(self._waiting)} request"
                                f"{'s' if len(self._waiting) != 1 else ''} already waiting); retry in about "
                                f"{retry} s", retry)
            ticket = Ticket(next(self._numbers))
            self._waiting.append(ticket)
            self.max_waiting = max(self.max_waiting, len(self._waiting) + self._running)
            return ticket

    def leave(self, ticket: Ticket) -> None:
        """Give up a place that will not be run (the request turned out invalid)."""
        with self._lock:
            if ticket in self._waiting:
                self._waiting.remove(ticket)

    def position(self, ticket: Ticket) -> int:
        """Requests ahead of `ticket` (running one included); 0 once it runs."""
        with self._lock:
            if ticket not in self._waiting:
                return 0
            return self._running + sum(1 for t in self._waiting[:self._waiting.index(ticket)]
                                       if not t.cancel.is_set())

    async def run(self, ticket: Ticket, job: Job, on_progress: ProgressFn | None = None) -> GenerationResult:
        """Run `job` in its turn. Set `ticket.cancel` to stop it: in line it leaves at once, running it stops
        at the next denoising step (GenerationCancelled either way)."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, self._work, ticket, job, on_progress)
        except asyncio.CancelledError:  # the caller's task was cancelled (UI Cancel): stop the work too
            ticket.cancel.set()
            raise
        except GenerationCancelled as exc:
            if self._stopping:  # cancelled by stop(), not by its caller: say so, and when to come back
                raise EngineUnavailable(self._stopping) from exc
            raise

    def _work(self, ticket: Ticket, job: Job, on_progress: ProgressFn | None) -> GenerationResult:
        with self._lock:
            if ticket in self._waiting:
                self._waiting.remove(ticket)
            if ticket.cancel.is_set():
                raise GenerationCancelled("cancelled while waiting for the GPU")
            self._running += 1
            self._running_tickets.add(ticket)
        try:
            result = self.engine.generate(job, on_progress, ticket.cancel)
            self._recent_seconds = 0.7 * self._recent_seconds + 0.3 * result.timings["total"]
            return result
        finally:
            with self._lock:
                self._running -= 1
                self._running_tickets.discard(ticket)

    def stop(self, reason: str) -> None:
        """Refuse new work and cancel what is running or waiting, with `reason` as the 503's message."""
        with self._lock:
            self._stopping = reason
            for ticket in [*self._waiting, *self._running_tickets]:
                ticket.cancel.set()

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
