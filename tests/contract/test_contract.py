"""The wire contract: versions, validation, signing bytes."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Address

import pytest
from pydantic import ValidationError

from contract import (
    CONTRACT_VERSION,
    Observation,
    PolicyBundle,
    PolicyContent,
    ReportBatch,
    UnsupportedContractVersion,
    check_version,
)

NOW = datetime(2026, 11, 1, tzinfo=UTC)


def batch(**changes: object) -> dict[str, object]:
    base: dict[str, object] = {
        "batch_id": str(uuid.uuid4()),
        "agent_clock": "2026-11-01T00:00:00Z",
        "sequence": 1,
        "observations": [
            {"ip": "127.10.0.1", "observed_at": "2026-11-01T00:00:00Z", "reachable": True}
        ],
    }
    return base | changes


def test_round_trip_keeps_everything() -> None:
    parsed = ReportBatch.model_validate(batch())
    again = ReportBatch.model_validate_json(parsed.model_dump_json())
    assert again == parsed
    assert again.contract_version == CONTRACT_VERSION


def test_newer_minor_is_accepted_and_unknown_fields_ignored() -> None:
    parsed = ReportBatch.model_validate(batch(contract_version="1.7", future_field=3))
    assert parsed.contract_version == "1.7"


@pytest.mark.parametrize("version", ["2.0", "0.9"])
def test_unknown_major_is_refused_with_a_clear_message(version: str) -> None:
    with pytest.raises(ValidationError, match=f"contract version {version} is not supported"):
        ReportBatch.model_validate(batch(contract_version=version))
    with pytest.raises(UnsupportedContractVersion):
        check_version(version)


def test_garbage_version_is_refused() -> None:
    with pytest.raises(UnsupportedContractVersion, match=r"MAJOR\.MINOR"):
        check_version("one")


def test_naive_timestamps_are_refused_not_guessed() -> None:
    with pytest.raises(ValidationError, match="timezone"):
        Observation.model_validate(
            {"ip": "127.10.0.1", "observed_at": "2026-11-01T00:00:00", "reachable": True}
        )


def test_malformed_items_name_the_field() -> None:
    bad = batch(observations=[{"ip": "not-an-ip", "observed_at": "2026-11-01T00:00:00Z"}])
    with pytest.raises(ValidationError) as info:
        ReportBatch.model_validate(bad)
    locations = {tuple(e["loc"]) for e in info.value.errors()}
    assert ("observations", 0, "ip") in locations
    assert ("observations", 0, "reachable") in locations


def test_policy_signing_bytes_exclude_the_signature_and_are_stable() -> None:
    bundle = PolicyBundle(
        version=3,
        issued_at=NOW,
        expires_at=NOW + timedelta(days=1),
        content=PolicyContent(site="alpha"),
    )
    signed = bundle.model_copy(update={"signature": "c2ln"})
    assert bundle.signing_bytes() == signed.signing_bytes()
    assert b'"version":3' in bundle.signing_bytes()
    changed = bundle.model_copy(update={"version": 4})
    assert changed.signing_bytes() != bundle.signing_bytes()


def test_report_text_is_cleaned_with_notes_never_refusing_the_batch() -> None:
    body = batch(
        observations=[
            {
                "ip": "127.10.0.1",
                "observed_at": "2026-11-01T00:00:00Z",
                "reachable": True,
                "serial": "S" * 300,
                "error": "bad\x00byte",
                "pools": [{"url": "stratum+tcp://p\ud800:1", "user": "w"}],
            }
        ],
        events=[{"kind": "odd", "at": "2026-11-01T00:00:00Z", "data": {"k": "\x00"}}],
    )
    parsed = ReportBatch.model_validate(body)
    [obs] = parsed.observations
    assert (
        len(obs.serial or "") == 128
        and (obs.serial or "").endswith("\ufffd")
        and obs.error == "bad\ufffdbyte"
    )
    assert obs.pools[0].url == "stratum+tcp://p\ufffd:1"
    assert obs.cleaned == [
        "error: 1 invalid character(s) replaced (NUL)",
        "pools[0].url: 1 invalid character(s) replaced (lone surrogate)",
        "serial: cut from 300 to 128 characters",
    ]
    assert parsed.events[0].data == {"k": "\ufffd"}
    assert parsed.events[0].cleaned == ["data.k: 1 invalid character(s) replaced (NUL)"]
    # The notes travel: what the agent cleaned is still said on the controller's side.
    again = ReportBatch.model_validate_json(parsed.model_dump_json())
    assert again.observations[0].cleaned == obs.cleaned
    # Limits are documented in the schema though enforced by cutting.
    schema = Observation.model_json_schema()
    assert schema["properties"]["serial"]["maxLength"] == 128
    # Clean input is returned as it came, with no notes.
    clean = ReportBatch.model_validate(batch())
    assert clean.observations[0].cleaned == []


def test_an_item_built_from_a_miners_string_with_a_lone_surrogate_is_cleaned_not_refused() -> None:
    """On the agent, a report item is built from what a miner said (Python strings)."""
    obs = Observation(
        ip=IPv4Address("127.10.0.1"),
        observed_at=NOW,
        reachable=True,
        serial="SN\ud800",
        pools=[{"url": "stratum+tcp://p:1", "user": "w\ud800"}],  # type: ignore[list-item]
    )
    assert obs.serial == "SN\ufffd" and obs.pools[0].user == "w\ufffd"
    assert obs.cleaned == [
        "serial: 1 invalid character(s) replaced (lone surrogate)",
        "pools[0].user: 1 invalid character(s) replaced (lone surrogate)",
    ]
