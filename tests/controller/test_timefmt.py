"""The one rule for instants, periods and durations (docs/controller.md, "Times and periods"):
every input with the exact text a user reads, and the API free of the CLI."""

from __future__ import annotations

import ast
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from controller import timefmt
from tests.controller.conftest import TestUser

NOW = datetime(2026, 11, 20, 12, 30, 15, 250000, tzinfo=UTC)


def at(text: str) -> datetime:
    return datetime.fromisoformat(text)


INSTANTS = [
    ("2026-11-01T08:00Z", at("2026-11-01T08:00+00:00")),
    ("2026-11-01T13:00+05:00", at("2026-11-01T08:00+00:00")),
    (" 2026-11-01 ", at("2026-11-01T00:00+00:00")),  # a bare date: 00:00 UTC
    ("now", at("2026-11-20T12:30:15+00:00")),  # to the second
    ("NOW", at("2026-11-20T12:30:15+00:00")),
    ("2000-01-01", at("2000-01-01T00:00+00:00")),
    ("3000-01-01T00:00Z", at("3000-01-01T00:00+00:00")),
]

OUTSIDE = "must lie between 2000-01-01 and 3000-01-01"
NO_ZONE = "has no time zone; add Z for UTC"

BAD_INSTANTS = [
    ("2026-11-01T08:00", f"--as-of '2026-11-01T08:00': {NO_ZONE}"),
    ("yesterday", f"--as-of 'yesterday': expected {timefmt.INSTANT_FORM}"),
    ("2026-13-01", f"--as-of '2026-13-01': expected {timefmt.INSTANT_FORM}"),
    ("", f"--as-of '': expected {timefmt.INSTANT_FORM}"),
    ("1999-12-31T23:59Z", f"--as-of '1999-12-31T23:59Z': {OUTSIDE}"),
    ("3000-01-02", f"--as-of '3000-01-02': {OUTSIDE}"),
    ("0001-01-01T00:00+05:00", f"--as-of '0001-01-01T00:00+05:00': {OUTSIDE}"),
]  # fmt: skip

PERIODS = [
    # half-open [FROM, TO): a bare-date TO is the start of that day
    ("2026-10-01..2026-11-01", (at("2026-10-01T00:00+00:00"), at("2026-11-01T00:00+00:00"))),
    ("2026-11-20..now", (at("2026-11-20T00:00+00:00"), at("2026-11-20T12:30:15+00:00"))),
    ("2026-10-03T00:00+05:00..2026-10-04T00:00+05:00",
     (at("2026-10-02T19:00+00:00"), at("2026-10-03T19:00+00:00"))),
]  # fmt: skip

BAD_PERIODS = [
    ("2026-10-01", f"--period '2026-10-01': expected {timefmt.PERIOD_FORM}"),
    ("2026-10-01..", f"--period '2026-10-01..': expected {timefmt.PERIOD_FORM}"),
    ("2026-11-01..2026-11-01", "--period '2026-11-01..2026-11-01': FROM must be before TO"),
    ("2026-11-02..2026-11-01", "--period '2026-11-02..2026-11-01': FROM must be before TO"),
    ("2026-11-01T00:00..2026-11-02", f"--period FROM '2026-11-01T00:00': {NO_ZONE}"),
    ("2026-11-01..soon", f"--period TO 'soon': expected {timefmt.INSTANT_FORM}"),
]  # fmt: skip

DURATIONS = [
    ("90s", timedelta(seconds=90)),
    ("15m", timedelta(minutes=15)),
    ("12h", timedelta(hours=12)),
    ("7d", timedelta(days=7)),
    ("1h30m", timedelta(minutes=90)),
    ("600", timedelta(minutes=10)),
    (" 2D ", timedelta(days=2)),
]

BAD_DURATIONS = ["", "1x", "h", "1h 30m", "-5m", "0", "0h", "1.5h", "forever"]


@pytest.mark.parametrize(("text", "expected"), INSTANTS)
def test_instants(text: str, expected: datetime) -> None:
    assert timefmt.parse_instant(text, "--as-of", now=NOW) == expected


@pytest.mark.parametrize(("text", "message"), BAD_INSTANTS)
def test_bad_instants_say_what_and_why(text: str, message: str) -> None:
    with pytest.raises(timefmt.TimeFormatError) as caught:
        timefmt.parse_instant(text, "--as-of", now=NOW)
    assert str(caught.value) == message


