"""What only the local-directory backend promises: atomic rename and a real directory."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from app.storage import LocalStorage, StorageError, local, storage_from_url

KEY = "2025/03/04/task-9.jpg"


def sha(data: bytes) -> str:
    """Hex sha256."""
    return hashlib.sha256(data).hexdigest()


@pytest.mark.asyncio(loop_scope="session")
async def test_final_name_appears_only_by_atomic_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bytes sit complete in .tmp and the final name is absent until one os.replace."""
    storage = LocalStorage(tmp_path / "images")
    data = os.urandom(300_000)
    source = storage.spool_dir / "dl"
    source.write_bytes(data)
    seen: list[tuple[str, str, bool, bytes]] = []
    real_replace = os.replace

    def spy(src: str | Path, dst: str | Path) -> None:
        seen.append((str(src), str(dst), Path(dst).exists(), Path(src).read_bytes()))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    await storage.put_file(KEY, source, content_type="image/jpeg", sha256=sha(data))
    [(src, dst, existed, staged)] = seen
    assert Path(src).parent == tmp_path / "images" / ".tmp"
    assert (dst, existed, staged) == (str(tmp_path / "images" / KEY), False, data)
    assert (tmp_path / "images" / KEY).read_bytes() == data
    assert (await storage.open(KEY)).content_type == "image/jpeg"


@pytest.mark.asyncio(loop_scope="session")
async def test_crash_before_rename_leaves_nothing_under_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure at the rename leaves the key absent and only a spool file to clean up."""
    storage = LocalStorage(tmp_path / "images")
    source = storage.spool_dir / "dl"
    source.write_bytes(b"complete bytes")

    def crash(src: str | Path, dst: str | Path) -> None:
        raise OSError("disk went away")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(StorageError):
        await storage.put_file(
            KEY, source, content_type="image/jpeg", sha256=sha(b"complete bytes")
        )
    assert not await storage.exists(KEY)
    assert not (tmp_path / "images" / KEY).exists()
    assert await storage.cleanup_spool(older_than_seconds=-1) == 1


@pytest.mark.asyncio(loop_scope="session")
async def test_a_source_outside_the_spool_is_copied_then_renamed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file from another directory (maybe another filesystem) is still stored atomically:
    copied into the spool, on the root's filesystem, and renamed from there."""
    storage = LocalStorage(tmp_path / "images")
    source = tmp_path / "elsewhere.bin"
    source.write_bytes(b"abc")
    renamed_from: list[Path] = []
    real_replace = os.replace

    def spy(src: str | Path, dst: str | Path) -> None:
        renamed_from.append(Path(src))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    await storage.put_file(KEY, source, content_type="image/jpeg", sha256=sha(b"abc"))
    assert [path.parent for path in renamed_from] == [tmp_path / "images" / ".tmp"]
    assert (tmp_path / "images" / KEY).read_bytes() == b"abc"
    assert not source.exists()
    assert list((tmp_path / "images" / ".tmp").iterdir()) == []


@pytest.mark.parametrize("in_spool", [True, False])
@pytest.mark.parametrize("hashed_on_write", [True, False])
@pytest.mark.asyncio(loop_scope="session")
async def test_the_stored_file_is_synced_before_its_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, in_spool: bool, hashed_on_write: bool
) -> None:
    """Every file renamed into place was fsynced first, except the downloader's own spool
    file (it syncs what it wrote); the directory is synced after the rename."""
    storage = LocalStorage(tmp_path / "images")
    source = (storage.spool_dir if in_spool else tmp_path) / "dl"
    source.write_bytes(b"image bytes")
    events: list[tuple[str, Path]] = []
    real_fsync, real_replace = local._fsync_path, os.replace

    def fsync_spy(path: Path, flags: int = os.O_RDONLY) -> None:
        events.append(("fsync", Path(path)))
        real_fsync(path, flags)

    def replace_spy(src: str | Path, dst: str | Path) -> None:
        events.append(("replace", Path(src)))
        real_replace(src, dst)

    monkeypatch.setattr(local, "_fsync_path", fsync_spy)
    monkeypatch.setattr(os, "replace", replace_spy)
    await storage.put_file(
        KEY, source, content_type="image/jpeg", sha256=sha(b"image bytes"),
        hashed_on_write=hashed_on_write,
    )  # fmt: skip
    [renamed] = [path for event, path in events if event == "replace"]
    synced_before = ("fsync", renamed) in events[: events.index(("replace", renamed))]
    assert synced_before == (not (in_spool and hashed_on_write))
    assert events[-1] == ("fsync", tmp_path / "images" / Path(KEY).parent)


@pytest.mark.asyncio(loop_scope="session")
async def test_an_object_is_read_back_in_bounded_chunks(tmp_path: Path) -> None:
    """Serving a stored image streams it in pieces, never the whole file in memory at once."""
    storage = LocalStorage(tmp_path / "images")
    data = os.urandom(1_000_000)
    source = storage.spool_dir / "dl"
    source.write_bytes(data)
    await storage.put_file(KEY, source, content_type="image/jpeg", sha256=sha(data))
    sizes = [len(chunk) async for chunk in (await storage.open(KEY)).chunks]
    assert sum(sizes) == len(data)
    assert max(sizes) <= 256 * 1024


