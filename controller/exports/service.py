"""Running an export: build the tables, write the files, sign the manifest, audit the request.

The CLI and the API's background jobs both call :func:`run_export`. The audit-log chain head
is read before anything else, so the manifest names the log as it stood when the export
began; the export's own audit entry (``export.create``, carrying the manifest's SHA-256) is
appended afterwards, in the caller's transaction.
"""

from __future__ import annotations

import hashlib
import shutil
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import func, select
from sqlmodel import Session

from controller import audit
from controller.actors import Actor
from controller.errors import ControllerError
from controller.exports import audit_export, csv_writer, pdf_writer, xlsx_writer
from controller.exports.compliance_report import (
    DEFAULT_REPEAT_THRESHOLD,
    STALE_AFTER,
    ComplianceQuery,
    build_compliance,
)
from controller.exports.i18n import Lang, label
from controller.exports.manifest import MANIFEST, write_manifest
from controller.exports.register import RegisterQuery, build_register, register_totals
from controller.exports.table import Document, utc_text
from controller.models import LifecycleState, utcnow
from controller.signing import SigningKey
from controller.tables import VERSION

ExportKind = Literal["register", "compliance", "audit"]
FORMATS: dict[str, tuple[str, ...]] = {
    "register": ("csv", "xlsx", "pdf"),
    "compliance": ("csv", "xlsx", "pdf"),
    "audit": ("csv", "json"),
}
Progress = Callable[[float, str], None]


class ExportError(ControllerError):
    """The export cannot be made as asked (bad output folder, bad format …)."""


@dataclass(frozen=True)
class ExportRequest:
    """Everything an export is asked with; it is recorded in the manifest as given."""

    kind: ExportKind
    formats: tuple[str, ...]
    lang: Lang = "en"
    as_of: datetime | None = None
    period: tuple[datetime, datetime] | None = None
    site: str | None = None
    state: LifecycleState | None = None
    model: str | None = None
    repeat_threshold: int = DEFAULT_REPEAT_THRESHOLD

    def problems(self, now: datetime | None = None) -> list[str]:
        """What is wrong with the request itself, at ``now`` (default: the clock).

        The register cannot be shown as it will stand: an ``as_of`` in the future is refused,
        as is a period that has not begun. A period that ends in the future is accepted and
        counted up to the moment the export is made (the cover says so)."""
        now = now or utcnow()
        out = []
        allowed = FORMATS[self.kind]
        bad = [f for f in self.formats if f not in allowed]
        if bad or not self.formats:
            out.append(
                f"format(s) {', '.join(bad) or '(none)'} not available for a {self.kind} "
                f"export (choose from {', '.join(allowed)})"
            )
        if self.kind == "register" and self.as_of is None:
            out.append("a register export needs --as-of")
        if self.kind == "compliance" and self.period is None:
            out.append("a compliance report needs --period")
        if self.as_of is not None and self.as_of > now:
            out.append(
                f"--as-of {utc_text(self.as_of)} is in the future (now is {utc_text(now)}): "
                "the register can only be shown as it stood; use --as-of now"
            )
        if self.period is not None and self.period[1] <= self.period[0]:
            out.append("the period must end after it starts")
        elif self.period is not None and self.period[0] >= now:
            out.append(
                f"the period starts at {utc_text(self.period[0])}, in the future "
                f"(now is {utc_text(now)}): there is nothing to count yet"
            )
        if self.repeat_threshold < 1:
            out.append("the repeat-offender threshold must be at least 1")
        return out

    def described(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "formats": list(self.formats),
            "lang": self.lang,
            "as_of": utc_text(self.as_of) if self.as_of else None,
            "period": (
                {"from": utc_text(self.period[0]), "to": utc_text(self.period[1])}
                if self.period
                else None
            ),
            "filters": {
                "site": self.site,
                "lifecycle_state": self.state.value if self.state else None,
                "model": self.model,
            },
            **({"repeat_threshold": self.repeat_threshold} if self.kind == "compliance" else {}),
        }


