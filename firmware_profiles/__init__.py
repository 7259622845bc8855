"""Firmware profiles: what each firmware family can do, as data, with a schema.

One TOML file per family (``antminer_stock.toml``, ``whatsminer_v2.toml`` …) holds its
capabilities (where the serial comes from, pool slots, whether pools can be written, the
power-target range, sleep, whether the fast poll path applies), its quirks, and a table per
model with nameplate hashrate/power and optional overrides of any capability::

    family = "avalon"
    credentials = "avalon"            # key of the secrets file's [miners.<key>] table
    makes = ["AvalonMiner"]           # pyasic's make strings this family matches
    firmwares = ["stock"]
    [capabilities]
    serial_source = "none"
    pool_slots = 3
    ...
    [models."AvalonMiner 1366"]
    nominal_ths = 130.0
    nominal_w = 3250
    quirks = ["…"]
    [models."AvalonMiner 1366".capabilities]
    power_target = { min_w = 2000, max_w = 3300 }

A malformed file is refused with :class:`firmware_profiles.errors.ProfileError` naming the file
and the field, so a typo never silently turns a capability off.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from firmware_profiles.errors import ProfileError

PROFILE_DIR = Path(__file__).resolve().parent


class PowerTarget(BaseModel):
    """The range a power target may be set to, in watts."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_w: int = Field(gt=0)
    max_w: int = Field(gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> PowerTarget:
        if self.min_w > self.max_w:
            raise ValueError(f"min_w {self.min_w} is above max_w {self.max_w}")
        return self


class Capabilities(BaseModel):
    """What a family (or model) can do."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    serial_source: str = Field(min_length=1, description='e.g. "web:get_system_info", "none"')
    pool_slots: int = Field(ge=1, le=10)
    can_set_pools: bool
    power_target: PowerTarget | None = None
    can_sleep: bool
    fast_path: bool


class CapabilityOverride(BaseModel):
    """A model's changes to its family's capabilities (omitted fields are inherited)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    serial_source: str | None = Field(default=None, min_length=1)
    pool_slots: int | None = Field(default=None, ge=1, le=10)
    can_set_pools: bool | None = None
    power_target: PowerTarget | None = None
    can_sleep: bool | None = None
    fast_path: bool | None = None


class ModelProfile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    nominal_ths: float = Field(gt=0)
    nominal_w: float = Field(gt=0)
    quirks: list[str] = Field(default_factory=list)
    capabilities: CapabilityOverride | None = None


class FamilyProfile(BaseModel):
    """One profile file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    family: str = Field(pattern=r"^[a-z0-9_]+$")
    description: str = ""
    credentials: str = Field(min_length=1)
    makes: list[str] = Field(min_length=1)
    firmwares: list[str] = Field(min_length=1)
    capabilities: Capabilities
    quirks: list[str] = Field(default_factory=list)
    models: dict[str, ModelProfile] = Field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ResolvedProfile:
    """A family's profile with one model's overrides applied."""

    family: str
    credentials: str
    model: str | None
    capabilities: Capabilities
    quirks: tuple[str, ...]
    nominal_ths: float | None
    nominal_w: float | None

    def has_quirk(self, quirk: str) -> bool:
        return quirk in self.quirks


@dataclass(frozen=True, slots=True)
class Profiles:
    """Every loaded family, by name."""

    families: dict[str, FamilyProfile]

    def family(self, name: str) -> FamilyProfile:
        return self.families[name]

    def find_family(self, make: str, firmware: str) -> FamilyProfile | None:
        make_l, fw_l = make.strip().lower(), firmware.strip().lower()
        for profile in self.families.values():
            if make_l in {m.lower() for m in profile.makes} and fw_l in {
                f.lower() for f in profile.firmwares
            }:
                return profile
        return None

    def resolve(self, family: str, model: str | None) -> ResolvedProfile:
        profile = self.families[family]
        entry = _model_entry(profile, model)
        caps = profile.capabilities
        quirks = list(profile.quirks)
        if entry is not None:
            if entry.capabilities is not None:
                changes = entry.capabilities.model_dump(exclude_unset=True)
                caps = Capabilities.model_validate({**caps.model_dump(), **changes})
            quirks += [q for q in entry.quirks if q not in quirks]
        return ResolvedProfile(
            family=profile.family,
            credentials=profile.credentials,
            model=model,
            capabilities=caps,
            quirks=tuple(quirks),
            nominal_ths=entry.nominal_ths if entry else None,
            nominal_w=entry.nominal_w if entry else None,
        )

    def profile_for(self, make: str, firmware: str, model: str | None) -> ResolvedProfile | None:
        profile = self.find_family(make, firmware)
        return None if profile is None else self.resolve(profile.family, model)


def _model_entry(profile: FamilyProfile, model: str | None) -> ModelProfile | None:
    if model is None:
        return None
    if model in profile.models:
        return profile.models[model]
    lowered = model.strip().lower()
    for name, entry in profile.models.items():
        if name.lower() == lowered:
            return entry
    return None


def _field_path(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in loc) or "(top level)"


def load_file(path: Path) -> FamilyProfile:
    """Parse and validate one profile; ProfileError names the file and the field."""
    try:
        raw: dict[str, Any] = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ProfileError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ProfileError(f"{path}: not valid TOML: {exc}") from None
    try:
        return FamilyProfile.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise ProfileError(
            f"{path}: field '{_field_path(first['loc'])}': {first['msg']}{more}"
        ) from None


def load_dir(directory: Path) -> Profiles:
    """Every ``*.toml`` in ``directory``; a family defined twice is an error too."""
    families: dict[str, FamilyProfile] = {}
    origin: dict[str, Path] = {}
    files = sorted(directory.glob("*.toml"))
    if not files:
        raise ProfileError(f"{directory}: no firmware profiles (*.toml) found")
    for path in files:
        profile = load_file(path)
        if profile.family in families:
            raise ProfileError(
                f"{path}: field 'family': {profile.family!r} is already defined in "
                f"{origin[profile.family]}"
            )
        families[profile.family] = profile
        origin[profile.family] = path
    return Profiles(families)


@lru_cache(maxsize=8)
def load_profiles(directory: Path | None = None) -> Profiles:
    """The profiles shipped beside this module (or in ``directory``), loaded once."""
    return load_dir(directory or PROFILE_DIR)


def profile_for(make: str, firmware: str, model: str | None = None) -> ResolvedProfile | None:
    """The shipped profile for a miner, with its model's overrides; None if no family fits."""
    return load_profiles().profile_for(make, firmware, model)


__all__ = [
    "Capabilities",
    "CapabilityOverride",
    "FamilyProfile",
    "ModelProfile",
    "PowerTarget",
    "Profiles",
    "ResolvedProfile",
    "load_dir",
    "load_file",
    "load_profiles",
    "profile_for",
]
