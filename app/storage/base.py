"""The storage interface that the local-directory and S3 backends share."""

from __future__ import annotations

import fnmatch
import hashlib
import os
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Protocol

# Segments start with a letter or digit: no "..", no hidden names (the local backend
# keeps its spool in ".tmp" under the same root), no empty segments or leading slash.
_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)*")
_HASH_CHUNK = 1 << 20


class StorageError(Exception):
    """Storage is unreachable or unwritable, or an operation on it failed."""


class ObjectNotFoundError(StorageError):
    """No object is stored under the key."""


@dataclass(frozen=True)
class StoredObject:
    """A stored object ready to stream: iterate `chunks` once, to the end or not."""

    key: str
    size: int
    content_type: str
    chunks: AsyncIterator[bytes]


class Storage(Protocol):
    """Durable storage for finished images, addressed by keys like ``2025/01/31/<id>.png``."""

    @property
    def spool_dir(self) -> Path:
        """A local directory (created on access) for download files awaiting `put_file`."""
        ...

    async def put_file(
        self,
        key: str,
        source: Path,
        *,
        content_type: str,
        sha256: str,
        hashed_on_write: bool = False,
    ) -> None:
        """Store `source` under `key` atomically and remove `source`.

        StorageError if `source` does not hash to `sha256`. `hashed_on_write`: the
        caller hashed the very bytes it wrote to `source` and fsynced it, so the file
        is not read back to hash again. Storing the same bytes again is a no-op; a
        reader never sees a partial object under `key`.
        """
        ...

    async def exists(self, key: str) -> bool:
        """Whether an object is stored under `key`."""
        ...

    async def open(self, key: str) -> StoredObject:
        """The object under `key`, for streaming; ObjectNotFoundError if there is none."""
        ...

    async def presigned_url(self, key: str, expires_in: int) -> str | None:
        """A time-limited GET URL for the object, or None when the backend has none."""
        ...

    async def check(self) -> None:
        """Raise StorageError unless the storage is reachable and writable now."""
        ...

    async def cleanup_spool(self, older_than_seconds: float) -> int:
        """Remove spool files older than this (left by a crash); return how many."""
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...


def validate_key(key: str) -> str:
    """Return `key` if it is a safe relative object key, else raise ValueError."""
    if len(key) > 512 or not _KEY.fullmatch(key):
        raise ValueError(f"invalid storage key {key!r}")
    return key


def image_key(task_id: str, day: date, extension: str) -> str:
    """The key for a task's image: ``yyyy/mm/dd/<task id>.<ext>`` (day in UTC)."""
    return validate_key(f"{day:%Y/%m/%d}/{task_id}.{extension.lstrip('.')}")


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in bounded chunks (blocking)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def remove_stale_files(directory: Path, older_than_seconds: float, pattern: str = "*") -> int:
    """Delete regular files in `directory` whose names match `pattern` and that were
    not modified for this long (blocking)."""
    cutoff = time.time() - older_than_seconds
    removed = 0
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return 0
    for entry in entries:
        if not fnmatch.fnmatchcase(entry.name, pattern):
            continue
        try:
            if entry.is_file(follow_symlinks=False) and entry.stat().st_mtime < cutoff:
                os.unlink(entry.path)
                removed += 1
        except FileNotFoundError:  # another process cleaned it first
            continue
    return removed
