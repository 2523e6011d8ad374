"""Runs the real app (`python app.py`) as a child process on a free port and waits for it: for the HTTP,
Gradio and browser tests, the load and soak tools, and the cold-start benchmark."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method: str, url: str, body: bytes | None = None, headers: dict | None = None, timeout: float = 300):
    """(status, headers with lower-case names, body bytes) without raising on 4xx/5xx."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()


class AppProcess:
    def __init__(self, tmp: Path, cache_dir: Path, *args: str, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.outputs = tmp / "outputs"
        self.log_path = tmp / f"app-{self.port}.log"
        self.args = ["--model", "tiny", "--port", str(self.port), "--cache-dir", str(cache_dir),
                     "--outputs", str(self.outputs), *args]
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.readyz_seen: list[int] = []
        self.healthz_seen: list[int] = []
        self.started_at: float | None = None
        self.up_after: float | None = None  # seconds from start until /healthz first answered

    def start(self) -> "AppProcess":
        self._log = open(self.log_path, "wb")
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, "app.py", *self.args], cwd=ROOT, env=self.env,
                                     stdout=self._log, stderr=subprocess.STDOUT)
        return self

    def wait_ready(self, timeout: float = 240) -> None:
        """Poll /readyz (and /healthz) until 200, recording every status seen (0 = not listening yet)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"app exited with {self.proc.returncode}:\n{self.log()}")
            for path, seen in (("/readyz", self.readyz_seen), ("/healthz", self.healthz_seen)):
                try:
                    status, _, _ = http("GET", self.url + path, timeout=5)
                except OSError:
                    status = 0
                seen.append(status)
            if self.up_after is None and self.healthz_seen[-1]:
                self.up_after = time.monotonic() - self.started_at
            if self.readyz_seen[-1] == 200:
                return
            time.sleep(0.1)
        raise TimeoutError(f"app not ready after {timeout}s:\n{self.log()}")

    def __enter__(self) -> "AppProcess":
        """Started and ready; stopped on exit, whatever happened."""
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 60) -> int:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode
