"""Memory profiles: auto selection from the card's size, refusal of presets that cannot fit, streamed placement."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from zimage import memory, presets
from zimage.request import GenerationRequest, RequestError
from tests.helpers import generate


@pytest.mark.parametrize("usable,expected", [(79.2, "full"), (24.0, "full"), (16.0, "16gb"), (12.0, "12gb")])
def test_auto_profile_for_card_sizes_with_fp8(usable, expected):
    assert memory.choose_profile("auto", usable, fp8=True) == expected


@pytest.mark.parametrize("usable,expected", [(79.2, "full"), (23.5, "16gb"), (16.0, "12gb"), (12.0, "12gb")])
def test_auto_profile_for_card_sizes_without_fp8(usable, expected):
    assert memory.choose_profile("auto", usable, fp8=False) == expected


def test_auto_picks_fastest_profile_that_fits_and_explicit_choice_wins():
    for fp8 in (False, True):
        for usable in (10.0, 13.0, 15.0, 17.0, 20.0, 26.0, 40.0):
            chosen = memory.choose_profile("auto", usable, fp8)
            fits = [p for p in memory.PROFILE_ORDER
                    if max(memory.EXPECTED_PEAK_GIB[(p, fp8)].values()) + memory.HEADROOM_GIB <= usable]
            assert chosen == (fits[0] if fits else "12gb")
    assert memory.choose_profile("16gb", 80.0, fp8=True) == "16gb"
    assert memory.choose_profile("auto", None, fp8=False) == "full"  # CPU: nothing to fit


def test_every_profile_states_a_peak_for_every_tier():
    for (profile, fp8), peaks in memory.EXPECTED_PEAK_GIB.items():
        assert profile in memory.PROFILE_ORDER and list(peaks) == list(presets.TIERS)
        spec = memory.profile_spec(profile, fp8)
        for tier in presets.TIERS:  # untiled tiers never peak below a smaller untiled tier
            if tier not in spec.tiled_decode_tiers and tier != "Draft":
                smaller = [t for t in presets.TIERS if t not in spec.tiled_decode_tiers][0]
                assert peaks[tier] >= peaks[smaller]


def test_refusal_names_the_tier_the_memory_and_what_to_do():
    message = memory.refusal("16gb", True, "High", usable=14.0)
    assert "High" in message and "16gb" in message and "14.0 GiB" in message and message.endswith("use Draft, Standard, Ultra")
    assert memory.refusal("16gb", True, "Standard", usable=14.0) is None
    assert "no preset fits" in memory.refusal("12gb", True, "Draft", usable=9.0)
    assert memory.refusal("full", False, "Ultra", usable=None) is None


def test_engine_refuses_presets_its_profile_cannot_serve(tiny_settings, monkeypatch):
    """A faked 14 GiB card with the 16gb profile: High is refused with a message, the rest are served."""
    from zimage.engine import Engine

    monkeypatch.setattr(memory, "usable_gib", lambda device: 14.0)
    engine = Engine(tiny_settings.replace(memory_profile="12gb", fp8="off"))
    engine.load()
    engine.mark_ready()
    assert engine.describe()["memory_profile"] == "12gb" and engine.usable_gib == 14.0
    refused = {}
    for tier in presets.TIERS:
        try:
            engine.resolve(GenerationRequest("a cat", preset=tier))
        except RequestError as exc:
            refused[tier] = exc
    assert refused == {}  # 12gb streams everything: every tier fits
    engine.placement = memory.Placement(engine.pipeline, "cpu", memory.profile_spec("16gb", True), True)
    engine.fp8 = True  # as the 16gb profile on an fp8 card: the table says High needs 14.0 + 1 GiB
    with pytest.raises(RequestError) as info:
        generate(engine, GenerationRequest("a cat", preset="High"))
    assert info.value.param == "preset" and "High needs about 14.0 GiB" in str(info.value)
    assert engine.resolve(GenerationRequest("a cat", preset="Ultra")).vae_tiling  # tiled Ultra fits


def test_streamed_placement_generates_the_same_pixels(make_engine, shared_engine):
    """12gb without fp8 streams transformer and text encoder block by block (group offloading): same image."""
    streamed = make_engine(memory_profile="12gb", fp8="off")
    assert streamed.placement.profile.transformer_streamed and streamed.placement.profile.text_encoder_streamed
    request = GenerationRequest("a lighthouse at night", width=256, height=256, steps=3, seed=9)
    a = generate(streamed, request)
    b = generate(shared_engine, request)
    assert np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))


def test_12gb_profile_tiles_the_decode_from_high_up(make_engine):
    engine = make_engine(memory_profile="12gb", fp8="off")
    assert engine.resolve(GenerationRequest("a", preset="High")).vae_tiling
    assert not engine.resolve(GenerationRequest("a", preset="Standard")).vae_tiling


def test_12gb_with_fp8_streams_the_text_encoder_in_fp8():
    """12gb + fp8: the text encoder is quantized a layer at a time and kept in host memory, then streamed (half the
    bytes of bf16 per request); its embeddings stay close to the unquantized encoder's."""
    from zimage import fp8, tiny

    pipe = tiny.build_pipeline()
    with torch.no_grad():
        reference = pipe.encode_prompt("a red circle", device="cpu", do_classifier_free_guidance=False,
                                       max_sequence_length=64)[0][0]
    spec = memory.profile_spec("12gb", fp8=True)
    assert spec.text_encoder_streamed and spec.text_encoder_fp8 and not spec.transformer_streamed
    placement = memory.Placement(pipe, "cpu", spec, fp8=False)  # fp8 for the transformer is the GPU's business
    placement.place()
    linears = [m for m in pipe.text_encoder.modules() if isinstance(m, (torch.nn.Linear, fp8.Fp8Linear))]
    assert linears and all(isinstance(m, fp8.Fp8Linear) and m.weight.device.type == "cpu" for m in linears)
    assert not placement.shed_text_encoder()  # nothing resident to shed
    with torch.no_grad():
        out = pipe.encode_prompt("a red circle", device="cpu", do_classifier_free_guidance=False,
                                 max_sequence_length=64)[0][0]
    rel = float((out - reference).norm() / reference.norm())
    assert 0 < rel < 0.1, rel
