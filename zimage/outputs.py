"""The outputs folder: every generated image as a PNG with its parameters, plus a history index.

    outputs/2026-11-23/193012-1234567890-3f2a9c.png   time-seed-random: never prompt text in a file name
    outputs/history.jsonl                              one JSON line per image, appended after its file exists

Writes happen on one background thread so PNG encoding (0.2-0.3 s for 1024²) never delays the next
generation. PNGs are written to a temporary name and renamed, so a crash leaves no partial image; the
index is appended only after the rename, and a torn last line (crash mid-append) is skipped on read.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import secrets
import shutil
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from . import images

log = logging.getLogger("zimage.outputs")
INDEX_NAME = "history.jsonl"


class OutputStore:
    def __init__(self, root: Path, model: str):
        self.root = Path(root)
        self.model = model
        self.index = self.root / INDEX_NAME
        self.last_error: str | None = None
        self.saved = 0
        self.errors = 0
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="zimage-outputs")
        self._index_lock = threading.Lock()
        self._remove_stale_temp_files()

    def _remove_stale_temp_files(self) -> None:
        """Temporary files left by a process killed mid-write (never renamed, so never indexed)."""
        if not self.root.is_dir():
            return
        for tmp in self.root.glob("*/.*.tmp"):
            try:
                tmp.unlink()
                log.info("removed partial file %s left by an earlier crash", tmp)
            except OSError:
                pass

    def save(self, result, png: list[bytes] | None = None) -> list[Future]:
        """Queue every image of `result` for writing; each future gives the Path, or raises OSError.
        `png`: the images already encoded by images.encode(..., "png", images.metadata(...)), if the caller
        has them (the JSON API's PNG responses), so they are not encoded twice."""
        blobs = png if png is not None else [None] * len(result.images)
        futures = []
        for image, seed, blob in zip(result.images, result.seeds, blobs):
            try:
                futures.append(self._writer.submit(self._write, image, result, seed, blob))
            except RuntimeError:  # closed: the service is shutting down and a late job finished; write it here
                done: Future = Future()
                try:
                    done.set_result(self._write(image, result, seed, blob))
                except OSError as exc:
                    done.set_exception(exc)
                futures.append(done)
        return futures

    def _write(self, image, result, seed: int, blob: bytes | None) -> Path:
        meta = images.metadata(result, seed, self.model)
        now = time.localtime()
        path = (self.root / time.strftime("%Y-%m-%d", now) /
                f"{time.strftime('%H%M%S', now)}-{seed}-{secrets.token_hex(3)}.png")
        try:
            images.write_atomic(path, blob if blob is not None else images.png_bytes(image, meta))
            entry = {**meta, "file": str(path.relative_to(self.root)), "created": round(time.time(), 3)}
            with self._index_lock, open(self.index, "a", encoding="utf-8") as f:
                f.write(json.dumps(entry, ensure_ascii=False) + "\n")
        except OSError as exc:
            self.errors += 1
            self.last_error = f"{exc.strerror or exc} ({self.root})"
            log.error("save failed: %s", self.last_error)
            raise
        self.saved += 1
        self.last_error = None
        return path

    def problem(self, nbytes: int) -> str | None:
        """Why `nbytes` of images could not be saved right now, or None: checked when a request is answered,
        so its warning is about its own save (the write itself happens later, in the background)."""
        folder = self.root / time.strftime("%Y-%m-%d")
        try:
            if folder.exists() and not folder.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
            probe = folder if folder.is_dir() else self.root
            if not os.access(probe, os.W_OK | os.X_OK):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
            if shutil.disk_usage(probe).free < nbytes:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError as exc:
            return f"{exc.strerror or exc} ({self.root})"
        return None

    def recent(self, limit: int = 24) -> list[dict]:
        """The newest `limit` index entries whose files still exist, newest first."""
        entries = []
        for line in reversed(_tail_lines(self.index, limit * 2 + 8)):
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # a line torn by a crash mid-append
            path = self.root / entry.get("file", "")
            if path.is_file():
                entries.append({**entry, "path": str(path)})
            if len(entries) >= limit:
                break
        return entries

    def flush(self, timeout: float = 60) -> None:
        """Wait until everything queued so far is written (tests, shutdown)."""
        self._writer.submit(lambda: None).result(timeout=timeout)

    def close(self) -> None:
        self._writer.shutdown(wait=True)


def _tail_lines(path: Path, count: int, block: int = 65536) -> list[str]:
    """The last `count` lines of a text file, reading from the end (the index grows for months)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            end = f.tell()
            data = b""
            while end > 0 and data.count(b"\n") <= count:
                start = max(0, end - block)
                f.seek(start)
                data = f.read(end - start) + data
                end = start
    except FileNotFoundError:
        return []
    lines = data.decode("utf-8", errors="replace").splitlines()
    return lines[-count:]