@pytest.mark.asyncio(loop_scope="session")
async def test_identical_re_put_does_not_rewrite(tmp_path: Path) -> None:
    """Storing the same bytes again leaves the existing file untouched."""
    storage = LocalStorage(tmp_path / "images")
    for name in ("first", "second"):
        source = storage.spool_dir / name
        source.write_bytes(b"same")
        await storage.put_file(KEY, source, content_type="image/jpeg", sha256=sha(b"same"))
        if name == "first":
            inode = (tmp_path / "images" / KEY).stat().st_ino
    assert (tmp_path / "images" / KEY).stat().st_ino == inode


@pytest.mark.asyncio(loop_scope="session")
async def test_check_fails_when_the_root_cannot_be_a_directory(tmp_path: Path) -> None:
    """A root below a regular file is reported as unusable."""
    (tmp_path / "a-file").write_bytes(b"")
    storage = LocalStorage(tmp_path / "a-file" / "images")
    with pytest.raises(StorageError, match="not writable"):
        await storage.check()


def mount_tmpfs(path: Path) -> bool:
    """A tiny tmpfs at ``path``; False where mounting is not allowed."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    path.mkdir(parents=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(path)],
        capture_output=True,
        check=False,
    )
    return mounted.returncode == 0


def fill_up(path: Path) -> None:
    """Write zeros into a new file in ``path`` until its filesystem is full."""
    with (path / "filler").open("wb", buffering=0) as filler, contextlib.suppress(OSError):
        while True:
            filler.write(bytes(4096))


@pytest.mark.asyncio(loop_scope="session")
async def test_check_on_a_full_disk_fails_and_leaves_no_probe(tmp_path: Path) -> None:
    """A readiness probe that cannot write reports it and removes its probe file."""
    root = tmp_path / "images"
    if not mount_tmpfs(root):
        pytest.skip("needs root and permission to mount a tmpfs")
    try:
        storage = LocalStorage(root)
        fill_up(root)
        for _ in range(3):
            with pytest.raises(StorageError, match="not writable"):
                await storage.check()
        assert list(storage.spool_dir.iterdir()) == []
    finally:
        subprocess.run(["umount", "-l", str(root)], check=False)


@pytest.mark.asyncio(loop_scope="session")
async def test_check_removes_its_probe_whichever_step_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Writing, syncing or closing the probe may fail on a full disk: the probe still goes."""
    storage = LocalStorage(tmp_path / "images")

    def no_space(*args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    for step in ("write", "fsync", "close"):
        with monkeypatch.context() as patch:
            real = getattr(os, step)

            def fail_then_release(*args: object, _real: Any = real, _step: str = step) -> Any:
                if _step == "close":  # really close, then report the failure
                    _real(*args)
                no_space()

            patch.setattr(os, step, fail_then_release)
            with pytest.raises(StorageError, match="not writable"):
                await storage.check()
        assert list(storage.spool_dir.iterdir()) == [], step


@pytest.mark.asyncio(loop_scope="session")
async def test_a_copy_that_runs_out_of_room_leaves_no_staged_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A source outside the spool is copied in; a failed copy removes its partial file."""
    storage = LocalStorage(tmp_path / "images")
    data = os.urandom(10_000)
    source = tmp_path / "elsewhere.jpg"
    source.write_bytes(data)

    def no_space(src: object, dst: str) -> None:
        Path(dst).write_bytes(data[:100])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shutil, "copyfile", no_space)
    with pytest.raises(StorageError, match="cannot store"):
        await storage.put_file(KEY, source, content_type="image/jpeg", sha256=sha(data))
    assert list(storage.spool_dir.iterdir()) == []
    assert source.read_bytes() == data


def test_file_urls_relative_and_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """file://./dir is relative to the working directory; file:///dir is absolute."""
    monkeypatch.chdir(tmp_path)
    relative = storage_from_url("file://./var/images")
    assert isinstance(relative, LocalStorage)
    assert relative.root == tmp_path / "var" / "images"
    absolute = storage_from_url(f"file://{tmp_path}/srv")
    assert isinstance(absolute, LocalStorage)
    assert absolute.root == tmp_path / "srv"


@pytest.mark.asyncio(loop_scope="session")
@pytest.mark.parametrize("hashed_on_write", [False, True])
async def test_a_file_hashed_on_write_is_not_read_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hashed_on_write: bool
) -> None:
    """The downloader's own digest is trusted (no second read); any other caller's is checked."""
    storage = LocalStorage(tmp_path / "images")
    data = os.urandom(100_000)
    source = storage.spool_dir / "dl"
    source.write_bytes(data)
    reads: list[Path] = []
    real = local.file_sha256

    def counting(path: Path) -> str:
        reads.append(path)
        return real(path)

    monkeypatch.setattr(local, "file_sha256", counting)
    await storage.put_file(
        KEY, source, content_type="image/jpeg", sha256=sha(data), hashed_on_write=hashed_on_write
    )
    assert (tmp_path / "images" / KEY).read_bytes() == data
    assert reads == ([] if hashed_on_write else [source])
