"""The signed manifest of an export, and its offline verification.

``manifest.json`` lists every file of the export with its SHA-256 and size, says what was
asked (kind, filters, as-of, period, formats, language), who asked and when, how many rows
each table has and the audit-log chain head at that moment, and carries the controller's
Ed25519 public key and a signature over all of that. The signature covers the canonical
JSON (sorted keys, no spaces, UTF-8) of the manifest without its ``signature`` field.

:func:`verify_export` needs nothing but the folder (or zip) and, ideally, the controller's
public key obtained separately: with the embedded key alone it proves only that the files
are unchanged since *someone holding that key* signed them.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import stat
import zipfile
import zlib
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from controller.signing import SigningKey, verify

MANIFEST = "manifest.json"
FORMAT = "asicfleet-export/1"
_CHUNK = 1 << 20


def sha256_file(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def canonical(body: dict[str, Any]) -> bytes:
    """What is signed: the manifest without ``signature``, as canonical JSON."""
    unsigned = {k: v for k, v in body.items() if k != "signature"}
    return json.dumps(unsigned, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def fingerprint(public_key_b64: str) -> str:
    """``sha256:<hex>`` of the raw 32-byte public key."""
    return "sha256:" + hashlib.sha256(base64.b64decode(public_key_b64)).hexdigest()


def sign_manifest(body: dict[str, Any], key: SigningKey) -> dict[str, Any]:
    """``body`` with the key, its fingerprint and the signature added."""
    public = key.public_key_b64()
    signed = {
        **body,
        "format": FORMAT,
        "public_key": public,
        "key_fingerprint": fingerprint(public),
    }
    signed["signature"] = key.sign(canonical(signed))
    return signed


def write_manifest(folder: Path, body: dict[str, Any], key: SigningKey) -> dict[str, Any]:
    """Hash every file already in ``folder``, sign, and write ``manifest.json``."""
    files = []
    for path in sorted(p for p in folder.iterdir() if p.is_file() and p.name != MANIFEST):
        digest, size = sha256_file(path)
        files.append({"name": path.name, "sha256": digest, "bytes": size})
    signed = sign_manifest({**body, "files": files}, key)
    text = json.dumps(signed, indent=2, sort_keys=True, ensure_ascii=False)
    (folder / MANIFEST).write_text(text + "\n", encoding="utf-8")
    return signed


# --- verification ------------------------------------------------------------------------------


@dataclass
class Verification:
    """What was checked and what failed; ``ok`` only when nothing failed."""

    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    manifest: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return not self.problems


class UsageError(ValueError):
    """The path or key file given cannot be used at all (exit 2, not a failed verification)."""


def load_public_key(path: Path) -> str:
    """A public key file as raw base64: PEM (SubjectPublicKeyInfo) or the bare base64 text."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"public key {path}: {exc.strerror}") from None
    text = data.decode("ascii", errors="replace").strip()
    if "BEGIN" in text:
        try:
            key = serialization.load_pem_public_key(data)
        except ValueError as exc:
            raise UsageError(f"public key {path}: not a PEM public key ({exc})") from None
        if not isinstance(key, Ed25519PublicKey):
            raise UsageError(f"public key {path}: not an Ed25519 key")
        raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return base64.b64encode(raw).decode()
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise UsageError(f"public key {path}: neither PEM nor base64") from None
    if len(raw) != 32:
        raise UsageError(f"public key {path}: expected 32 bytes of Ed25519 key, got {len(raw)}")
    return text