@dataclass
class ExportResult:
    folder: Path
    manifest: dict[str, Any]
    manifest_sha256: str
    rows: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # why a table is empty, what was clipped


def prepare_folder(out: Path) -> None:
    """``out`` must be new or empty: an export never mixes with other files."""
    if out.exists():
        if not out.is_dir():
            raise ExportError(f"{out} exists and is not a folder")
        if any(out.iterdir()):
            raise ExportError(f"{out} is not empty; give a new folder for the export")
    else:
        try:
            out.mkdir(parents=True)
        except OSError as exc:
            raise ExportError(f"cannot create {out}: {exc.strerror}") from None


def run_export(
    session: Session,
    request: ExportRequest,
    out: Path,
    key: SigningKey,
    actor: Actor,
    *,
    resolution_s: int,
    progress: Progress | None = None,
    stale_after: timedelta = STALE_AFTER,
) -> ExportResult:
    """Write the export into ``out`` (new or empty) and audit it; the caller commits."""
    generated_at = utcnow()
    problems = request.problems(generated_at)
    if problems:
        raise ExportError("; ".join(problems))
    prepare_folder(out)
    report = progress or (lambda _f, _s: None)
    head = audit_export.chain_head(session)
    report(0.05, "reading")
    document = _document(session, request, head, resolution_s, generated_at, stale_after)
    document.cover.extend(_cover(request, actor, generated_at, head, document, key))
    rows = {t.name: len(t.rows) for t in document.tables}
    notes = _notes(session, request, document, generated_at)
    steps = len(request.formats)
    for index, fmt in enumerate(request.formats):
        report(0.3 + 0.6 * index / steps, f"writing {fmt}")
        _write(fmt, document, out, session, head, request.lang)
    report(0.92, "signing")
    body = {
        "request": request.described(),
        "requested_by": {"name": actor.name, "kind": actor.kind, "source": actor.source},
        "generated_at": utc_text(generated_at),
        "rows": rows,
        "audit_chain_head": head,
        **({"notes": notes} if notes else {}),
    }
    manifest = write_manifest(out, body, key)
    digest = hashlib.sha256((out / MANIFEST).read_bytes()).hexdigest()
    audit.record(
        session,
        actor=actor.name,
        actor_kind=actor.kind,
        action="export.create",
        entity="export",
        entity_id=request.kind,
        after={
            "request": request.described(),
            "manifest_sha256": digest,
            "files": [f["name"] for f in manifest["files"]],
            "rows": manifest["rows"],
        },
        source=actor.source,
    )
    report(1.0, "done")
    return ExportResult(
        folder=out, manifest=manifest, manifest_sha256=digest, rows=rows, notes=notes
    )


def _notes(
    session: Session, request: ExportRequest, document: Document, now: datetime
) -> list[str]:
    """What a reader must know to understand the rows: a period counted only up to now, and
    why the main table is empty when it is."""
    notes: list[str] = []
    if request.period is not None and request.period[1] > now and request.kind == "compliance":
        notes.append(
            f"the period ends at {utc_text(request.period[1])}, after the export was made: "
            f"time was counted up to {utc_text(now)}"
        )
    main = {"register": "register", "compliance": "compliance_machines"}.get(request.kind)
    if main is None or any(t.rows for t in document.tables if t.name == main):
        return notes
    moment = (
        request.as_of
        if request.kind == "register"
        else request.period[1]
        if request.period
        else None
    )
    assert moment is not None
    conn = session.connection()
    first = conn.execute(select(func.min(VERSION.c.valid_from))).scalar()
    filters = ", ".join(
        f"{name} {value}"
        for name, value in (
            ("site", request.site),
            ("state", request.state.value if request.state else None),
            ("model", request.model),
        )
        if value
    )
    if first is None:
        notes.append("0 rows: the register is empty (no machine has been discovered or claimed)")
    elif _aware(first) > moment:
        notes.append(
            f"0 rows: no machine was on the register at {utc_text(moment)}; the first "
            f"register record is from {utc_text(_aware(first))}"
        )
    elif filters:
        notes.append(f"0 rows: no machine matched {filters} at {utc_text(moment)}")
    else:
        notes.append(
            "0 rows: no machine was seen and in service within the period up to "
            f"{utc_text(min(moment, now))}"
        )
    return notes


