"""Controller settings: environment (``ASICFLEET_…``) over an optional TOML file over defaults."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from controller.errors import ConfigError

CONFIG_ENV = "ASICFLEET_CONFIG"


class Settings(BaseSettings):
    """Everything the controller can be told. ``database_url`` defaults to SQLite in data_dir."""

    model_config = SettingsConfigDict(env_prefix="ASICFLEET_", extra="forbid")

    data_dir: Path = Field(default=Path("data"), description="state: SQLite file, signing key")
    database_url: str | None = Field(default=None, description="e.g. postgresql+psycopg://…")
    bind: str = Field(default="127.0.0.1:8080", description="host:port for `serve`")
    history_resolution_s: int = Field(default=300, ge=1, description="observation history step")
    missing_after_minutes: int = Field(default=15, ge=1, description="unseen -> missing")
    missing_sweep_interval_s: float = Field(default=60.0, gt=0, description="how often to sweep")
    enrollment_ttl_s: int = Field(default=3600, ge=60)
    max_batch_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    compliance_repeat_incidents: int = Field(
        default=3, ge=2, description="drift incidents within the window that flag a repeat offender"
    )
    compliance_repeat_window_h: float = Field(
        default=24.0, gt=0, description="the repeat-offender window, in hours"
    )
    report_max_age_days: int = Field(
        default=30,
        ge=1,
        le=3650,
        description="reported items older than this are refused (an agent's outbox holds "
        "reports through outages; size it to the longest outage you want to keep)",
    )
    report_max_skew_s: int = Field(
        default=120,
        ge=0,
        le=86400,
        description="how far ahead of the controller's clock a reported item may be dated",
    )
    login_max_failures_per_user: int = Field(
        default=5, ge=1, description="failed logins for one name within the window -> lockout"
    )
    login_max_failures_per_address: int = Field(
        default=20, ge=1, description="failed logins from one address within the window -> lockout"
    )
    login_failure_window_s: int = Field(
        default=900, ge=1, description="how far back failed logins count, in seconds"
    )
    login_lockout_s: int = Field(
        default=900, ge=1, description="how long a locked-out name or address is refused"
    )
    policy_ttl_s: int = Field(
        default=7 * 86400, ge=300, description="how long an issued policy bundle stays valid"
    )

    @field_validator("bind")
    @classmethod
    def _check_bind(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"bind must be host:port, got {value!r}")
        return value

    @property
    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'asicfleet.db').resolve()}"

    @property
    def host(self) -> str:
        return self.bind.rpartition(":")[0]

    @property
    def port(self) -> int:
        return int(self.bind.rpartition(":")[2])

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _TomlSource(settings_cls))


class _TomlSource(PydanticBaseSettingsSource):
    """Values from the TOML file named by ``ASICFLEET_CONFIG`` (a ``[controller]`` table)."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        path = os.environ.get(CONFIG_ENV)
        if not path:
            return {}
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file ({CONFIG_ENV})") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        section = data.get("controller", data)
        if not isinstance(section, dict):
            raise ConfigError(f"{path}: [controller] must be a table")
        return section


def load_settings(**overrides: Any) -> Settings:
    """Settings with CLI overrides on top; a clear :class:`ConfigError` when something is off."""
    clean = {k: v for k, v in overrides.items() if v is not None}
    try:
        return Settings(**clean)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'settings'}: {err['msg']}"
            for err in exc.errors()
        )
        raise ConfigError(f"invalid settings: {problems}") from None
