"""Crash-safe file writing: write under a temporary name, fsync, rename; readers never see half a file."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any


def fsync_dir(path: Path) -> None:
    """Persist a directory's entries (a rename is only durable once its directory is synced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    for directory, _, names in os.walk(root):
        for name in names:
            fd = os.open(Path(directory) / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(directory))


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(temporary, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)
    fsync_dir(path.parent)


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def temporary_dir_for(final: Path) -> Path:
    """A fresh sibling of `final` whose name marks it as unfinished (.tmp-*), to fill and then publish."""
    temporary = final.with_name(f".tmp-{final.name}-{uuid.uuid4().hex[:8]}")
    temporary.mkdir(parents=True)
    return temporary


def publish_dir(temporary: Path, final: Path) -> None:
    """fsync a filled temporary directory and rename it to `final`, replacing any old one."""
    fsync_tree(temporary)
    if final.exists():
        remove_dir(final)
    os.rename(temporary, final)
    fsync_dir(final.parent)


def remove_dir(path: Path) -> None:
    """Delete a directory by first renaming it away, so no half-deleted copy keeps its real name."""
    doomed = path.with_name(f".trash-{path.name}-{uuid.uuid4().hex[:8]}")
    os.rename(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def check_writable(directory: Path) -> None:
    """Create `directory` if needed and write, sync and delete a file in it; raise OSError if it cannot (a
    PermissionError's strerror says which folder, its owner and this uid: see permission_denied)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-test-{uuid.uuid4().hex[:8]}"
        with open(probe, "w") as f:
            f.write("ok")
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except PermissionError as e:
        where = Path(e.filename) if e.filename else directory
        raise PermissionError(e.errno, permission_denied(_nearest_existing(where)), str(where)) from e


# --- files the workers' uid may not read or write -------------------------------------------------------
# On a claim written by another uid, or NFS that ignores fsGroup, a file that exists but cannot be read
# surfaces from the libraries as "No such file or directory" or a bare errno: say what it is instead.


def permission_denied(path: Path) -> str:
    """'permission denied for uid U: PATH (owner uid O, gid G, mode 0MMM)'."""
    try:
        info = path.stat()
        owner = f"owner uid {info.st_uid}, gid {info.st_gid}, mode {info.st_mode & 0o7777:04o}"
    except OSError:
        owner = "owner unknown"
    return f"permission denied for uid {os.getuid()} (groups {sorted(set(os.getgroups()))}): {path} ({owner})"


def _nearest_existing(path: Path) -> Path:
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def unreadable(path: Path) -> str | None:
    """permission_denied for the first folder on the way to `path`, or `path`, or (a folder) anything under
    it, that this process cannot read; None when all of it is readable or `path` does not exist."""
    path = Path(os.path.abspath(path))
    for parent in reversed(path.parents):
        if os.path.isdir(parent) and not os.access(parent, os.X_OK):
            return permission_denied(parent)
    if not os.path.exists(path):
        return None
    if not os.path.isdir(path):
        return None if os.access(path, os.R_OK) else permission_denied(path)
    if not os.access(path, os.R_OK | os.X_OK):
        return permission_denied(path)
    for root, folders, names in os.walk(path):
        for name in folders:
            if not os.access(os.path.join(root, name), os.R_OK | os.X_OK):
                return permission_denied(Path(root, name))
        for name in names:
            if not os.access(os.path.join(root, name), os.R_OK):
                return permission_denied(Path(root, name))
    return None


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
