"""Shared fixtures: the tiny model is built once per session into a temporary cache folder."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
# Dynamo's precompile cache is process-wide torch state: with it, one test's engine would load graphs another
# test's engine traced (and graph counts would mean nothing). Off here and in app subprocesses; the tests that
# are about it turn it on in their own processes (tests/test_compile_cache.py).
os.environ["ZIMAGE_SPEED"] = ",".join(filter(None, (os.environ.get("ZIMAGE_SPEED", ""), "-precompile")))

from zimage.engine import Engine  # noqa: E402
from zimage.settings import Settings  # noqa: E402


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """The tiny model's cache for this session (and for app subprocesses, via --cache-dir)."""
    from zimage import tiny

    folder = tmp_path_factory.mktemp("zimage-cache")
    tiny.ensure_tiny_model(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_settings(cache_dir) -> Settings:
    return Settings(model="tiny-random", device="cpu", cache_dir=cache_dir, oom_fatal_count=100)


@pytest.fixture(scope="session")
def shared_engine(tiny_settings) -> Engine:
    """One ready engine for tests that only generate (no fault injection, no state changes)."""
    engine = Engine.create(tiny_settings)
    engine.mark_ready()
    return engine


@pytest.fixture
def make_engine(tiny_settings):
    """A fresh ready engine, for tests that inject faults or change engine state."""

    def make(**changes) -> Engine:
        engine = Engine.create(tiny_settings.replace(**changes))
        engine.mark_ready()
        return engine

    return make
