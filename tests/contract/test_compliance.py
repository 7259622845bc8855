"""The one rule both sides use for "is this miner on its approved pools"."""

from __future__ import annotations

from contract import ApprovedPoolSet, DevFeePolicy, PoolReading, assess_pools

URLS = ["stratum+tcp://btc.dmp.example:3333", "stratum+tcp://btc2.dmp.example:3333"]
WORKER = "farm1.M1"


def approved(devfee: DevFeePolicy = DevFeePolicy.ALLOW) -> ApprovedPoolSet:
    return ApprovedPoolSet(name="DMP", urls=URLS, account="farm1", devfee=devfee)


def readings(*pairs: tuple[str, str], kind: str | None = None) -> list[PoolReading]:
    return [PoolReading(url=u, user=w, kind=kind) for u, w in pairs]


def test_the_approved_urls_in_slot_order_with_the_worker_are_compliant() -> None:
    verdict = assess_pools(approved(), WORKER, readings((URLS[0], WORKER), (URLS[1], WORKER)))
    assert verdict.compliant and verdict.problems == ()
    # scheme and host case, a missing scheme and empty padded slots do not matter
    loose = readings(
        ("BTC.dmp.example:3333", WORKER), ("STRATUM+TCP://BTC2.DMP.EXAMPLE:3333", WORKER), ("", "")
    )
    assert assess_pools(approved(), WORKER, loose).compliant


def test_order_worker_and_extra_slots_are_each_named() -> None:
    swapped = assess_pools(approved(), WORKER, readings((URLS[1], WORKER), (URLS[0], WORKER)))
    assert not swapped.compliant and len(swapped.problems) == 2
    thief = assess_pools(approved(), WORKER, readings((URLS[0], "thief.1"), (URLS[1], WORKER)))
    assert thief.problems == ("slot 1: worker 'thief.1' is not 'farm1.M1'",)
    extra = readings((URLS[0], WORKER), (URLS[1], WORKER), ("stratum+tcp://evil.example:1", "x"))
    assert assess_pools(approved(), WORKER, extra).problems == (
        "slot 3: unapproved pool stratum+tcp://evil.example:1",
    )


def test_a_foreign_pool_cannot_pass_as_the_firmware_fee_by_its_name() -> None:
    """Malware names its worker ``DevFee`` (and even claims kind=devfee): still a user pool."""
    sneaky = readings((URLS[0], WORKER), (URLS[1], WORKER)) + readings(
        ("stratum+tcp://evil.example:4444", "DevFee"), kind="devfee"
    )
    verdict = assess_pools(approved(), WORKER, sneaky)
    assert not verdict.compliant
    assert verdict.problems == ("slot 3: unapproved pool stratum+tcp://evil.example:4444",)


def test_the_vnish_fee_slot_is_allowed_or_forbidden_as_the_set_says() -> None:
    with_fee = readings((URLS[0], WORKER), (URLS[1], WORKER), ("DevFee", "DevFee"))
    allowed = assess_pools(approved(), WORKER, with_fee)
    assert allowed.compliant and allowed.devfee_pools == ("DevFee",)
    forbidden = assess_pools(approved(DevFeePolicy.FORBID), WORKER, with_fee)
    assert forbidden.problems == ("firmware fee pool present: DevFee",)
