"""PolicyGuard: only a signed, unexpired, newer bundle is put in force; refusals are reported."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.config import AgentConfig
from agent.daemon import FleetAgent
from agent.errors import ConfigError
from agent.outbox import Outbox
from agent.policy import PolicyGuard, PolicyRefused, RefusalReason
from contract.policy import ApprovedPoolSet, EnforcementMode, PolicyBundle, PolicyContent
from controller.signing import SigningKey

NOW = datetime.now(UTC)


def signing_key() -> SigningKey:
    return SigningKey(private=Ed25519PrivateKey.generate(), path=Path("unused.pem"))


KEY = signing_key()


def bundle(
    version: int,
    *,
    key: SigningKey | None = KEY,
    expires: timedelta = timedelta(hours=1),
    mode: EnforcementMode = EnforcementMode.ENFORCE,
    site: str = "kz-1",
) -> PolicyBundle:
    unsigned = PolicyBundle(
        version=version,
        issued_at=NOW,
        expires_at=NOW + expires,
        content=PolicyContent(
            site=site,
            mode=mode,
            pool_set=ApprovedPoolSet(
                name="DMP", urls=["stratum+tcp://a.example:3333"], account="kz"
            ),
        ),
    )
    return key.sign_bundle(unsigned) if key is not None else unsigned


def guard(tmp_path: Path, site: str | None = "kz-1") -> PolicyGuard:
    return PolicyGuard(KEY.public_key_b64(), tmp_path / "policy.json", site=site)


def refusal(g: PolicyGuard, offered: PolicyBundle) -> PolicyRefused:
    with pytest.raises(PolicyRefused) as info:
        g.accept(offered)
    return info.value


def test_accepts_a_signed_bundle_and_persists_it(tmp_path: Path) -> None:
    g = guard(tmp_path)
    assert g.current is None
    offered = bundle(3)
    assert g.accept(offered) == offered and g.current == offered
    assert (tmp_path / "policy.json").stat().st_mode & 0o777 == 0o600
    again = guard(tmp_path)  # a restart: the stored bundle is verified and in force
    assert again.current == offered


@pytest.mark.parametrize(
    ("offered", "reason"),
    [
        (lambda: bundle(5, key=None), RefusalReason.UNSIGNED),
        (lambda: bundle(5, key=signing_key()), RefusalReason.BAD_SIGNATURE),
        (lambda: bundle(5, expires=timedelta(seconds=-1)), RefusalReason.EXPIRED),
        (lambda: bundle(1), RefusalReason.OLDER),
        (lambda: bundle(2, mode=EnforcementMode.OBSERVE), RefusalReason.CONFLICT),
        (lambda: bundle(5, site="other-site"), RefusalReason.WRONG_SITE),
    ],
)
def test_refusals_keep_the_last_valid_bundle(tmp_path: Path, offered, reason) -> None:  # type: ignore[no-untyped-def]
    g = guard(tmp_path)
    valid = g.accept(bundle(2))
    refused = refusal(g, offered())
    assert refused.reason is reason
    assert g.current == valid and guard(tmp_path).current == valid  # in memory and on disk
    event = refused.event
    assert event.kind == "policy_refused" and event.severity == "critical"
    assert event.data["reason"] == reason.value
    assert event.data["kept_version"] == 2
    assert event.data["offered_version"] == offered().version


def test_tampered_content_is_refused(tmp_path: Path) -> None:
    g = guard(tmp_path)
    g.accept(bundle(2))
    good = bundle(3)
    evil_set = good.content.pool_set.model_copy(  # type: ignore[union-attr]
        update={"urls": ["stratum+tcp://pool.hijack.example:3333"]}
    )
    tampered = good.model_copy(
        update={"content": good.content.model_copy(update={"pool_set": evil_set})}
    )
    assert refusal(g, tampered).reason is RefusalReason.BAD_SIGNATURE
    assert g.current is not None and g.current.version == 2


def test_same_version_later_expiry_is_a_refresh(tmp_path: Path) -> None:
    g = guard(tmp_path)
    g.accept(bundle(4))
    refreshed = bundle(4, expires=timedelta(hours=5))
    assert g.accept(refreshed) == refreshed
    assert g.current is not None and g.current.expires_at == refreshed.expires_at
    assert g.accept(bundle(4)) == refreshed  # an earlier expiry changes nothing


def test_repeated_refusal_is_flagged(tmp_path: Path) -> None:
    g = guard(tmp_path)
    old = bundle(1)
    g.accept(bundle(2))
    assert refusal(g, old).repeated is False
    assert refusal(g, old).repeated is True


def test_expired_stored_bundle_is_still_enforced(tmp_path: Path) -> None:
    g = guard(tmp_path)
    stored = bundle(2, expires=timedelta(seconds=30))
    g.accept(stored, now=NOW)
    later = PolicyGuard(KEY.public_key_b64(), tmp_path / "policy.json")
    assert later.current == stored  # loaded as is
    assert later.expired(NOW + timedelta(minutes=5))


def test_edited_stored_bundle_is_ignored(tmp_path: Path) -> None:
    g = guard(tmp_path)
    g.accept(bundle(2))
    path = tmp_path / "policy.json"
    data = json.loads(path.read_text())
    data["content"]["mode"] = "observe"
    path.write_text(json.dumps(data))
    assert guard(tmp_path).current is None


def test_another_sites_stored_bundle_is_refused_on_load(tmp_path: Path) -> None:
    """A bundle signed by the same controller for site kz-2, copied into a kz-1 agent's data
    dir, was enforced before (issue 10): the signature is valid, only the site is wrong."""
    other = tmp_path / "other"
    other.mkdir()
    guard(other, site="kz-2").accept(bundle(7, site="kz-2"))
    (tmp_path / "policy.json").write_bytes((other / "policy.json").read_bytes())
    mine = guard(tmp_path, site="kz-1")
    assert mine.current is None
    assert mine.stored_refusal == (
        f"{tmp_path / 'policy.json'}: the stored policy version 7 is for site 'kz-2', this "
        "agent serves 'kz-1' (copied from another agent?); ignoring it"
    )
    # its own site's bundle is used as before, and says nothing
    mine.accept(bundle(8))
    again = guard(tmp_path, site="kz-1")
    assert again.current is not None and again.current.version == 8
    assert again.stored_refusal is None


def test_policy_show_names_why_the_stored_bundle_is_refused(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from asicfleet.cli import app

    data = tmp_path / "data"
    data.mkdir()
    guard(data, site="kz-2").accept(bundle(7, site="kz-2"))
    config = tmp_path / "agent.toml"
    config.write_text(
        f'data_dir = "{data}"\nagent_id = "a1"\nsite = "kz-1"\nsegments = ["127.0.0.0/30"]\n'
        f'[controller]\nurl = "http://127.0.0.1:9"\npublic_key = "{KEY.public_key_b64()}"\n'
    )
    result = CliRunner().invoke(app, ["agent", "policy", "show", "--config", str(config)])
    assert result.exit_code == 1
    assert result.stderr.strip() == (
        f"error: no valid policy stored: {data / 'policy.json'}: the stored policy version 7 "
        "is for site 'kz-2', this agent serves 'kz-1' (copied from another agent?); ignoring it"
    )


def test_bad_public_key_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="public_key"):
        PolicyGuard("not-base64!", tmp_path / "policy.json")


async def test_agent_reports_each_refusal_once(tmp_path: Path) -> None:
    config = AgentConfig.model_validate(
        {"data_dir": str(tmp_path), "controller": {"url": "http://127.0.0.1:9"}}
    )
    with Outbox(config.outbox_path) as outbox:
        agent = FleetAgent(config, outbox, policy=guard(tmp_path))
        assert await agent.offer_policy(bundle(2))
        tampered = bundle(3).model_copy(update={"version": 4})
        for offered in (tampered, tampered, bundle(3, expires=timedelta(seconds=-5)), bundle(1)):
            assert not await agent.offer_policy(offered)
        events = [e for b in outbox.peek(100) for e in b.events]
        assert [e.data["reason"] for e in events] == ["bad_signature", "expired", "older_version"]
        assert all(e.kind == "policy_refused" for e in events)
        assert agent.policy is not None and agent.policy.current is not None
        assert agent.policy.current.version == 2