@pytest.mark.parametrize(("text", "expected"), PERIODS)
def test_periods_are_half_open(text: str, expected: tuple[datetime, datetime]) -> None:
    assert timefmt.parse_period(text, "--period", now=NOW) == expected


@pytest.mark.parametrize(("text", "message"), BAD_PERIODS)
def test_bad_periods_say_what_and_why(text: str, message: str) -> None:
    with pytest.raises(timefmt.TimeFormatError) as caught:
        timefmt.parse_period(text, "--period", now=NOW)
    assert str(caught.value) == message


@pytest.mark.parametrize(("text", "expected"), DURATIONS)
def test_durations(text: str, expected: timedelta) -> None:
    assert timefmt.parse_duration(text, "--ttl") == expected


@pytest.mark.parametrize("text", BAD_DURATIONS)
def test_bad_durations(text: str) -> None:
    with pytest.raises(timefmt.TimeFormatError) as caught:
        timefmt.parse_duration(text, "--since")
    assert str(caught.value) == f"--since {text!r}: expected {timefmt.DURATION_FORM}"


def test_since_and_moments_count_from_now() -> None:
    assert timefmt.parse_since("24h", "--since", now=NOW) == (NOW - timedelta(hours=24), NOW)
    assert timefmt.parse_since("10000d", "--since", now=NOW)[0] == timefmt.EARLIEST
    assert timefmt.parse_moment("7d", "--until", now=NOW) == NOW + timedelta(days=7)
    assert timefmt.parse_moment("2026-12-01T08:00Z", "--until", now=NOW) == at(
        "2026-12-01T08:00+00:00"
    )
    with pytest.raises(timefmt.TimeFormatError) as caught:
        timefmt.parse_moment("2026-12-01T08:00", "--until", now=NOW)
    assert str(caught.value) == (
        "--until '2026-12-01T08:00': expected a duration from now (7d, 36h) or "
        + timefmt.INSTANT_FORM
    )


def test_api_start_end_defaults_and_errors() -> None:
    day = timedelta(hours=24)
    assert timefmt.resolve_period(None, None, now=NOW) == (NOW - day, NOW)
    end = at("2026-11-01T00:00+00:00")
    assert timefmt.resolve_period(None, "2026-11-01", now=NOW) == (end - day, end)
    with pytest.raises(timefmt.TimeFormatError) as caught:
        timefmt.resolve_period("2026-11-02", "2026-11-01", now=NOW)
    assert str(caught.value) == "start '2026-11-02': must be before end 2026-11-01T00:00:00+00:00"
    with pytest.raises(timefmt.TimeFormatError, match="end '2026-11-01T00:00': has no time zone"):
        timefmt.resolve_period(None, "2026-11-01T00:00", now=NOW)


def test_no_api_module_imports_the_cli() -> None:
    """The API is a layer over the domain, never over the console (issue 12)."""
    root = Path(__file__).resolve().parents[2] / "controller"
    offenders = []
    for path in sorted((root / "api").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            if any(n == "controller.cli" or n.startswith("controller.cli.") for n in names):
                offenders.append(f"{path.relative_to(root.parent)}:{node.lineno}")
    assert offenders == []


def test_api_bodies_follow_the_same_rule() -> None:
    from pydantic import ValidationError

    from controller.exemptions import ExemptionRequest

    made = ExemptionRequest(reason="PSU swap", ends_at="2026-12-01", starts_at="now")  # type: ignore[arg-type]
    assert made.ends_at == at("2026-12-01T00:00+00:00") and made.starts_at is not None
    with pytest.raises(ValidationError) as caught:
        ExemptionRequest(reason="PSU swap", ends_at="2026-12-01T08:00")  # type: ignore[arg-type]
    assert "ends_at '2026-12-01T08:00': has no time zone; add Z for UTC" in str(caught.value)


def test_api_query_times_use_the_wording(app_client: TestClient, admin: TestUser) -> None:
    for path in ("/api/v1/compliance/status", "/api/v1/machines/nothing/compliance"):
        response = app_client.get(path, params={"start": "2026-11-01T08:00"}, headers=admin.headers)
        assert response.status_code == 422
        assert response.json() == {
            "detail": "start '2026-11-01T08:00': has no time zone; add Z for UTC"
        }
