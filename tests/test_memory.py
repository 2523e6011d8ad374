"""Memory profiles: auto selection from the card's size, refusal of presets that cannot fit, streamed placement."""

from __future__ import annotations

import numpy as np
import pytest

from zimage import memory, presets
from zimage.request import GenerationRequest, RequestError


@pytest.mark.parametrize("usable,expected", [(79.2, "full"), (24.0, "full"), (16.0, "16gb"), (12.0, "12gb")])
def test_auto_profile_for_card_sizes_with_fp8(usable, expected):
    assert memory.choose_profile("auto", usable, fp8=True) == expected


@pytest.mark.parametrize("usable,expected", [(79.2, "full"), (24.0, "16gb"), (16.0, "12gb"), (12.0, "12gb")])
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


def test_expected_peaks_grow_with_tier():
    for peaks in memory.EXPECTED_PEAK_GIB.values():
        values = [peaks[t] for t in presets.TIERS]
        assert values == sorted(values)


def test_refusal_names_the_tier_the_memory_and_what_to_do():
    message = memory.refusal("12gb", True, "Ultra", usable=9.0)
    assert "Ultra" in message and "12gb" in message and "9.0 GiB" in message and "use Standard" in message
    assert memory.refusal("12gb", True, "Draft", usable=9.0) is None
    assert "no preset fits" in memory.refusal("12gb", True, "Draft", usable=4.0)
    assert memory.refusal("full", False, "Ultra", usable=None) is None


def test_engine_refuses_presets_its_profile_cannot_serve(tiny_settings, monkeypatch):
    """A faked 9 GiB card with the 12gb profile: Ultra is refused with a message, Draft is served."""
    from zimage.engine import Engine

    monkeypatch.setattr(memory, "usable_gib", lambda device: 9.0)
    engine = Engine(tiny_settings.replace(memory_profile="12gb", fp8="off"))
    engine.load()
    engine.mark_ready()
    assert engine.describe()["memory_profile"] == "12gb" and engine.usable_gib == 9.0
    refused = {}
    for tier in presets.TIERS:
        try:
            engine.resolve(GenerationRequest("a cat", preset=tier))
        except RequestError as exc:
            refused[tier] = exc
    # 12gb without fp8 streams everything: every tier fits 9 GiB. With fp8 the resident transformer does not.
    assert refused == {}
    assert memory.refusal("12gb", True, "Ultra", 9.0) is not None
    engine.fp8 = True  # as on an fp8-capable card: now the table says Ultra does not fit
    with pytest.raises(RequestError) as info:
        engine.generate(GenerationRequest("a cat", preset="Ultra"))
    assert info.value.param == "preset" and "Ultra needs about" in str(info.value)


def test_streamed_placement_generates_the_same_pixels(make_engine, shared_engine):
    """12gb without fp8 streams transformer and text encoder block by block (group offloading): same image."""
    streamed = make_engine(memory_profile="12gb", fp8="off")
    assert streamed.placement.profile.transformer_streamed and streamed.placement.profile.text_encoder_streamed
    request = GenerationRequest("a lighthouse at night", width=256, height=256, steps=3, seed=9)
    a = streamed.generate(request)
    b = shared_engine.generate(request)
    assert np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))


def test_12gb_profile_tiles_the_decode_from_high_up(make_engine):
    engine = make_engine(memory_profile="12gb", fp8="off")
    assert engine.resolve(GenerationRequest("a", preset="High")).vae_tiling
    assert not engine.resolve(GenerationRequest("a", preset="Standard")).vae_tiling