def _aware(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def zip_folder(folder: Path, target: Path) -> Path:
    """The export folder as one zip (files under a folder named like the export)."""
    tmp = target.with_name(target.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(folder.iterdir()):
            if path.is_file():
                archive.write(path, f"{folder.name}/{path.name}")
    shutil.move(tmp, target)
    return target


# --- the parts ---------------------------------------------------------------------------------


def _document(
    session: Session,
    request: ExportRequest,
    head: dict[str, Any],
    resolution_s: int,
    now: datetime,
    stale_after: timedelta,
) -> Document:
    lang = request.lang
    if request.kind == "register":
        assert request.as_of is not None
        table = build_register(
            session,
            RegisterQuery(
                as_of=request.as_of,
                period=request.period,
                site=request.site,
                state=request.state,
                model=request.model,
            ),
            resolution_s,
        )
        return Document("register", lang, [table], totals=register_totals(table))
    if request.kind == "compliance":
        assert request.period is not None
        report = build_compliance(
            session,
            ComplianceQuery(
                request.period, request.site, request.repeat_threshold, now, stale_after
            ),
            lang,
        )
        tables = [report.sites, report.machines, report.incidents]
        return Document("compliance", lang, tables, totals=report.totals)
    table = audit_export.audit_table(session, head)
    totals: list[tuple[str, Any]] = [("total.entries", len(table.rows))]
    return Document("audit", lang, [table], totals=totals)


def _cover(
    request: ExportRequest,
    actor: Actor,
    generated_at: datetime,
    head: dict[str, Any],
    document: Document,
    key: SigningKey,
) -> list[tuple[str, str]]:
    from controller.exports.manifest import fingerprint

    lang = request.lang
    cover = [("cover.site", request.site or label("cover.all_sites", lang))]
    if request.as_of is not None:
        cover.append(("cover.as_of", utc_text(request.as_of)))
    if request.period is not None:
        cover.append(
            ("cover.period", f"{utc_text(request.period[0])} – {utc_text(request.period[1])}")
        )
        if request.kind == "compliance" and request.period[1] > generated_at:
            cover.append(("cover.counted_until", utc_text(generated_at)))
    filters = [
        f"{label(k, lang)}: {v}"
        for k, v in (
            ("lifecycle_state", request.state.value if request.state else None),
            ("model", request.model),
        )
        if v
    ]
    if filters:
        cover.append(("cover.filters", "; ".join(filters)))
    cover.append(("cover.generated_at", utc_text(generated_at)))
    cover.append(("cover.generated_by", f"{actor.name} ({actor.source})"))
    cover.append(
        ("cover.rows", "; ".join(f"{label(t.sheet, lang)}: {len(t.rows)}" for t in document.tables))
    )
    cover.append(("cover.chain_head", f"#{head['seq']} {head['hash']}"))
    cover.append(("cover.key", fingerprint(key.public_key_b64())))
    return cover


def _write(
    fmt: str, document: Document, out: Path, session: Session, head: dict[str, Any], lang: Lang
) -> None:
    stem = "compliance" if document.kind == "compliance" else document.tables[0].name
    if fmt == "csv":
        for table in document.tables:
            csv_writer.write_csv(table, lang, out / f"{table.name}.csv")
    elif fmt == "xlsx":
        xlsx_writer.write_xlsx(document, out / f"{stem}.xlsx")
    elif fmt == "pdf":
        pdf_writer.write_pdf(document, out / f"{stem}.pdf")
    elif fmt == "json":
        audit_export.write_json(session, head, out / audit_export.JSON_NAME, lang)
    else:  # pragma: no cover - rejected by ExportRequest.problems
        raise ExportError(f"unknown format {fmt}")