class _Source:
    """A folder or a zip, read the same way.

    Anything that is not a plain file directly in the export is refused while listing it
    (``problems``): a symbolic link (it could point anywhere), a sub-folder, a zip entry
    outside the export's folder, a name that appears twice in a zip (unzip tools disagree on
    which copy they show: a tampered copy before the original would be checked as the
    original), and paths that climb out (``..``), are absolute or use backslashes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.problems: list[str] = []
        self._zip: zipfile.ZipFile | None = None
        self._names: set[str] = set()
        if path.is_symlink():
            raise UsageError(f"{path}: a symbolic link; give the export folder or zip itself")
        if path.is_dir():
            self._list_folder()
            return
        if not path.exists():
            raise UsageError(f"{path}: no such file or folder")
        if not zipfile.is_zipfile(path):
            raise UsageError(f"{path}: neither a folder nor a zip file")
        self._zip = zipfile.ZipFile(path)
        self._prefix = _zip_prefix(self._zip)
        self._list_zip(self._zip)

    def _list_folder(self) -> None:
        for entry in sorted(os.scandir(self.path), key=lambda e: e.name):
            if entry.is_symlink():
                self.problems.append(
                    f"{entry.name}: a symbolic link, refused (it could point outside the export)"
                )
            elif entry.is_dir(follow_symlinks=False):
                self.problems.append(
                    f"{entry.name}/: a folder inside the export, not in the manifest"
                )
            elif not entry.is_file(follow_symlinks=False):
                self.problems.append(f"{entry.name}: not a regular file, refused")
            else:
                self._names.add(entry.name)

    def _list_zip(self, archive: zipfile.ZipFile) -> None:
        counts = Counter(info.filename for info in archive.infolist())
        for name, count in sorted(counts.items()):
            if count > 1:
                self.problems.append(
                    f"{name}: {count} entries of this name in the zip, refused (which one a "
                    "tool shows differs: one of them may be a tampered copy)"
                )
        for info in archive.infolist():
            name = info.filename
            trick = _path_trick(name)
            if trick:
                self.problems.append(f"{name}: {trick}, refused")
                continue
            if stat.S_ISLNK(info.external_attr >> 16):
                self.problems.append(f"{name}: a symbolic link in the zip, refused")
                continue
            if name.endswith("/"):
                if name != self._prefix:
                    self.problems.append(f"{name}: a folder that is not the export's, refused")
                continue
            if not name.startswith(self._prefix) or "/" in name[len(self._prefix) :]:
                self.problems.append(
                    f"{name}: outside the export folder, not in the manifest (added after signing)"
                )
                continue
            self._names.add(name[len(self._prefix) :])

    def names(self) -> set[str]:
        return set(self._names)

    @contextmanager
    def open(self, name: str) -> Iterator[IO[bytes]]:
        if self._zip is None:
            with (self.path / name).open("rb") as handle:
                yield handle
        else:
            with self._zip.open(self._prefix + name) as handle:
                yield handle

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()


def _path_trick(name: str) -> str | None:
    """Why a zip entry's name is unsafe to extract, if it is."""
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        return "an absolute path"
    if "\\" in name:
        return "a backslash in the path"
    if ".." in name.split("/"):
        return "a path that climbs out (..)"
    if "\0" in name:
        return "a NUL in the path"
    return None


def _zip_prefix(archive: zipfile.ZipFile) -> str:
    """Files may sit at the root of the zip or in one top-level folder (the folder of the
    shallowest ``manifest.json``)."""
    candidates = [
        name[: -len(MANIFEST)]
        for name in archive.namelist()
        if (name == MANIFEST or name.endswith("/" + MANIFEST)) and _path_trick(name) is None
    ]
    if not candidates:
        return ""
    return min(candidates, key=lambda prefix: (prefix.count("/"), prefix))


UNREADABLE = (zipfile.BadZipFile, zlib.error, EOFError, OSError)
"""What a damaged zip or file raises while being read: a failed check, not a crash."""


def verify_export(path: Path, public_key_b64: str | None = None) -> Verification:
    """Check signature, key, every file's hash and size, that no file is missing or extra,
    and that the folder or zip holds nothing but plain files (see :class:`_Source`)."""
    try:
        source = _Source(path)
    except UNREADABLE as exc:
        failed = Verification()
        failed.problems.append(f"{path}: unreadable export ({type(exc).__name__}: {exc})")
        return failed
    try:
        return _verify(source, public_key_b64)
    except UNREADABLE as exc:
        failed = Verification()
        failed.problems.append(f"{path}: unreadable ({type(exc).__name__}: {exc})")
        return failed
    finally:
        source.close()


