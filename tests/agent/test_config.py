"""Agent config and secrets: defaults, one-line errors, 0600 secrets, enrollment write-back."""

from __future__ import annotations

import base64
import logging
import os
import re
import stat
import textwrap
import tomllib
from collections.abc import Iterator
from ipaddress import IPv4Network
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from pydantic import SecretStr

from agent.config import (
    AgentSecrets,
    MinerCredentials,
    apply_enrollment,
    load_config,
    load_secrets,
    write_secrets,
)
from agent.errors import ConfigError, InsecureSecretsFile
from contract import EnrollmentResponse

PUBLIC_KEY = base64.b64encode(
    Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
).decode()
AGENT_SECRET = "afa_" + "s3cr3t-agent-credential-" * 2
MINER_PASSWORD = "very-private-antminer-pw"

MINIMAL = """
[controller]
url = "http://127.0.0.1:8080"
"""


def write(path: Path, text: str, mode: int = 0o644) -> Path:
    path.write_text(textwrap.dedent(text))
    path.chmod(mode)
    return path


@pytest.fixture
def permissive_umask() -> Iterator[None]:
    """umask 0, so only the mode we ask os.open for protects a new file."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


# --- config ------------------------------------------------------------------------------------


def test_minimal_config_has_the_documented_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path / "agent.toml", MINIMAL))
    assert config.polling.poll_interval_s == 60
    assert config.polling.identity_interval_s == 900
    assert config.polling.discovery_interval_s == 1800
    assert config.polling.concurrency_per_segment >= 1
    assert 0 < config.polling.miner_timeout_s < config.polling.poll_interval_s
    assert config.outbox.batch_size >= 1
    assert config.controller.url == "http://127.0.0.1:8080"
    assert not config.enrolled
    # Relative paths hang off the config file's directory, the outbox off data_dir.
    assert config.data_dir == tmp_path.resolve() / "data"
    assert config.secrets_file == tmp_path.resolve() / "secrets.toml"
    assert config.outbox_path == tmp_path.resolve() / "data" / "outbox.sqlite3"


def test_full_config_is_read_as_written(tmp_path: Path) -> None:
    ca = write(tmp_path / "ca.pem", "-----BEGIN CERTIFICATE-----\n")
    config = load_config(
        write(
            tmp_path / "agent.toml",
            f"""
            agent_id = "ag_1"
            site = "alpha"
            segments = ["127.50.0.0/24", "127.50.1.0/24"]
            data_dir = "/var/lib/asicfleet-agent"
            secrets_file = "private/agent-secrets.toml"

            [controller]
            url = "https://controller.example:8443/"
            public_key = "{PUBLIC_KEY}"
            ca_path = "ca.pem"

            [polling]
            poll_interval_s = 30
            identity_interval_s = 600
            discovery_interval_s = 3600
            concurrency_per_segment = 200
            miner_timeout_s = 4.5

            [uplink]
            timeout_s = 10
            backoff_initial_s = 0.5
            backoff_max_s = 120

            [outbox]
            path = "/srv/outbox.db"
            batch_size = 2000
            max_size_mb = 512
            """,
        )
    )
    assert config.enrolled
    assert config.controller.url == "https://controller.example:8443"
    assert config.controller.ca_path == ca.resolve()
    assert config.secrets_file == tmp_path.resolve() / "private" / "agent-secrets.toml"
    assert config.data_dir == Path("/var/lib/asicfleet-agent")
    assert config.outbox_path == Path("/srv/outbox.db")
    assert config.polling.miner_timeout_s == 4.5
    assert config.uplink.backoff_max_s == 120
    assert config.segments == [IPv4Network("127.50.0.0/24"), IPv4Network("127.50.1.0/24")]
    assert config.allows(IPv4Network("127.50.1.128/25"))
    assert not config.allows(IPv4Network("127.50.0.0/23")), "spans two segments"
    assert not config.allows(IPv4Network("127.51.0.0/24"))


BAD_CONFIGS = [
    ("[polling]\npoll_interval_s = 0", "polling.poll_interval_s: Input should be greater"),
    ("[polling]\npol_interval_s = 30", "polling.pol_interval_s: unknown field"),
    ("[polling]\npoll_interval_s = 'fast'", "polling.poll_interval_s: Input should be a valid"),
    ("[polling]\npoll_interval_s = 5", "polling: miner_timeout_s (5) must be shorter than"),
    ("[polling]\nidentity_interval_s = 10", "polling: identity_interval_s (10) must not be"),
    ("[polling]\nconcurrency_per_segment = 0", "polling.concurrency_per_segment"),
    ("[uplink]\nbackoff_max_s = 0.1", "uplink: backoff_max_s (0.1) must not be below"),
    ("[outbox]\nbatch_size = 100000", "outbox.batch_size: Input should be less than"),
    ("segments = ['10.1.0.5/24']", "segments: '10.1.0.5/24' has host bits set; did you mean"),
    ("segments = ['10.0.0.0/8']", "segments: 10.0.0.0/8 is wider than a /16"),
    ("segments = ['10.1.0.0/24', '10.1.0.0/23']", "segments: 10.1.0.0/23 and 10.1.0.0/24 overlap"),
    ("segments = ['fleet']", "segments: 'fleet' is not an IPv4 CIDR"),
    ("agent_secret = 'afa_x'", "agent_secret: secrets do not belong in the config file"),
    ("[controller]\npublic_key = 'not-a-key'", "controller.public_key: must be a base64 Ed25519"),
    ("[controller]\nca_path = 'nope.pem'", "controller.ca_path:"),
]


@pytest.mark.parametrize(("extra", "message"), BAD_CONFIGS)
def test_bad_config_is_one_line_naming_file_and_field(
    tmp_path: Path, extra: str, message: str
) -> None:
    if extra.startswith("[controller]"):  # a second [controller] header would be bad TOML
        text = MINIMAL + extra.removeprefix("[controller]") + "\n"
    else:
        text = extra + "\n" + MINIMAL
    path = write(tmp_path / "agent.toml", text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    text = str(caught.value)
    assert "\n" not in text
    assert text.startswith(f"{path}: ")
    assert message in text


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://controller", "controller.url: must be an http(s) URL"),
        ("https://user:pw@controller", "controller.url: must not carry credentials"),
        ("ftp://user:pw@controller", "controller.url: must not carry credentials"),
        ("https://controller:84x3", "controller.url: has an invalid port"),
        ("http://10.9.8.7:8080", "controller: url: plain http to a remote controller"),
    ],
)
def test_bad_controller_url(tmp_path: Path, url: str, message: str) -> None:
    path = write(tmp_path / "agent.toml", f'[controller]\nurl = "{url}"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert message in str(caught.value)
    assert "pw@" not in str(caught.value)


def test_plain_http_to_a_remote_host_only_when_asked_for(tmp_path: Path) -> None:
    path = write(
        tmp_path / "agent.toml",
        '[controller]\nurl = "http://10.9.8.7:8080"\nallow_plain_http = true\n',
    )
    assert load_config(path).controller.url == "http://10.9.8.7:8080"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[controller\nurl=1", "not valid TOML"),
        ("site = 'alpha'\n", "controller: required field is missing"),
    ],
)
def test_unreadable_or_incomplete_config(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path / "agent.toml", text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_missing_config_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path / 'nope.toml'}: no such config")):
        load_config(tmp_path / "nope.toml")


PINNED = f"""
[controller]
url = "http://127.0.0.1:8080"
public_key = "{PUBLIC_KEY}"
"""


@pytest.mark.parametrize("mode", [0o664, 0o646, 0o666, 0o620, 0o602])
def test_a_config_pinning_the_key_that_others_may_write_is_refused(
    tmp_path: Path, mode: int
) -> None:
    path = write(tmp_path / "agent.toml", PINNED, mode)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    text = str(caught.value)
    assert "\n" not in text
    assert text.startswith(str(path)) and f"mode {mode:04o}" in text
    assert f"chmod go-w {path}" in text
    path.chmod(mode & ~0o022)  # the fix the message gives
    assert load_config(path).controller.public_key == PUBLIC_KEY


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o600, 0o444])
def test_a_config_pinning_the_key_only_its_owner_writes_is_fine(tmp_path: Path, mode: int) -> None:
    path = write(tmp_path / "agent.toml", PINNED, mode)
    assert load_config(path).controller.public_key == PUBLIC_KEY


def test_a_writable_config_without_a_pinned_key_is_still_read(tmp_path: Path) -> None:
    """Before enrollment there is no trust anchor to swap."""
    assert load_config(write(tmp_path / "agent.toml", MINIMAL, 0o666)).controller.public_key is None


def test_enrollment_drops_group_write_from_the_config_it_pins_the_key_in(tmp_path: Path) -> None:
    path = write(tmp_path / "agent.toml", MINIMAL, 0o664)
    config = apply_enrollment(path, "http://127.0.0.1:8080", enrollment())
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert load_config(path) == config


# --- secrets -----------------------------------------------------------------------------------

SECRETS = f"""
agent_secret = "{AGENT_SECRET}"

