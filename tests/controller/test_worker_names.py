"""One worker rule for the bundle, the evidence and the exports."""

from __future__ import annotations

from controller.worker_names import render_worker, worker_facts


def test_the_reported_serial_names_the_worker_and_the_label_only_stands_in() -> None:
    mismatch = worker_facts(
        account="farm1", site="alpha", machine_id="M1", reported_serial="SN-BOARD",
        label_serial="SN-LABEL",
    )  # fmt: skip
    assert render_worker("{account}.{serial}", mismatch) == "farm1.SN-BOARD"
    label_only = worker_facts(
        account="farm1", site="alpha", machine_id="M1", reported_serial=None,
        label_serial="SN-LABEL",
    )  # fmt: skip
    assert render_worker("{account}.{serial}", label_only) == "farm1.SN-LABEL"
    unreadable = worker_facts(
        account="farm1", site="alpha", machine_id="M1", reported_serial=None, label_serial=None
    )
    assert render_worker("{account}.{serial}", unreadable) == "farm1.M1"
    placed = worker_facts(
        account="farm1", site="Site A", machine_id="M1", reported_serial=None,
        label_serial=None, rack="R 7",
    )  # fmt: skip
    assert render_worker("{account}_{site}-{rack}-{machine_id}", placed) == "farm1_Site_A-R_7-M1"
