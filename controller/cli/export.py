"""``asicfleet controller export …``: the register, the compliance report and the audit log,
written into a new folder with a signed manifest (and optionally zipped).

``asicfleet verify-export`` (in :mod:`asicfleet.cli`) checks such a folder offline.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated

import typer

from controller import timefmt
from controller.cli.context import context, fail
from controller.cli.identity import AsOpt, StdinOpt, acting_user
from controller.db import session_scope
from controller.errors import ControllerError, NotFound
from controller.exports.compliance_report import DEFAULT_REPEAT_THRESHOLD
from controller.exports.i18n import LANGS, Lang
from controller.exports.manifest import UsageError, load_public_key, verify_export
from controller.exports.service import (
    ExportError,
    ExportRequest,
    ExportResult,
    run_export,
    zip_folder,
)
from controller.models import LifecycleState
from controller.signing import load_or_create


def parse_formats(text: str) -> tuple[str, ...]:
    formats = tuple(dict.fromkeys(f.strip().lower() for f in text.split(",") if f.strip()))
    if not formats:
        raise ValueError("--format needs at least one format")
    return formats


def parse_lang(text: str) -> Lang:
    for lang in LANGS:
        if text == lang:
            return lang
    raise ValueError(f"--lang {text!r}: choose {' or '.join(LANGS)}")


def _run(
    ctx: typer.Context,
    request: ExportRequest,
    out: Path,
    make_zip: bool,
    who: tuple[str, bool],
) -> None:
    problems = request.problems()
    if problems:
        fail("; ".join(problems), code=2)
    actor = acting_user(ctx, *who, route=("POST", "/exports"), doing="exporting evidence")
    cli = context(ctx)
    settings = cli.settings()
    engine = cli.engine()
    try:
        key = load_or_create(settings.data_dir)
        with session_scope(engine) as session:
            result = run_export(
                session,
                request,
                out,
                key,
                actor,
                resolution_s=settings.history_resolution_s,
                stale_after=timedelta(minutes=settings.missing_after_minutes),
            )
    except (ExportError, NotFound) as exc:  # the request cannot be met as given
        fail(str(exc), code=2)
    except ControllerError as exc:
        fail(str(exc))
    _report(result)
    if make_zip:
        target = zip_folder(out, out.with_name(out.name + ".zip"))
        typer.echo(f"zip: {target}")


def _report(result: ExportResult) -> None:
    rows = ", ".join(f"{name} {count}" for name, count in result.rows.items())
    typer.echo(f"export written to {result.folder} ({rows} rows)")
    for entry in result.manifest["files"]:
        typer.echo(f"  {entry['name']}  {entry['bytes']} bytes  sha256 {entry['sha256']}")
    typer.echo(f"  manifest.json  sha256 {result.manifest_sha256}")
    typer.echo(f"signed with key {result.manifest['key_fingerprint']}")
    for note in result.notes:
        typer.echo(f"note: {note}", err=True)


FormatOpt = Annotated[str, typer.Option("--format", help="Comma-separated: csv,xlsx,pdf.")]
LangOpt = Annotated[str, typer.Option("--lang", help="Headers and labels: en or ru.")]
OutOpt = Annotated[Path, typer.Option("--out", help="A new (or empty) folder for the export.")]
SiteOpt = Annotated[str | None, typer.Option("--site", help="Only this site.")]
ZipOpt = Annotated[bool, typer.Option("--zip", help="Also write OUT.zip beside the folder.")]
# every export is made by a named controller user (compliance or inspector), as by the API


def register(app: typer.Typer) -> None:
    """Add the ``export`` group to the `asicfleet controller` group."""
    group = typer.Typer(
        help=f"Signed compliance exports: register, compliance report, audit log. {timefmt.HELP}",
        no_args_is_help=True,
    )
    app.add_typer(group, name="export")

    @group.command("register")
    def register_(
        ctx: typer.Context,
        as_of: Annotated[
            str,
            typer.Option("--as-of", help="e.g. 2026-11-01T00:00Z or now (see Times and periods)"),
        ],
        out: OutOpt,
        period: Annotated[
            str | None,
            typer.Option(
                "--period",
                help="FROM..TO (TO excluded) for measured averages and operating hours.",
            ),
        ] = None,
        formats: FormatOpt = "csv,xlsx,pdf",
        lang: LangOpt = "en",
        site: SiteOpt = None,
        state: Annotated[
            str | None, typer.Option("--state", help="Only machines in this lifecycle state.")
        ] = None,
        model: Annotated[str | None, typer.Option("--model", help="Only this model.")] = None,
        make_zip: ZipOpt = False,
        as_user: AsOpt = "",
        password_stdin: StdinOpt = False,
    ) -> None:
        """The machine register as it stood at --as-of, rebuilt from history."""
        now = datetime.now(UTC)
        try:
            request = ExportRequest(
                kind="register",
                formats=parse_formats(formats),
                lang=parse_lang(lang),
                as_of=timefmt.parse_instant(as_of, "--as-of", now=now),
                period=timefmt.parse_period(period, "--period", now=now) if period else None,
                site=site,
                state=_state(state),
                model=model,
            )
        except ValueError as exc:
            fail(str(exc), code=2)
        _run(ctx, request, out, make_zip, (as_user, password_stdin))

    @group.command("compliance")
    def compliance(
        ctx: typer.Context,
        period: Annotated[
            str,
            typer.Option(
                "--period",
                help="FROM..TO, TO excluded: 2026-10-01..2026-11-01 is October "
                "(docs/controller.md, Times and periods).",
            ),
        ],
        out: OutOpt,
        formats: FormatOpt = "csv,xlsx,pdf",
        lang: LangOpt = "en",
        site: SiteOpt = None,
        repeat_threshold: Annotated[
            int,
            typer.Option(
                "--repeat-threshold",
                help="Incidents within the period that make a repeat offender (the controller's "
                "live flag uses the same count within 24 h).",
            ),
        ] = DEFAULT_REPEAT_THRESHOLD,
        make_zip: ZipOpt = False,
        as_user: AsOpt = "",
        password_stdin: StdinOpt = False,
    ) -> None:
        """Pool compliance per machine, per site and for the fleet over --period."""
        try:
            request = ExportRequest(
                kind="compliance",
                formats=parse_formats(formats),
                lang=parse_lang(lang),
                period=timefmt.parse_period(period, "--period", now=datetime.now(UTC)),
                site=site,
                repeat_threshold=repeat_threshold,
            )
        except ValueError as exc:
            fail(str(exc), code=2)
        _run(ctx, request, out, make_zip, (as_user, password_stdin))

    @group.command("audit")
    def audit_(
        ctx: typer.Context,
        out: OutOpt,
        formats: Annotated[str, typer.Option("--format", help="csv,json")] = "csv,json",
        make_zip: ZipOpt = False,
        as_user: AsOpt = "",
        password_stdin: StdinOpt = False,
    ) -> None:
        """The whole audit log with its hash chain (verify-export recomputes the chain)."""
        try:
            request = ExportRequest(kind="audit", formats=parse_formats(formats))
        except ValueError as exc:
            fail(str(exc), code=2)
        _run(ctx, request, out, make_zip, (as_user, password_stdin))

    @group.command("public-key")
    def public_key(ctx: typer.Context) -> None:
        """Print the controller's public key (PEM) to hand to whoever verifies exports."""
        from cryptography.hazmat.primitives import serialization

        try:
            key = load_or_create(context(ctx).settings().data_dir)
        except ControllerError as exc:
            fail(str(exc))
        pem = key.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        typer.echo(pem.decode().rstrip())