[miners.antminer]
username = "root"
password = "{MINER_PASSWORD}"

[miners.whatsminer]
password = "whatsminer-api-pw"

[miners.vnish]
password = "vnish-pw"
ssh_password = "vnish-ssh-pw"
"""


def test_secrets_load_from_a_0600_file_and_never_show(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    secrets = load_secrets(write(tmp_path / "secrets.toml", SECRETS, 0o600))
    assert secrets.agent_secret is not None
    assert secrets.agent_secret.get_secret_value() == AGENT_SECRET
    antminer = secrets.credentials("antminer")
    assert antminer is not None and antminer.username == "root"
    assert antminer.password is not None
    assert antminer.password.get_secret_value() == MINER_PASSWORD
    assert secrets.credentials("avalon") is None

    logging.getLogger("test").warning("loaded %s / %r", secrets, secrets)
    for shown in (repr(secrets), str(secrets), secrets.model_dump_json(), caplog.text):
        assert AGENT_SECRET not in shown
        assert MINER_PASSWORD not in shown
        assert "vnish-ssh-pw" not in shown


def test_read_only_0400_is_fine_too(tmp_path: Path) -> None:
    assert load_secrets(write(tmp_path / "secrets.toml", SECRETS, 0o400)).agent_secret


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o666])
def test_secrets_readable_by_others_are_refused_with_the_fix(tmp_path: Path, mode: int) -> None:
    path = write(tmp_path / "secrets.toml", SECRETS, mode)
    with pytest.raises(InsecureSecretsFile) as caught:
        load_secrets(path)
    text = str(caught.value)
    assert "\n" not in text
    assert f"mode {mode:04o}" in text
    assert f"chmod 600 {path}" in text
    assert AGENT_SECRET not in text


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the file away")
def test_secrets_owned_by_another_user_are_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "secrets.toml", SECRETS, 0o600)
    os.chown(path, 65534, -1)
    with pytest.raises(InsecureSecretsFile, match=r"is owned by .*not by root.*chown root"):
        load_secrets(path)


def test_a_directory_is_not_a_secrets_file(tmp_path: Path) -> None:
    path = tmp_path / "secrets.toml"
    path.mkdir(mode=0o700)
    with pytest.raises(ConfigError, match="not a regular file"):
        load_secrets(path)


def test_missing_secrets_file_says_to_enroll(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no such secrets file .*agent enroll"):
        load_secrets(tmp_path / "secrets.toml")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('agent_secret = "plain-password"', "agent_secret: must start with 'afa_'"),
        ('[miners.antminr]\npassword = "x"', "miners: unknown firmware family antminr (known:"),
        ('[miners.antminer]\npasword = "x"', "miners.antminer.pasword: unknown field"),
        ('agent_secret = "afa_\n', "not valid TOML"),
    ],
)
def test_bad_secrets_are_one_line_and_do_not_echo(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path / "secrets.toml", text, 0o600)
    with pytest.raises(ConfigError) as caught:
        load_secrets(path)
    shown = str(caught.value)
    assert shown.startswith(f"{path}: ") and "\n" not in shown
    assert message in shown
    assert "plain-password" not in shown


def test_written_secrets_are_0600_from_the_start_and_round_trip(
    tmp_path: Path, permissive_umask: None
) -> None:
    path = tmp_path / "secrets.toml"
    write(path, "# an old, world-readable file\n", 0o666)
    secrets = AgentSecrets(
        agent_secret=SecretStr(AGENT_SECRET),
        miners={
            "antminer": MinerCredentials(username="root", password=SecretStr('p"w\\\n\x7f')),
            "avalon": MinerCredentials(password=SecretStr("avalon-pw")),
        },
    )
    write_secrets(path, secrets)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600, "replaced, not chmod-ed in place"
    assert path.stat().st_uid == os.geteuid()
    assert [p.name for p in tmp_path.iterdir()] == ["secrets.toml"], "no temp file left"
    again = load_secrets(path)
    assert again.agent_secret is not None
    assert again.agent_secret.get_secret_value() == AGENT_SECRET
    pw = again.miners["antminer"].password
    assert pw is not None and pw.get_secret_value() == 'p"w\\\n\x7f'
    assert again.miners["antminer"].username == "root"
    assert again.miners["avalon"].username is None


# --- enrollment write-back -----------------------------------------------------------------------


def enrollment(**changes: object) -> EnrollmentResponse:
    base: dict[str, object] = {
        "agent_id": "ag_42",
        "agent_secret": AGENT_SECRET,
        "site": "alpha",
        "segments": ["127.60.0.0/24", "127.60.1.0/24"],
        "controller_public_key": PUBLIC_KEY,
    }
    return EnrollmentResponse.model_validate(base | changes)


def test_enrollment_fills_in_a_fresh_config_and_secrets(
    tmp_path: Path, permissive_umask: None
) -> None:
    path = tmp_path / "etc" / "agent.toml"
    config = apply_enrollment(path, "http://127.0.0.1:8080", enrollment())
    assert config.enrolled
    assert config == load_config(path)
    assert config.agent_id == "ag_42" and config.site == "alpha"
    assert config.controller.public_key == PUBLIC_KEY
    assert [str(s) for s in config.segments] == ["127.60.0.0/24", "127.60.1.0/24"]
    assert AGENT_SECRET not in path.read_text(), "the secret goes to the secrets file only"
    assert stat.S_IMODE(config.secrets_file.stat().st_mode) == 0o600
    secret = load_secrets(config.secrets_file).agent_secret
    assert secret is not None and secret.get_secret_value() == AGENT_SECRET


def test_enrollment_keeps_the_operators_settings_and_miner_logins(tmp_path: Path) -> None:
    path = write(
        tmp_path / "agent.toml",
        """
        data_dir = "state"
        [controller]
        url = "http://127.0.0.1:1"
        [polling]
        poll_interval_s = 20
        """,
        0o640,
    )
    write(tmp_path / "secrets.toml", f'[miners.antminer]\npassword = "{MINER_PASSWORD}"\n', 0o600)
    config = apply_enrollment(path, "http://127.0.0.1:8080", enrollment())
    assert config.polling.poll_interval_s == 20
    assert config.data_dir == tmp_path.resolve() / "state"
    assert config.controller.url == "http://127.0.0.1:8080"
    assert tomllib.loads(path.read_text())["data_dir"] == "state"
    assert stat.S_IMODE(path.stat().st_mode) == 0o640, "the config keeps its mode"
    secrets = load_secrets(tmp_path / "secrets.toml")
    assert secrets.agent_secret is not None
    password = secrets.miners["antminer"].password
    assert password is not None and password.get_secret_value() == MINER_PASSWORD


def test_a_bad_enrollment_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    with pytest.raises(ConfigError, match=r"controller\.public_key"):
        apply_enrollment(path, "http://127.0.0.1:8080", enrollment(controller_public_key="abc"))
    with pytest.raises(ConfigError, match="segments"):
        apply_enrollment(path, "http://127.0.0.1:8080", enrollment(segments=["10.0.0.0/8"]))
    assert list(tmp_path.iterdir()) == []
