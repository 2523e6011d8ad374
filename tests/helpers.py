"""Small helpers shared by the engine tests."""

from __future__ import annotations

from zimage.request import GenerationRequest, GenerationResult


def generate(engine, request: GenerationRequest, **kwargs) -> GenerationResult:
    """What a front end does: resolve (validation, memory plan), then generate."""
    return engine.generate(engine.resolve(request), **kwargs)