def _state(text: str | None) -> LifecycleState | None:
    if text is None:
        return None
    try:
        return LifecycleState(text.strip().lower())
    except ValueError:
        options = ", ".join(s.value for s in LifecycleState)
        raise ValueError(f"--state {text!r}: choose one of {options}") from None


def verify_export_command(
    path: Annotated[Path, typer.Argument(help="An export folder or its zip.")],
    public_key: Annotated[
        Path | None,
        typer.Option(
            "--public-key",
            help="The controller's public key (PEM or base64), obtained separately.",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Check an export offline: signature, key, every file's SHA-256, nothing missing or added.

    Exit 0 when it is intact, 1 when verification fails (each failure named), 2 when the
    path or key file cannot be used.
    """
    import json

    try:
        pinned = load_public_key(public_key) if public_key is not None else None
        result = verify_export(path, pinned)
    except UsageError as exc:
        fail(str(exc), code=2)
    if as_json:
        manifest = result.manifest or {}
        request = manifest.get("request")
        listed = manifest.get("files")
        typer.echo(
            json.dumps(
                {
                    "ok": result.ok,
                    "problems": result.problems,
                    "notes": result.notes,
                    "kind": request.get("kind") if isinstance(request, dict) else None,
                    "key_fingerprint": manifest.get("key_fingerprint"),
                    "files": [f.get("name") for f in listed if isinstance(f, dict)]
                    if isinstance(listed, list)
                    else [],
                },
                indent=2,
            )
        )
    else:
        for note in result.notes:
            typer.echo(f"note: {note}", err=True)
        if result.ok:
            manifest = result.manifest or {}
            listed = manifest.get("files")
            files = len(listed) if isinstance(listed, list) else 0
            typer.echo(
                f"export intact: {files} file(s) match the manifest, signature valid "
                f"(key {manifest.get('key_fingerprint')})"
            )
        else:
            for problem in result.problems:
                typer.echo(f"FAILED: {problem}", err=True)
    if not result.ok:
        raise typer.Exit(1)
