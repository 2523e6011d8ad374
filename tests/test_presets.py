"""Every (tier, aspect) preset obeys the size rules."""

import pytest

from zimage import presets


@pytest.mark.parametrize("tier", list(presets.TIERS))
@pytest.mark.parametrize("aspect", list(presets.ASPECTS))
def test_preset_sizes_are_multiples_of_16_with_tier_area(tier, aspect):
    w, h = presets.preset_size(tier, aspect)
    area = presets.TIERS[tier].area
    assert w % 16 == 0 and h % 16 == 0
    assert abs(w * h - area) / area <= presets.AREA_TOLERANCE
    aw, ah = presets.ASPECTS[aspect]
    assert abs((w / h) / (aw / ah) - 1) < 0.03  # the shape matches the named aspect
    assert (w > h) == (aw > ah) and (w == h) == (aw == ah)


def test_tiers_are_the_documented_ones():
    t = presets.TIERS
    assert [(x.name, x.side, x.steps, x.vae_tiling) for x in t.values()] == [
        ("Draft", 768, 6, False), ("Standard", 1024, 8, False), ("High", 1280, 8, False), ("Ultra", 1536, 8, True)]
    assert presets.DEFAULT_TIER == "Standard" and presets.GUIDANCE_SCALE == 0.0
    assert presets.preset_size("Standard", "1:1") == (1024, 1024)


def test_custom_sizes_map_to_the_covering_tier():
    assert presets.tier_for_size(512, 512).name == "Draft"
    assert presets.tier_for_size(1024, 1024).name == "Standard"
    assert presets.tier_for_size(2048, 2048).name == "Ultra"
