"""Agent configuration (TOML) and secrets (TOML, mode 0600), validated with pydantic.

Two files because they have different owners and lifetimes: the config is edited by the
operator, may be world-readable and is safe to paste into a ticket (but once it pins the
controller key, only its owner may write it); the secrets file holds the
agent's bearer secret and the miners' passwords, is written at enrollment and must be readable
by the agent's user only. Relative paths in the config are relative to the config file's
directory (``outbox.path`` is relative to ``data_dir``).

A config file::

    agent_id = "ag_…"                      # written by `asicfleet agent enroll`
    site = "alpha"
    segments = ["10.1.0.0/24", "10.1.1.0/24"]
    data_dir = "/var/lib/asicfleet-agent"
    secrets_file = "/etc/asicfleet/agent-secrets.toml"   # default: secrets.toml beside this

    [controller]
    url = "https://controller.example:8443"
    public_key = "base64 Ed25519 key, pinned at enrollment"
    ca_path = "/etc/asicfleet/controller-ca.pem"         # optional: private CA for TLS

    [polling]     # poll_interval_s, identity_interval_s, discovery_interval_s,
                  # concurrency_per_segment, miner_timeout_s, pools_check_interval_s
    [actions]     # concurrency_per_segment, wave_size, wave_pause_s, deadline_s,
                  # retries, retry_backoff_s, retry_backoff_max_s, journal
    [uplink]      # timeout_s, backoff_initial_s, backoff_max_s
    [outbox]      # path, batch_size

A secrets file::

    agent_secret = "afa_…"
    [miners.antminer]
    password = "…"          # web password
    [miners.whatsminer]
    password = "…"          # API password
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import itertools
import os
import pwd
import stat
import tomllib
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import tomli_w
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from agent.errors import ConfigError, InsecureSecretsFile
from contract import EnrollmentResponse
from contract.reports import MAX_BATCH_ITEMS

AGENT_SECRET_PREFIX = "afa_"
DEFAULT_SECRETS_FILE = "secrets.toml"
MIN_SEGMENT_PREFIX = 16  # a /16 is 65,536 addresses; anything wider is not one LAN segment
SECRETS_MODE = 0o600
CONFIG_UNSAFE_BITS = stat.S_IWGRP | stat.S_IWOTH  # 0o022: may swap the pinned key

M = TypeVar("M", bound=BaseModel)

# Firmware families the drivers know; an unknown key in the secrets file is most likely a typo
# that would otherwise silently leave a family on factory passwords.
KNOWN_FAMILIES = frozenset(
    {
        "antminer",
        "whatsminer",
        "avalon",
        "vnish",
        "braiins",
        "luxos",
        "epic",
        "innosilicon",
        "goldshell",
        "auradine",
        "iceriver",
        "hammer",
        "volcminer",
        "elphapex",
        "hive",
        "mskminer",
        "fluminer",
    }
)


class _Section(BaseModel):
    """Unknown keys are errors: a misspelt option must not be silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ControllerConfig(_Section):
    """Where the controller is and how we trust it."""

    url: str = Field(description="base URL, e.g. https://controller.example:8443")
    public_key: str | None = Field(
        default=None, description="the controller's Ed25519 key (base64), pinned at enrollment"
    )
    ca_path: Path | None = Field(default=None, description="CA bundle for a private TLS CA")
    allow_plain_http: bool = Field(
        default=False, description="allow http:// to a remote host (the secret travels in clear)"
    )

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        parts = urlsplit(value.strip())
        if parts.username or parts.password or parts.query or parts.fragment:
            raise ValueError("must not carry credentials, a query or a fragment")
        try:
            parts.port  # noqa: B018 - parsing the port is the check
        except ValueError:
            raise ValueError(f"has an invalid port: {value!r}") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"must be an http(s) URL such as https://host:8443, got {value!r}")
        return value.strip().rstrip("/")

    @field_validator("public_key")
    @classmethod
    def _check_public_key(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            raw = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raw = b""
        if len(raw) != 32:
            raise ValueError("must be a base64 Ed25519 public key (32 bytes)")
        return value

    @model_validator(mode="after")
    def _refuse_plain_http(self) -> ControllerConfig:
        parts = urlsplit(self.url)
        remote = not _is_loopback(parts.hostname)
        if parts.scheme == "http" and remote and not self.allow_plain_http:
            raise ValueError(
                "url: plain http to a remote controller would send the agent secret in clear; "
                "use https, or set allow_plain_http = true"
            )
        return self


class PollingConfig(_Section):
    """Cadences and limits of discovery and polling."""

    poll_interval_s: float = Field(default=60.0, ge=1, le=3600)
    identity_interval_s: float = Field(default=900.0, ge=1, le=7 * 86400)
    discovery_interval_s: float = Field(default=1800.0, ge=1, le=7 * 86400)
    concurrency_per_segment: int = Field(default=128, ge=1, le=4096)
    miner_timeout_s: float = Field(default=5.0, gt=0, le=300)
    pools_check_interval_s: float = Field(
        default=10.0,
        ge=0,
        le=3600,
        description="the pools-only drift check between full polls (0: off)",
    )

    @model_validator(mode="after")
    def _check_cadences(self) -> PollingConfig:
        if self.miner_timeout_s >= self.poll_interval_s:
            raise ValueError(
                f"miner_timeout_s ({self.miner_timeout_s:g}) must be shorter than "
                f"poll_interval_s ({self.poll_interval_s:g})"
            )
        if self.identity_interval_s < self.poll_interval_s:
            raise ValueError(
                f"identity_interval_s ({self.identity_interval_s:g}) must not be shorter than "
                f"poll_interval_s ({self.poll_interval_s:g})"
            )
        return self


class UplinkConfig(_Section):
    """How hard to try reaching the controller."""

    timeout_s: float = Field(default=15.0, gt=0, le=300, description="per request phase")
    backoff_initial_s: float = Field(default=1.0, gt=0, le=3600)
    backoff_max_s: float = Field(default=300.0, gt=0, le=86400)

    @model_validator(mode="after")
    def _check_backoff(self) -> UplinkConfig:
        if self.backoff_max_s < self.backoff_initial_s:
            raise ValueError(
                f"backoff_max_s ({self.backoff_max_s:g}) must not be below "
                f"backoff_initial_s ({self.backoff_initial_s:g})"
            )
        return self


class ActionsConfig(_Section):
    """How writes to miners (pools, reboot, power, sleep/wake) are worked: the action queue."""

    concurrency_per_segment: int = Field(default=16, ge=1, le=4096)
    wave_size: int = Field(
        default=0, ge=0, le=100_000, description="actions per segment per wave (0: no waves)"
    )
    wave_pause_s: float = Field(default=0.0, ge=0, le=3600, description="pause between waves")
    deadline_s: float = Field(default=120.0, gt=0, le=3600, description="per action")
    retries: int = Field(default=2, ge=0, le=10, description="of an idempotent action")
    retry_backoff_s: float = Field(default=1.0, gt=0, le=3600)
    retry_backoff_max_s: float = Field(default=30.0, gt=0, le=3600)
    journal: Path = Field(default=Path("actions.sqlite3"), description="relative to data_dir")

    @model_validator(mode="after")
    def _check_backoff(self) -> ActionsConfig:
        if self.retry_backoff_max_s < self.retry_backoff_s:
            raise ValueError(
                f"retry_backoff_max_s ({self.retry_backoff_max_s:g}) must not be below "
                f"retry_backoff_s ({self.retry_backoff_s:g})"
            )
        return self


class OutboxConfig(_Section):
    """The durable queue of report batches."""

    path: Path = Field(default=Path("outbox.sqlite3"), description="relative to data_dir")
    batch_size: int = Field(default=1000, ge=1, le=MAX_BATCH_ITEMS, description="items per batch")
    max_size_mb: int | None = Field(
        default=None, ge=1, description="cap on the outbox file; reaching it is 'outbox full'"
    )


class AgentConfig(_Section):
    """The whole agent config. ``agent_id``/``site``/``public_key`` are set by enrollment."""

    agent_id: str | None = Field(default=None, min_length=1, max_length=64)
    site: str | None = Field(default=None, min_length=1, max_length=128)
    segments: list[IPv4Network] = Field(default_factory=list, max_length=4096)
    data_dir: Path = Path("data")
    secrets_file: Path = Path(DEFAULT_SECRETS_FILE)
    controller: ControllerConfig
    polling: PollingConfig = Field(default_factory=PollingConfig)
    uplink: UplinkConfig = Field(default_factory=UplinkConfig)
    outbox: OutboxConfig = Field(default_factory=OutboxConfig)
    actions: ActionsConfig = Field(default_factory=ActionsConfig)

    @field_validator("segments", mode="before")
    @classmethod
    def _parse_segments(cls, value: Any) -> Any:
        if not isinstance(value, list):
            return value
        return [_parse_cidr(item) if isinstance(item, str) else item for item in value]

    @field_validator("segments")
    @classmethod
    def _check_segments(cls, value: list[IPv4Network]) -> list[IPv4Network]:
        for net in value:
            if net.prefixlen < MIN_SEGMENT_PREFIX:
                raise ValueError(
                    f"{net} is wider than a /{MIN_SEGMENT_PREFIX}; list the LAN segments instead"
                )
        ordered = sorted(value)
        for a, b in itertools.pairwise(ordered):
            if a.overlaps(b):
                raise ValueError(f"{a} and {b} overlap; each address must be in one segment")
        return value

    @property
    def outbox_path(self) -> Path:
        path = self.outbox.path
        return path if path.is_absolute() else self.data_dir / path

    @property
    def journal_path(self) -> Path:
        path = self.actions.journal
        return path if path.is_absolute() else self.data_dir / path

    @property
    def enrolled(self) -> bool:
        return bool(self.agent_id and self.site and self.controller.public_key)

    def allows(self, network: IPv4Network) -> bool:
        """Whether ``network`` lies entirely inside one configured segment."""
        return any(network.subnet_of(segment) for segment in self.segments)


class MinerCredentials(_Section):
    """Logins for one firmware family. ``password`` is the family's write login: the web
    password (Antminer, VNish, Braiins, Avalon) or the API password (Whatsminer)."""

    username: str | None = Field(default=None, max_length=128)
    password: SecretStr | None = None
    ssh_username: str | None = Field(default=None, max_length=128)
    ssh_password: SecretStr | None = None


class AgentSecrets(_Section):
    """What must never be logged: the agent's bearer secret and the miners' passwords."""

    agent_secret: SecretStr | None = None
    miners: dict[str, MinerCredentials] = Field(default_factory=dict)

    @field_validator("agent_secret")
    @classmethod
    def _check_agent_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().startswith(AGENT_SECRET_PREFIX):
            raise ValueError(f"must start with {AGENT_SECRET_PREFIX!r} (the enrollment secret)")
        return value

    @field_validator("miners")
    @classmethod
    def _check_families(cls, value: dict[str, MinerCredentials]) -> dict[str, MinerCredentials]:
        unknown = sorted(set(value) - KNOWN_FAMILIES)
        if unknown:
            raise ValueError(
                f"unknown firmware famil{'y' if len(unknown) == 1 else 'ies'} "
                f"{', '.join(unknown)} (known: {', '.join(sorted(KNOWN_FAMILIES))})"
            )
        return value

    def credentials(self, family: str) -> MinerCredentials | None:
        return self.miners.get(family)


# --- loading -----------------------------------------------------------------------------------


def load_config(path: Path | str) -> AgentConfig:
    """Read and validate ``path``; any problem is a one-line :class:`ConfigError`.

    A config carrying ``controller.public_key`` is refused when group or others may write it:
    whoever can rewrite the file can swap the pinned key and sign their own pool policy.
    """
    path = Path(path)
    modes: list[int] = []

    def read() -> bytes:
        with path.open("rb") as handle:  # the mode of the very file read, not of a later one
            modes.append(stat.S_IMODE(os.fstat(handle.fileno()).st_mode))
            return handle.read()

    raw = _read_toml(path, read)
    config = _validate(path, AgentConfig, raw)
    if config.controller.public_key is not None and modes:
        check_config_mode(path, modes[0])
    return _resolve(path, config)


def check_config_mode(path: Path, mode: int) -> None:
    """Refuse a config holding the pinned controller key that group or others may write."""
    if mode & CONFIG_UNSAFE_BITS:
        raise ConfigError(
            f"{path} has mode {mode:04o}: group or others can rewrite it and swap the pinned "
            f"controller key; refusing it (fix: chmod go-w {path})"
        )


def load_secrets(path: Path | str) -> AgentSecrets:
    """Read the secrets file, refusing one that others could read or that we do not own."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such secrets file (run `asicfleet agent enroll`)") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot open secrets file: {exc.strerror}") from None
    try:
        # Checked on the open descriptor, so the file cannot be swapped between check and read.
        _check_private(path, os.fstat(fd))
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb") as handle:
        raw = _read_toml(path, handle.read)
    return _validate(path, AgentSecrets, raw)


def _check_private(path: Path, st: os.stat_result) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise InsecureSecretsFile(f"{path}: secrets file is not a regular file")
    uid = os.geteuid()
    if st.st_uid != uid:
        user = _user_name(uid)
        raise InsecureSecretsFile(
            f"{path} is owned by {_user_name(st.st_uid)}, not by {user} who runs the agent; "
            f"refusing to use secrets another account controls (fix: chown {user} {path})"
        )
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise InsecureSecretsFile(
            f"{path} has mode {mode:04o}, so other users can read the agent secret and miner "
            f"passwords; refusing to start (fix: chmod 600 {path})"
        )


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def _read_toml(path: Path, read: Any) -> dict[str, Any]:
    try:
        data: bytes = read()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        return tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def _validate(path: Path, model: type[M], raw: dict[str, Any]) -> M:
    if model is AgentConfig:
        misplaced = sorted({"agent_secret", "miners"} & set(raw))
        if misplaced:
            raise ConfigError(
                f"{path}: {', '.join(misplaced)}: secrets do not belong in the config file; "
                "put them in the secrets file (mode 0600)"
            )
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {describe_errors(exc)}") from None


def describe_errors(exc: ValidationError) -> str:
    """``field.path: message; …`` on one line, never echoing the offending value."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field (misspelt?)"
        elif err["type"] == "missing":
            msg = "required field is missing"
        parts.append(f"{loc}: {msg}")
    return "; ".join(parts)


def _resolve(path: Path, config: AgentConfig) -> AgentConfig:
    """Anchor relative paths at the config file's directory and check the CA file exists."""
    base = path.resolve().parent
    controller = config.controller
    if controller.ca_path is not None:
        ca_path = _anchor(base, controller.ca_path)
        if not ca_path.is_file():
            raise ConfigError(f"{path}: controller.ca_path: {ca_path}: no such file")
        controller = controller.model_copy(update={"ca_path": ca_path})
    return config.model_copy(
        update={
            "data_dir": _anchor(base, config.data_dir),
            "secrets_file": _anchor(base, config.secrets_file),
            "controller": controller,
        }
    )


def _anchor(base: Path, value: Path) -> Path:
    value = value.expanduser()
    return value if value.is_absolute() else base / value


def _parse_cidr(text: str) -> IPv4Network | str:
    """A clearer message than pydantic's for ``10.0.0.5/24`` (host bits set)."""
    try:
        return IPv4Network(text.strip())
    except ValueError:
        pass
    try:
        loose = IPv4Network(text.strip(), strict=False)
    except ValueError:
        raise ValueError(f"{text!r} is not an IPv4 CIDR such as 10.1.0.0/24") from None
    raise ValueError(f"{text!r} has host bits set; did you mean {loose}?")


def _is_loopback(host: str | None) -> bool:
    if host is None:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# --- writing -----------------------------------------------------------------------------------


def write_secrets(path: Path | str, secrets: AgentSecrets) -> None:
    """Write the secrets file atomically, created 0600 from the first byte (never chmod-ed)."""
    doc: dict[str, Any] = {}
    if secrets.agent_secret is not None:
        doc["agent_secret"] = secrets.agent_secret.get_secret_value()
    miners: dict[str, dict[str, str]] = {}
    for family, creds in sorted(secrets.miners.items()):
        entry: dict[str, str] = {}
        for name in MinerCredentials.model_fields:
            value = getattr(creds, name)
            if value is not None:
                entry[name] = value.get_secret_value() if isinstance(value, SecretStr) else value
        miners[family] = entry
    if miners:
        doc["miners"] = miners
    header = "# asicfleet agent secrets: keep this file mode 0600, owned by the agent's user.\n"
    atomic_write(Path(path), (header + tomli_w.dumps(doc)).encode(), SECRETS_MODE)


def apply_enrollment(
    config_path: Path | str, controller_url: str, response: EnrollmentResponse
) -> AgentConfig:
    """Record an enrollment: the identity, segments and pinned key in the config (keeping the
    operator's other settings), the agent secret in the secrets file (keeping miner logins).

    Everything is validated before anything is written; the secret is written first because it
    is the one thing that cannot be fetched again.
    """
    config_path = Path(config_path)
    existed = config_path.exists()
    raw = _read_toml(config_path, config_path.read_bytes) if existed else {}
    if not isinstance(raw.get("controller", {}), dict):
        raise ConfigError(f"{config_path}: controller: must be a table ([controller])")
    controller = dict(raw.get("controller", {}))
    controller.update(url=controller_url, public_key=response.controller_public_key)
    raw.update(
        agent_id=response.agent_id,
        site=response.site,
        segments=list(response.segments),
        controller=controller,
    )
    config = _resolve(config_path, _validate(config_path, AgentConfig, raw))
    previous = load_secrets(config.secrets_file) if config.secrets_file.exists() else AgentSecrets()
    secrets = _validate(
        config.secrets_file,
        AgentSecrets,
        {"agent_secret": response.agent_secret, "miners": previous.miners},
    )
    write_secrets(config.secrets_file, secrets)
    mode = stat.S_IMODE(config_path.stat().st_mode) if existed else 0o644
    mode &= ~CONFIG_UNSAFE_BITS  # it now pins the controller key: nobody else may write it
    atomic_write(config_path, tomli_w.dumps(raw).encode(), mode)
    return config


def atomic_write(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to a fresh file created with ``mode``, fsync it, rename it over ``path``
    and fsync the directory: readers see the old file or the new one, never a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(tmp, flags, mode)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot create: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ConfigError(f"{path}: cannot write: {exc.strerror}") from None
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
