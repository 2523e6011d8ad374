"""The tiny demo model (`--model tiny`): trained to draw coloured shapes on coloured backgrounds from English
or Chinese prompts, small enough to ship in the repository and to run on a CPU.

    scenes.py   the synthetic captioned dataset (vocabulary, held-out combinations, rendering)
    train.py    `python -m zimage.demo.train --device cuda --out models/tiny-demo`
    measure.py  reading generated images back (tests and the training report)
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from .scenes import EXAMPLE_PROMPTS

MODEL_DIR = Path(__file__).resolve().parents[2] / "models" / "tiny-demo"

__all__ = ["EXAMPLE_PROMPTS", "MODEL_DIR", "checksum_mismatches"]


def checksum_mismatches(folder: Path = MODEL_DIR) -> list[str]:
    """Files of `folder` whose sha256 differs from its SHA256SUMS, or that are missing or unlisted."""
    listed = {}
    for line in (folder / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split(None, 1)
        listed[name.lstrip("*")] = digest
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != "SHA256SUMS"}
    bad = sorted(name for name in present - set(listed))
    for name, digest in sorted(listed.items()):
        path = folder / name
        if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            bad.append(name)
    return bad
