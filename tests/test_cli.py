"""The README's one-liner: a PNG from the tiny model, offline, with its parameters embedded."""

import os
import subprocess
import sys
from pathlib import Path

from zimage.images import read_parameters

ROOT = Path(__file__).resolve().parents[1]


def test_cli_one_liner_writes_a_png(cache_dir, tmp_path):
    out = tmp_path / "red-circle.png"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "ZIMAGE_CACHE_DIR": str(cache_dir)}
    proc = subprocess.run([sys.executable, "-m", "zimage", "a red circle on a blue background", "--model", "tiny",
                           "--preset", "Draft", "--seed", "7", "-o", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    meta = read_parameters(out)
    assert meta["seed"] == 7 and meta["steps"] == 6 and (meta["width"], meta["height"]) == (768, 768)
    assert "seed=7" in proc.stdout


def test_cli_bad_setting_exits_2_with_message(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "zimage", "x", "--model", "tiny", "--dtype", "fp16"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--dtype / ZIMAGE_DTYPE" in proc.stderr


def test_cli_help_lists_request_options_and_settings():
    """`python -m zimage --help` used to fail ("prompt is required"); `x --help` showed app.py's help only."""
    for argv in (["--help"], ["a cat", "--help"]):
        proc = subprocess.run([sys.executable, "-m", "zimage", *argv], cwd=ROOT, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, proc.stderr
        for option in ("-o OUT", "--preset", "--aspect", "--seed", "-n N", "--width", "--model", "--fp8"):
            assert option in proc.stdout, option
