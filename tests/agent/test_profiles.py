"""Firmware profiles: the shipped data agrees with the simulated models, and a malformed
profile is refused with the file and the field named."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.errors import ProfileError
from firmware_profiles import PROFILE_DIR, load_dir, load_file, load_profiles, profile_for
from simulator import personalities

GOOD = """
family = "testfw"
credentials = "antminer"
makes = ["AntMiner"]
firmwares = ["stock"]
quirks = ["family_quirk"]

[capabilities]
serial_source = "web:x"
pool_slots = 3
can_set_pools = true
can_sleep = false
fast_path = false

[models."Model A"]
nominal_ths = 100.0
nominal_w = 3000
quirks = ["model_quirk"]
[models."Model A".capabilities]
power_target = { min_w = 1000, max_w = 3000 }
can_sleep = true
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_shipped_profiles_load_once_and_cover_every_family() -> None:
    profiles = load_profiles()
    assert load_profiles() is profiles  # cached
    assert set(profiles.families) == {"antminer_stock", "whatsminer_v2", "avalon", "vnish"}
    assert {p.name for p in PROFILE_DIR.glob("*.toml")} == {
        f"{family}.toml" for family in profiles.families
    }


@pytest.mark.parametrize(
    ("personality", "family"),
    [
        ("antminer", "antminer_stock"),
        ("whatsminer", "whatsminer_v2"),
        ("avalon", "avalon"),
        ("vnish", "vnish"),
    ],
)
def test_every_simulated_model_has_its_nameplate(personality: str, family: str) -> None:
    sim = personalities.get(personality)
    for spec in sim.models:
        resolved = profile_for(sim.make, sim.firmware, spec.name)
        assert resolved is not None and resolved.family == family
        assert (resolved.nominal_ths, resolved.nominal_w) == (spec.nominal_ths, spec.nominal_w)
        assert resolved.capabilities.fast_path and resolved.capabilities.can_set_pools


def test_model_overrides_and_quirks() -> None:
    m50 = profile_for("WhatsMiner", "Stock", "M50S_VH30")
    m60 = profile_for("WhatsMiner", "Stock", "M60S_VK10")
    assert m50 is not None and m60 is not None
    assert m50.capabilities.power_target is not None and m60.capabilities.power_target is not None
    assert (m50.capabilities.power_target.max_w, m60.capabilities.power_target.max_w) == (
        3500, 3600,
    )  # fmt: skip
    a1366 = profile_for("AvalonMiner", "Stock", "avalonminer 1366")  # case-insensitive model
    assert a1366 is not None and a1366.has_quirk("pyasic_generic_class")
    assert a1366.has_quirk("is_mining_always_true")  # the family's quirks are inherited
    vnish = profile_for("AntMiner", "VNish", None)
    assert vnish is not None and vnish.family == "vnish" and vnish.nominal_ths is None
    assert profile_for("Bitaxe", "Stock", None) is None


def test_a_good_file_with_overrides(tmp_path: Path) -> None:
    write(tmp_path, "t.toml", GOOD)
    profiles = load_dir(tmp_path)
    resolved = profiles.resolve("testfw", "Model A")
    assert resolved.capabilities.can_sleep is True  # overridden
    assert resolved.capabilities.pool_slots == 3  # inherited
    assert resolved.capabilities.power_target is not None
    assert resolved.capabilities.power_target.min_w == 1000
    assert resolved.quirks == ("family_quirk", "model_quirk")
    assert profiles.resolve("testfw", "Model B").capabilities.can_sleep is False


@pytest.mark.parametrize(
    ("change", "field", "why"),
    [
        (("pool_slots = 3", 'pool_slots = "three"'), "capabilities.pool_slots", "integer"),
        (("pool_slots = 3", "pool_slots = 0"), "capabilities.pool_slots", "greater than"),
        (("can_sleep = false", "can_sleep = false\ncan_fly = true"), "capabilities.can_fly",
         "Extra inputs"),
        (("fast_path = false\n", ""), "capabilities.fast_path", "required"),
        (("nominal_w = 3000", "nominal_w = -1"), "models.Model A.nominal_w", "greater than"),
        (("min_w = 1000, max_w = 3000", "min_w = 4000, max_w = 3000"),
         "models.Model A.capabilities.power_target", "above max_w"),
        (('family = "testfw"', 'family = "Test FW"'), "family", "pattern"),
        (('makes = ["AntMiner"]', "makes = []"), "makes", "at least 1"),
    ],
)  # fmt: skip
def test_a_malformed_profile_names_file_and_field(
    tmp_path: Path, change: tuple[str, str], field: str, why: str
) -> None:
    assert change[0] in GOOD
    bad = write(tmp_path, "broken.toml", GOOD.replace(change[0], change[1], 1))
    with pytest.raises(ProfileError) as raised:
        load_dir(tmp_path)
    message = str(raised.value)
    assert message.startswith(f"{bad}: field '{field}'"), message
    assert why in message


def test_invalid_toml_and_duplicates_and_empty_dirs(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="no firmware profiles"):
        load_dir(tmp_path)
    bad = write(tmp_path, "bad.toml", 'family = "x"\n[capabilities\n')
    with pytest.raises(ProfileError, match=f"{bad}: not valid TOML"):
        load_file(bad)
    bad.unlink()
    write(tmp_path, "a.toml", GOOD)
    second = write(tmp_path, "b.toml", GOOD)
    with pytest.raises(ProfileError) as raised:
        load_dir(tmp_path)
    assert str(raised.value).startswith(f"{second}: field 'family': 'testfw' is already defined")
