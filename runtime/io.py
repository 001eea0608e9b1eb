"""Writing results: check an output path before the work, then write the file atomically (JSON, JSONL, NPZ
or text), so an interrupted or failed command leaves the old file or none, never half of one."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from .errors import UnskillError


def sha256_file(path: str | Path) -> str:
    """"sha256:<hex>" of a file's bytes, read in 4 MiB blocks: model fingerprints and the stats files a guarded
    graph records."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return "sha256:" + digest.hexdigest()


def check_output_path(path: str, flag: str = "--output") -> None:
    """Fail before any work when the output could not be written: a directory, a read-only file or folder."""
    target = Path(path)
    if target.is_dir():
        raise UnskillError(f"{flag} {path}: is a directory, expected a file path")
    if target.exists() and not os.access(target, os.W_OK):
        raise UnskillError(f"{flag} {path}: the file is read-only")
    parent = next((p for p in [target.parent, *target.parent.parents] if p.exists()), Path("."))
    if not parent.is_dir():
        raise UnskillError(f"{flag} {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UnskillError(f"{flag} {path}: cannot write in {parent} (permission denied)")
    try:   # os.access says yes to root everywhere (/sys, /proc, read-only mounts): try a nameless file there
        tempfile.TemporaryFile(dir=parent).close()
    except OSError as exc:
        raise UnskillError(f"{flag} {path}: cannot write in {parent} ({exc.strerror or exc})") from None


def write_text_atomic(path: str, text: str) -> None:
    """The output file appears complete or not at all; no temporary file stays behind."""
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(prefix=".unskill-", dir=target.parent)
    except OSError as exc:
        raise UnskillError(f"{path}: cannot write it ({exc.strerror or exc})") from None
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
        os.chmod(tmp, 0o644)   # mkstemp makes it private; results are ordinary files
        os.replace(tmp, target)
    except OSError as exc:
        raise UnskillError(f"{path}: cannot write it ({exc.strerror or exc})") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_npz_atomic(path: str | Path, arrays: dict) -> None:
    """np.savez of `arrays` that appears complete or not at all (a crash leaves no half-written file behind)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=".unskill-", suffix=".npz", dir=target.parent)
    os.close(handle)
    try:
        np.savez(tmp, **arrays)
        os.chmod(tmp, 0o644)   # mkstemp makes it private; results are ordinary files
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_jsonl(path: str, records: list[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))


def write_json(path: str, document: dict) -> None:
    write_text_atomic(path, json.dumps(document, ensure_ascii=False, indent=1) + "\n")
