"""Checkpoints that cannot be corrupted: flushed atomic writes and a signed record of their files.

Resumable state (select's greedy state, training checkpoints) is loaded only after
a check against a **record** that the run wrote when it saved the state::

    {"files": {"<path relative to the checkpoint>": "<sha256>", ...},
     "meta": {... what the state is: step, run, rank, ...},
     "mac": "<HMAC-SHA256 of files + meta under the checkpoint key>"}

A file that is missing, zero-length, truncated or altered fails its sha256; a
record that was edited, written by hand, or comes from another user's or
machine's mixray fails its MAC. Either way :func:`check_files` / :func:`read_record`
raise :class:`CheckpointError` with a one-line reason, the caller logs it and falls
back to an older checkpoint or starts over. Nothing of a checkpoint is opened
(let alone unpickled, as DeepSpeed's ``load_checkpoint`` does) before it passes.

The **checkpoint key** is 32 random bytes in ``$MIXRAY_CACHE/checkpoint.key``
(default ``~/.cache/mixray``), created on first use with mode 0600. Trust
boundary: mixray trusts its cache directory (it already holds the models it
loads) and not the run directory: someone who can write the run directory can
delete or spoil checkpoints (the run then starts over) but cannot make mixray
load a file that the key's owner did not save. A run directory moved to another
machine or user resumes only if the key goes with it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from pathlib import Path
from typing import Any

from mixray.errors import ResourceError
from mixray.io.rundir import file_sha256

KEY_FILE = "checkpoint.key"
_KEY_BYTES = 32


class CheckpointError(Exception):
    """A checkpoint that must not be loaded; the message says why, in one line."""


# ----------------------------------------------------------------------------- flushed writes

def fsync_path(path: Path) -> None:
    """Flush a file or a directory entry list to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``path`` all or nothing: a flushed temp file (``.<name>.tmp-<pid>``, which the
    stage runner removes if a kill leaves it), renamed into place, directory flushed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


# ----------------------------------------------------------------------------- the key

def key_path() -> Path:
    from mixray.models.registry import cache_dir

    return cache_dir() / KEY_FILE


def checkpoint_key(path: Path | None = None) -> bytes:
    """The checkpoint key, created once (first writer wins when several processes race).

    A key file that others may write, or that another user owns, is a ResourceError:
    whoever can replace it could make mixray load their files.
    """
    path = path or key_path()
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp-{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(_KEY_BYTES))
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # fails if another process made it first: keep theirs
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    st = path.stat()
    if st.st_uid != os.getuid() or st.st_mode & 0o002:
        raise ResourceError(f"the checkpoint key {path} is owned by another user or writable by "
                            "others, so checkpoints signed with it prove nothing; allowed: a file "
                            f"you own that others cannot write (chmod 600 {path})", where=str(path))
    key = path.read_bytes()
    if len(key) != _KEY_BYTES:
        raise ResourceError(f"the checkpoint key {path} holds {len(key)} bytes, not {_KEY_BYTES}; "
                            "delete it (a new one is made; existing checkpoints start over)",
                            where=str(path))
    return key


# ----------------------------------------------------------------------------- records

def _mac(files: dict[str, str], meta: dict[str, Any], key: bytes) -> str:
    payload = json.dumps({"files": files, "meta": meta}, sort_keys=True, separators=(",", ":"))
    return hmac.new(key, payload.encode(), hashlib.sha256).hexdigest()


def hash_files(root: Path, names: list[str] | None = None) -> dict[str, str]:
    """``{relative path: sha256}`` of ``names`` (default: every file under ``root``)."""
    if names is None:
        names = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    return {n: file_sha256(root / n) for n in names}


def make_record(files: dict[str, str], meta: dict[str, Any], key: bytes) -> dict[str, Any]:
    return {"files": files, "meta": meta, "mac": _mac(files, meta, key)}


def write_record(path: Path, files: dict[str, str], meta: dict[str, Any], key: bytes) -> None:
    """Sign and write a record atomically (flushed)."""
    data = json.dumps(make_record(files, meta, key), indent=1, sort_keys=True)
    atomic_write_bytes(path, data.encode())


def check_record(record: Any, key: bytes, where: str) -> dict[str, Any]:
    """``record`` if it is well formed and its MAC verifies under ``key``, else CheckpointError."""
    if (not isinstance(record, dict) or not isinstance(record.get("files"), dict)
            or not isinstance(record.get("meta"), dict) or not isinstance(record.get("mac"), str)):
        raise CheckpointError(f"{where}: not a checkpoint record")
    if not hmac.compare_digest(record["mac"], _mac(record["files"], record["meta"], key)):
        raise CheckpointError(f"{where}: its signature does not verify (altered, or written by "
                              "another mixray key: another user or machine)")
    return record


def read_record(path: Path, key: bytes) -> dict[str, Any]:
    """The verified record at ``path``; CheckpointError when missing, unreadable or forged."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint record")
    try:
        record = json.loads(path.read_bytes())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable checkpoint record ({e})") from None
    return check_record(record, key, str(path))


def check_files(root: Path, files: dict[str, str], full: bool = True) -> None:
    """Every recorded file exists with its recorded sha256 (``full=False``: exists only)."""
    for name, digest in files.items():
        p = root / name
        if ".." in Path(name).parts or Path(name).is_absolute():
            raise CheckpointError(f"{root}: the record names {name!r}, outside the checkpoint")
        if not p.is_file():
            raise CheckpointError(f"{p}: missing")
        if p.stat().st_size == 0 and digest != hashlib.sha256(b"").hexdigest():
            raise CheckpointError(f"{p}: zero-length")
        if full and file_sha256(p) != digest:
            raise CheckpointError(f"{p}: its sha256 differs from the recorded one (truncated or "
                                  "altered)")
