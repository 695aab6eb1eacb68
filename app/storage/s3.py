"""An S3-compatible bucket (AWS, MinIO, ...) as storage, through obstore.

Credentials, region and endpoint come from the standard ``AWS_*`` variables, from the
environment or ``.env`` (as every other setting); an ``http://`` ``AWS_ENDPOINT_URL``
(a local MinIO) is allowed explicitly. Uploads stream from the spool file in 5 MiB
parts, so memory stays bounded, and S3 only shows an object once its PUT or multipart
upload has completed.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import obstore
from obstore.exceptions import BaseError, NotFoundError
from obstore.store import S3Store

from app.storage.base import (
    ObjectNotFoundError,
    StorageError,
    StoredObject,
    file_sha256,
    remove_stale_files,
    validate_key,
)

if TYPE_CHECKING:
    from obstore.store import ClientConfig, RetryConfig

_STREAM_CHUNK = 256 * 1024
_UPLOAD_CONCURRENCY = 4  # parts in flight: bounds upload memory at about 4 x 5 MiB
_CHECK_KEY = ".imagetasks-check"
_CHECK_TIMEOUT = 10.0
# obstore reports a missing object as its NotFoundError or as FileNotFoundError.
_MISSING = (NotFoundError, FileNotFoundError)
_FAILURES = (BaseError, OSError)
# S3 names its errors in the XML body, which obstore passes on in the message.
_S3_CODE = re.compile(r"<Code>([A-Za-z]+)</Code>")
_DENIED = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled"}


# The AWS_* variables obstore reads, also taken from `.env` (lower-cased, they are its keys).
_AWS_KEYS = frozenset(
    {
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_REGION",
        "AWS_DEFAULT_REGION",
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_S3",
    }
)


def _aws_variables() -> dict[str, str]:
    """AWS_* from `.env`, overridden by the real environment."""
    from dotenv import dotenv_values

    from app.config import ENV_FILE

    found = {k: v for k, v in dotenv_values(ENV_FILE).items() if k.startswith("AWS_") and v}
    found.update({k: v for k, v in os.environ.items() if k.startswith("AWS_")})
    return found


class S3Storage:
    """Images in an S3 bucket, optionally under a key prefix."""

    def __init__(self, bucket: str, prefix: str = "", *, spool_dir: Path | None = None) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        aws = _aws_variables()
        endpoint = aws.get("AWS_ENDPOINT_URL_S3") or aws.get("AWS_ENDPOINT_URL", "")
        client: ClientConfig = {
            "connect_timeout": timedelta(seconds=5),
            "timeout": timedelta(seconds=120),
            "allow_http": endpoint.startswith("http://"),
        }
        retry: RetryConfig = {"max_retries": 3, "retry_timeout": timedelta(seconds=30)}
        # From the environment and `.env` alike (the environment wins), as the settings are.
        config = {name.lower(): value for name, value in aws.items() if name in _AWS_KEYS}
        self._store = S3Store(
            bucket,
            prefix=self.prefix or None,
            config=config,  # type: ignore[arg-type]  # keys checked against _AWS_KEYS
            client_options=client,
            retry_config=retry,
        )
        self._spool = spool_dir or Path(tempfile.gettempdir()) / "imagetasks-spool"
        self._write_checked = False

    def __repr__(self) -> str:
        return f"S3Storage(bucket={self.bucket!r}, prefix={self.prefix!r})"

    @property
    def spool_dir(self) -> Path:
        """A local temp directory, created on access."""
        self._spool.mkdir(parents=True, exist_ok=True)
        return self._spool

    async def _stored_sha256(self, key: str) -> str | None:
        try:
            result = await obstore.get_async(self._store, key, options={"head": True})
        except _MISSING:
            return None
        return result.attributes.get("sha256")

    async def put_file(
        self,
        key: str,
        source: Path,
        *,
        content_type: str,
        sha256: str,
        hashed_on_write: bool = False,
    ) -> None:
        """Upload `source` under `key` with its content type and sha256, then remove it."""
        validate_key(key)
        try:
            # hashed_on_write: hashed from the bytes as they were written, no second read.
            if (
                not hashed_on_write
                and await anyio.to_thread.run_sync(file_sha256, source) != sha256
            ):
                raise StorageError(f"{source.name} does not match its sha256")
            if await self._stored_sha256(key) != sha256:
                await obstore.put_async(
                    self._store,
                    key,
                    source,
                    attributes={"Content-Type": content_type, "sha256": sha256},
                    max_concurrency=_UPLOAD_CONCURRENCY,
                )
            await anyio.Path(source).unlink()
        except _FAILURES as exc:
            raise StorageError(f"cannot store {key}: {exc}") from exc

    async def exists(self, key: str) -> bool:
        """Whether `key` is stored."""
        validate_key(key)
        try:
            await obstore.head_async(self._store, key)
        except _MISSING:
            return False
        except _FAILURES as exc:
            raise StorageError(f"cannot look up {key}: {exc}") from exc
        return True

    async def open(self, key: str) -> StoredObject:
        """The object under `key`, streamed from S3 as it is read."""
        validate_key(key)
        try:
            result = await obstore.get_async(self._store, key)
        except _MISSING as exc:
            raise ObjectNotFoundError(key) from exc
        except _FAILURES as exc:
            raise StorageError(f"cannot read {key}: {exc}") from exc
        content_type = result.attributes.get("Content-Type", "application/octet-stream")
        return StoredObject(key, result.meta["size"], content_type, _chunks(result))

    async def presigned_url(self, key: str, expires_in: int) -> str | None:
        """A signed GET URL valid for `expires_in` seconds."""
        validate_key(key)
        return await obstore.sign_async(self._store, "GET", key, timedelta(seconds=expires_in))

    async def check(self) -> None:
        """List the bucket (no write): proves it exists and the credentials can read it.

        The first successful check also writes a tiny probe object, once per process,
        so a bucket that can be read but not written is caught at startup.
        """
        try:
            with anyio.fail_after(_CHECK_TIMEOUT):
                await obstore.list_with_delimiter_async(self._store, _CHECK_KEY)
                if not self._write_checked:
                    await obstore.put_async(self._store, _CHECK_KEY, b"ok")
                    self._write_checked = True
        except TimeoutError as exc:
            raise StorageError(
                f'bucket "{self.bucket}" did not answer within {_CHECK_TIMEOUT:g} s'
            ) from exc
        except _FAILURES as exc:
            raise StorageError(self._explain(exc)) from exc

    def _explain(self, exc: Exception) -> str:
        """One line naming the bucket and what S3 said (its error code, when it sent one)."""
        text = str(exc)
        code = _S3_CODE.search(text)
        if code and code.group(1) == "NoSuchBucket":
            return f'bucket "{self.bucket}" does not exist (create it first)'
        if code and code.group(1) in _DENIED:
            return (
                f'bucket "{self.bucket}": access denied ({code.group(1)}); check the '
                "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and the bucket policy"
            )
        if code:
            return f'bucket "{self.bucket}": S3 answered {code.group(1)}'
        first_line = text.strip().splitlines()[0][:200] if text.strip() else type(exc).__name__
        return f'bucket "{self.bucket}" is unreachable: {first_line}'

    async def cleanup_spool(self, older_than_seconds: float) -> int:
        """Remove orphaned spool files older than this."""
        return await anyio.to_thread.run_sync(remove_stale_files, self._spool, older_than_seconds)

    async def aclose(self) -> None:
        """obstore keeps no connections that need closing."""


async def _chunks(result: obstore.GetResult) -> AsyncIterator[bytes]:
    async for chunk in result.stream(min_chunk_size=_STREAM_CHUNK):
        yield bytes(chunk)
