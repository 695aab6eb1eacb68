"""Durable storage for finished images: a local directory or an S3-compatible bucket.

Key layout: ``yyyy/mm/dd/<task id>.<ext>`` (see `image_key`), the UTC day the task
was created and the extension of the sniffed type (``png``, ``jpg``, ``webp``). Keys
are relative, ``/``-separated, and every segment starts with a letter or digit, so
backends can keep their own hidden names (``.tmp/``, ``.imagetasks-check``) beside them.
One task, one key: storing it twice is harmless, and nothing is ever stored in place.

The download worker writes its temp file in `Storage.spool_dir`, then hands it to
`Storage.put_file`, which stores it atomically and removes it; `cleanup_spool` removes
files a crash left in the spool.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote, urlsplit

from app.storage.base import (
    ObjectNotFoundError,
    Storage,
    StorageError,
    StoredObject,
    image_key,
    validate_key,
)
from app.storage.local import LocalStorage
from app.storage.s3 import S3Storage

__all__ = [
    "LocalStorage",
    "ObjectNotFoundError",
    "S3Storage",
    "Storage",
    "StorageError",
    "StoredObject",
    "image_key",
    "storage_from_url",
    "validate_key",
]

_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


def storage_from_url(url: str, *, spool_dir: Path | None = None) -> Storage:
    """Build the backend for ``STORAGE_URL``; ValueError with a one-line reason if unusable.

    ``file://./var/images`` is relative to the working directory, ``file:///srv/images``
    absolute; ``s3://bucket/prefix`` takes credentials from the ``AWS_*`` variables.
    `spool_dir` overrides the S3 backend's local temp directory.
    """
    parts = urlsplit(url.strip())
    if parts.query or parts.fragment:
        raise ValueError(f"storage URL {url!r} must not have a query or fragment")
    if parts.scheme == "file":
        host = "" if parts.netloc == "localhost" else parts.netloc
        path = unquote(host + parts.path)
        if not path or Path(path).absolute() == Path("/"):
            raise ValueError(f"storage URL {url!r} names no directory (or the filesystem root)")
        return LocalStorage(Path(path))
    if parts.scheme == "s3":
        if "@" in parts.netloc:
            raise ValueError("storage URL must not carry credentials: use the AWS_* variables")
        if not _BUCKET.fullmatch(parts.netloc) or ".." in parts.netloc:
            raise ValueError(f"storage URL {url!r} has no valid bucket name")
        prefix = unquote(parts.path).strip("/")
        if prefix and (any(seg in ("", ".", "..") for seg in prefix.split("/"))):
            raise ValueError(f"storage URL {url!r} has an invalid prefix")
        return S3Storage(parts.netloc, prefix, spool_dir=spool_dir)
    raise ValueError(f"storage URL {url!r}: scheme must be file:// or s3://")
