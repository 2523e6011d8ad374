"""The caption refiner once per generation (zimage/caption_once.py, speed switch `caption_once`), on the tiny model's
real pipeline."""

from __future__ import annotations

import dataclasses

import torch

from zimage import caption_once
from zimage.request import GenerationRequest

REQUEST = GenerationRequest(prompt="a lighthouse on a cliff at dusk", preset="Draft", steps=4, seed=7)


def _generate(engine, request=REQUEST):
    return engine.generate(dataclasses.replace(engine.resolve(request), keep_latents=True))


def _count_calls(module) -> list:
    calls = []
    module.register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_the_caption_refiner_runs_once_per_generation_and_the_latents_stay_the_same(make_engine):
    engine = make_engine()
    transformer = engine.pipeline.transformer
    state = caption_once.installed(transformer)
    assert state is not None and "caption_once" in engine.speed_switches
    refiner_calls = _count_calls(transformer.context_refiner[0])
    main_calls = _count_calls(transformer.noise_refiner[0])

    once = _generate(engine)
    assert len(main_calls) == REQUEST.steps  # the image's refiner still runs at every step
    assert len(refiner_calls) == 1
    assert not state.active and not state.reusing  # the scope ended with the generation

    state.enabled = False
    every_step = _generate(engine)
    assert len(refiner_calls) == 1 + REQUEST.steps
    assert torch.equal(once.latents[0], every_step.latents[0])


def test_a_changed_refiner_is_seen_by_the_next_generation_of_the_same_prompt(make_engine):
    """The prompt's embeddings come from the engine's cache (the same tensors); a merged LoRA changes the refiner's
    weights in place between generations. The next generation must refine the caption again."""
    engine = make_engine()
    transformer = engine.pipeline.transformer
    state = caption_once.installed(transformer)
    first = _generate(engine)
    refinements = state.refinements
    with torch.no_grad():
        for p in transformer.context_refiner.parameters():
            p.mul_(1.5)
    changed = _generate(engine)
    assert state.refinements == refinements + 1
    state.enabled = False
    reference = _generate(engine)
    assert torch.equal(changed.latents[0], reference.latents[0])
    assert not torch.equal(changed.latents[0], first.latents[0])


def test_outside_a_generation_the_forward_is_diffusers_own(make_engine):
    """A direct pipeline call (no scope) runs the caption refiner at every step."""
    engine = make_engine()
    transformer = engine.pipeline.transformer
    state = caption_once.installed(transformer)
    before = state.refinements
    embeds = engine.stages.encode(REQUEST.prompt)
    with torch.no_grad():
        out = engine.pipeline(prompt_embeds=embeds, height=256, width=256, num_inference_steps=2, guidance_scale=0.0,
                              output_type="latent", generator=torch.Generator("cpu").manual_seed(1))
    assert state.refinements == before and torch.isfinite(out.images).all()
