"""A directory on a local (or mounted) filesystem as storage.

Objects live at ``<root>/<key>``; download files are spooled in ``<root>/.tmp`` on the
same filesystem, so storing one is a single atomic ``os.replace``. The file and the
directories are fsynced, so a crash never leaves a partial or vanished object.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import anyio

from app.images import kind_for_extension
from app.storage.base import (
    ObjectNotFoundError,
    StorageError,
    StoredObject,
    file_sha256,
    remove_stale_files,
    validate_key,
)

_READ_CHUNK = 256 * 1024


def _fsync_path(path: Path, flags: int = os.O_RDONLY) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _content_type(key: str) -> str:
    kind = kind_for_extension(Path(key).suffix)
    return kind.content_type if kind else "application/octet-stream"


class LocalStorage:
    """Images in a local directory."""

    def __init__(self, root: Path) -> None:
        self.root = root.absolute()
        self._spool = self.root / ".tmp"

    def __repr__(self) -> str:
        return f"LocalStorage({str(self.root)!r})"

    @property
    def spool_dir(self) -> Path:
        """``<root>/.tmp``, created on access."""
        self._spool.mkdir(parents=True, exist_ok=True)
        return self._spool

    def _path(self, key: str) -> Path:
        return self.root / validate_key(key)

    def _ensure_dir(self, directory: Path) -> None:
        missing = []
        current = directory
        while not current.exists():
            missing.append(current)
            current = current.parent
        directory.mkdir(parents=True, exist_ok=True)
        for created in reversed(missing):  # make each new directory entry durable
            _fsync_path(created.parent)

    def _put(self, key: str, source: Path, sha256: str, hashed_on_write: bool) -> None:
        final = self._path(key)
        if not hashed_on_write and file_sha256(source) != sha256:
            raise StorageError(f"{source.name} does not match its sha256")
        same_size = final.is_file() and final.stat().st_size == source.stat().st_size
        if same_size and file_sha256(final) == sha256:  # already stored: a no-op
            source.unlink()
            return
        spool = self.spool_dir
        if source.parent.resolve() != spool.resolve():
            # Elsewhere may be another filesystem: copy into the spool, then rename.
            fd, staged_name = tempfile.mkstemp(dir=spool, prefix="put-")
            os.close(fd)
            staged = Path(staged_name)
            try:
                shutil.copyfile(source, staged)
            except BaseException:
                staged.unlink(missing_ok=True)  # a full disk must not keep the partial copy
                raise
        else:
            staged = source
        if staged is not source or not hashed_on_write:  # the writer fsynced its own file
            _fsync_path(staged)
        self._ensure_dir(final.parent)
        os.replace(staged, final)
        _fsync_path(final.parent)
        source.unlink(missing_ok=True)

    async def put_file(
        self,
        key: str,
        source: Path,
        *,
        content_type: str,
        sha256: str,
        hashed_on_write: bool = False,
    ) -> None:
        """Atomically move `source` to `key` (the content type follows from the extension)."""
        validate_key(key)
        try:
            await anyio.to_thread.run_sync(self._put, key, source, sha256, hashed_on_write)
        except OSError as exc:
            raise StorageError(f"cannot store {key}: {exc}") from exc

    async def exists(self, key: str) -> bool:
        """Whether `key` is stored."""
        return await anyio.Path(self._path(key)).is_file()

    async def open(self, key: str) -> StoredObject:
        """The stored file, streamed in chunks."""
        path = self._path(key)
        try:
            stat = await anyio.Path(path).stat()
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise ObjectNotFoundError(key) from exc
        return StoredObject(key, stat.st_size, _content_type(key), _read_chunks(path))

    async def presigned_url(self, key: str, expires_in: int) -> str | None:
        """Local files have no URL of their own: serve them through the API."""
        return None

    def _check(self) -> None:
        # By hand, not NamedTemporaryFile: when its close fails on a full disk,
        # the probe stays until the object is collected.
        fd, name = tempfile.mkstemp(dir=self.spool_dir, prefix="check-")
        try:
            try:
                os.write(fd, b"ok")
                os.fsync(fd)
            finally:
                os.close(fd)
        finally:
            os.unlink(name)

    async def check(self) -> None:
        """Prove the root is a writable directory by writing a probe file."""
        try:
            await anyio.to_thread.run_sync(self._check)
        except OSError as exc:
            raise StorageError(f"storage directory {self.root} is not writable: {exc}") from exc

    async def cleanup_spool(self, older_than_seconds: float) -> int:
        """Remove orphaned spool files older than this."""
        return await anyio.to_thread.run_sync(remove_stale_files, self._spool, older_than_seconds)

    async def aclose(self) -> None:
        """Nothing to release."""


async def _read_chunks(path: Path) -> AsyncIterator[bytes]:
    async with await anyio.open_file(path, "rb") as f:
        while chunk := await f.read(_READ_CHUNK):
            yield chunk