def _verify(source: _Source, pinned: str | None) -> Verification:
    result = Verification()
    result.problems.extend(source.problems)
    names = source.names()
    if MANIFEST not in names:
        result.problems.append(f"{MANIFEST} is missing: nothing says what this export holds")
        return result
    with source.open(MANIFEST) as handle:
        raw = handle.read()
    try:
        manifest = json.loads(raw.decode("utf-8"))
        if not isinstance(manifest, dict):
            raise ValueError("not an object")
    except (UnicodeDecodeError, ValueError) as exc:
        result.problems.append(f"{MANIFEST} is not valid JSON ({exc})")
        return result
    result.manifest = manifest
    if manifest.get("format") != FORMAT:
        result.problems.append(f"{MANIFEST}: unknown format {manifest.get('format')!r}")
        return result
    embedded = str(manifest.get("public_key", ""))
    signature = str(manifest.get("signature", ""))
    if pinned is not None:
        if embedded != pinned:
            result.problems.append(
                f"{MANIFEST} was signed with key {manifest.get('key_fingerprint')}, "
                f"not with the given public key ({fingerprint(pinned)})"
            )
        key = pinned
    else:
        key = embedded
        result.notes.append(
            f"no --public-key given: checked against the key embedded in the manifest "
            f"({manifest.get('key_fingerprint')}); this proves the files are unchanged since "
            "they were signed with that key, not that the key is your controller's"
        )
    try:
        key_ok = bool(key) and fingerprint(key) == manifest.get("key_fingerprint", fingerprint(key))
    except (binascii.Error, ValueError):
        key_ok = False
    if not key_ok:
        result.problems.append(f"{MANIFEST}: key_fingerprint does not match the public key")
    if not verify(key, canonical(manifest), signature):
        result.problems.append(
            f"{MANIFEST}: signature does not match its content: the manifest was altered "
            "or signed with another key"
        )
    listed = manifest.get("files")
    if not isinstance(listed, list):
        result.problems.append(f"{MANIFEST}: no file list")
        return result
    seen: set[str] = set()
    for entry in listed:
        name = str(entry.get("name", "")) if isinstance(entry, dict) else ""
        if not name or "/" in name or "\\" in name or name.startswith("."):
            result.problems.append(f"{MANIFEST}: bad file entry {entry!r}")
            continue
        seen.add(name)
        if name not in names:
            result.problems.append(f"{name}: missing (listed in the manifest)")
            continue
        digest = hashlib.sha256()
        size = 0
        try:
            with source.open(name) as handle:
                while chunk := handle.read(_CHUNK):
                    digest.update(chunk)
                    size += len(chunk)
        except UNREADABLE as exc:
            result.problems.append(f"{name}: unreadable ({type(exc).__name__}: {exc})")
            continue
        if digest.hexdigest() != entry.get("sha256") or size != entry.get("bytes"):
            result.problems.append(
                f"{name}: content changed (SHA-256 {digest.hexdigest()}, {size} bytes; "
                f"manifest says {entry.get('sha256')}, {entry.get('bytes')} bytes)"
            )
    for extra in sorted(names - seen - {MANIFEST}):
        result.problems.append(f"{extra}: not listed in the manifest (added after signing)")
    request = manifest.get("request")
    kind = request.get("kind") if isinstance(request, dict) else None
    if kind == "audit" and "audit_log.json" in names and "audit_log.json" in seen:
        with source.open("audit_log.json") as handle:
            problem = _check_audit_chain(handle, manifest)
        if problem:
            result.problems.append(problem)
    return result


def _check_audit_chain(handle: IO[bytes], manifest: dict[str, Any]) -> str | None:
    """Recompute the exported audit chain and compare its head with the manifest's."""
    from controller.exports.audit_export import verify_chain_file

    return verify_chain_file(handle, manifest.get("audit_chain_head") or {})
