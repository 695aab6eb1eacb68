"""The storage contract, run against both backends."""

from __future__ import annotations

import hashlib
import os
import time
from datetime import date
from pathlib import Path

import httpx
import pytest

from app.storage import ObjectNotFoundError, Storage, StorageError, image_key

KEY = "2025/01/31/task-1.png"


def spool(storage: Storage, data: bytes, name: str = "download") -> Path:
    """Write `data` to a file in the backend's spool directory, as the worker does."""
    path = storage.spool_dir / name
    path.write_bytes(data)
    return path


async def read_all(storage: Storage, key: str) -> bytes:
    """The stored bytes, read through the streaming interface."""
    obj = await storage.open(key)
    return b"".join([chunk async for chunk in obj.chunks])


@pytest.mark.asyncio(loop_scope="session")
async def test_round_trip_is_byte_exact(storage: Storage) -> None:
    """put_file then open returns the same bytes, size and content type; the spool file is gone."""
    data = os.urandom(700_000)
    source = spool(storage, data)
    assert not await storage.exists(KEY)
    await storage.put_file(KEY, source, content_type="image/png", sha256=sha(data))
    assert await storage.exists(KEY)
    assert not source.exists()
    obj = await storage.open(KEY)
    assert (obj.key, obj.size, obj.content_type) == (KEY, len(data), "image/png")
    assert await read_all(storage, KEY) == data


@pytest.mark.asyncio(loop_scope="session")
async def test_storing_the_same_bytes_again_is_a_no_op(storage: Storage) -> None:
    """A retried put of identical bytes succeeds, consumes its source, and keeps the object."""
    data = b"\x89PNG\r\n\x1a\n" + os.urandom(1000)
    await storage.put_file(KEY, spool(storage, data), content_type="image/png", sha256=sha(data))
    again = spool(storage, data, "again")
    await storage.put_file(KEY, again, content_type="image/png", sha256=sha(data))
    assert not again.exists()
    assert await read_all(storage, KEY) == data


@pytest.mark.asyncio(loop_scope="session")
async def test_a_source_not_matching_its_sha256_is_refused(storage: Storage) -> None:
    """A corrupted spool file is never stored."""
    source = spool(storage, b"some bytes")
    with pytest.raises(StorageError):
        await storage.put_file(KEY, source, content_type="image/png", sha256=sha(b"other"))
    assert not await storage.exists(KEY)


@pytest.mark.asyncio(loop_scope="session")
async def test_missing_objects(storage: Storage) -> None:
    """A key never stored does not exist and cannot be opened."""
    assert not await storage.exists("2025/01/01/nothing.png")
    with pytest.raises(ObjectNotFoundError):
        await storage.open("2025/01/01/nothing.png")


@pytest.mark.parametrize(
    "key",
    ["", "/abs.png", "../up.png", "a/../b.png", ".tmp/x.png", "a//b.png", "a/.hidden", "a\\b"],
)
@pytest.mark.asyncio(loop_scope="session")
async def test_unsafe_keys_are_refused(storage: Storage, key: str) -> None:
    """Keys that could escape the root or reach the spool are refused before any I/O."""
    source = spool(storage, b"x")
    with pytest.raises(ValueError, match="invalid storage key"):
        await storage.put_file(key, source, content_type="image/png", sha256=sha(b"x"))
    with pytest.raises(ValueError, match="invalid storage key"):
        await storage.exists(key)


@pytest.mark.asyncio(loop_scope="session")
async def test_cleanup_removes_only_old_spool_files(storage: Storage) -> None:
    """Files a crash left behind go; a download still in progress stays."""
    old = spool(storage, b"orphan", "old")
    fresh = spool(storage, b"in progress", "fresh")
    an_hour_ago = time.time() - 3600
    os.utime(old, (an_hour_ago, an_hour_ago))
    assert await storage.cleanup_spool(older_than_seconds=600) == 1
    assert not old.exists()
    assert fresh.exists()


@pytest.mark.asyncio(loop_scope="session")
async def test_check_passes_on_a_usable_location(storage: Storage) -> None:
    """A writable location is ready, every time, and the probe leaves no trace behind."""
    data = os.urandom(3000)
    await storage.put_file(KEY, spool(storage, data), content_type="image/png", sha256=sha(data))
    for _ in range(2):
        await storage.check()
    assert await read_all(storage, KEY) == data
    assert list(storage.spool_dir.iterdir()) == []
    with pytest.raises(ObjectNotFoundError):
        await storage.open("2025/01/31/never-stored.png")


@pytest.mark.asyncio(loop_scope="session")
async def test_presigned_url(storage: Storage) -> None:
    """S3 hands out a working time-limited URL; the local backend has none."""
    data = os.urandom(5000)
    key = image_key("task-2", date(2025, 2, 3), "webp")
    await storage.put_file(key, spool(storage, data), content_type="image/webp", sha256=sha(data))
    url = await storage.presigned_url(key, expires_in=60)
    if url is None:
        assert type(storage).__name__ == "LocalStorage"
        return
    async with httpx.AsyncClient() as client:
        response = await client.get(url)
    assert response.status_code == 200
    assert response.content == data
    assert response.headers["content-type"] == "image/webp"


def sha(data: bytes) -> str:
    """Hex sha256."""
    return hashlib.sha256(data).hexdigest()
