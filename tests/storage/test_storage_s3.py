"""What only the S3 backend promises: multipart streaming, object metadata, clear failures."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import pytest

from app.storage import S3Storage, StorageError, storage_from_url
from tests.conftest import Service, make_settings
from tests.helpers import simulator_transport
from tests.ports import free_port

from .conftest import MakeS3, S3Server

KEY = "2025/05/06/task-7.png"


def sha(data: bytes) -> str:
    """Hex sha256."""
    return hashlib.sha256(data).hexdigest()


@pytest.mark.asyncio(loop_scope="session")
async def test_large_upload_round_trip_with_metadata(make_s3: MakeS3, s3_server: S3Server) -> None:
    """A file bigger than one part goes up in parts and comes back whole, typed and hashed."""
    storage = make_s3()
    data = os.urandom(12 * 1024 * 1024)
    source = storage.spool_dir / "big"
    source.write_bytes(data)
    await storage.put_file(KEY, source, content_type="image/png", sha256=sha(data))
    head = s3_server.client().head_object(Bucket=storage.bucket, Key=f"{storage.prefix}/{KEY}")
    assert head["ContentType"] == "image/png"
    assert head["Metadata"]["sha256"] == sha(data)
    assert "-" in head["ETag"]  # a multipart upload's ETag
    obj = await storage.open(KEY)
    received = bytearray()
    async for chunk in obj.chunks:
        assert len(chunk) <= 1024 * 1024
        received += chunk
    assert received == data


def mark_server_side(s3_server: S3Server, bucket: str, key: str) -> None:
    """Tag the stored object in place (same bytes and sha256): any later upload drops the tag."""
    client = s3_server.client()
    head = client.head_object(Bucket=bucket, Key=key)
    client.copy_object(
        Bucket=bucket,
        Key=key,
        CopySource={"Bucket": bucket, "Key": key},
        Metadata={**head["Metadata"], "marker": "first-upload"},
        ContentType=head["ContentType"],
        MetadataDirective="REPLACE",
    )


@pytest.mark.asyncio(loop_scope="session")
@pytest.mark.parametrize(
    ("second", "uploads_again"), [(b"same bytes", False), (b"new bytes", True)]
)
async def test_identical_re_put_does_not_upload_again(
    make_s3: MakeS3, s3_server: S3Server, second: bytes, uploads_again: bool
) -> None:
    """A retried put of identical bytes leaves the stored object alone; other bytes replace it."""
    storage = make_s3()
    stored_key = f"{storage.prefix}/{KEY}"
    first = storage.spool_dir / "first"
    first.write_bytes(b"same bytes")
    await storage.put_file(KEY, first, content_type="image/png", sha256=sha(b"same bytes"))
    mark_server_side(s3_server, storage.bucket, stored_key)
    again = storage.spool_dir / "again"
    again.write_bytes(second)
    await storage.put_file(KEY, again, content_type="image/png", sha256=sha(second))
    assert not again.exists()
    head = s3_server.client().head_object(Bucket=storage.bucket, Key=stored_key)
    assert head["Metadata"]["sha256"] == sha(second)
    assert ("marker" not in head["Metadata"]) is uploads_again


@pytest.mark.asyncio(loop_scope="session")
async def test_missing_bucket_fails_check(make_s3: MakeS3) -> None:
    """A bucket that does not exist is not ready, and the reason says so."""
    with pytest.raises(StorageError) as caught:
        await make_s3(bucket="no-such-bucket").check()
    assert str(caught.value) == 'bucket "no-such-bucket" does not exist (create it first)'


@pytest.mark.asyncio(loop_scope="session")
async def test_checks_write_nothing_after_the_first(make_s3: MakeS3, s3_server: S3Server) -> None:
    """Readiness probes only list the bucket: one probe write per process, however many checks."""
    client = s3_server.client()
    client.create_bucket(Bucket="imagetasks-versioned")
    client.put_bucket_versioning(
        Bucket="imagetasks-versioned", VersioningConfiguration={"Status": "Enabled"}
    )
    first, second = make_s3(bucket="imagetasks-versioned"), make_s3(bucket="imagetasks-versioned")
    for _ in range(5):
        await first.check()
    await second.check()  # another process checks once at its own start
    versions = client.list_object_versions(Bucket="imagetasks-versioned").get("Versions", [])
    # Versioning keeps every PUT, overwrites of the same key included.
    assert len(versions) == 2


@pytest.mark.asyncio(loop_scope="session")
async def test_readyz_names_a_missing_bucket(
    service_factory: Any,
    sqlite_url: str,
    tmp_path: Path,
    s3_server: S3Server,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """/readyz says which bucket is missing rather than an exception's class name."""
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    settings = make_settings(sqlite_url, tmp_path, storage_url="s3://absent-bucket/prefix")
    service: Service = await service_factory(settings, simulator_transport()[0])
    ready = await service.client.get("/readyz")
    assert ready.status_code == 503
    assert ready.json()["checks"] == {
        "database": "ok",
        "storage": 'unavailable: bucket "absent-bucket" does not exist (create it first)',
    }


@pytest.mark.asyncio(loop_scope="session")
async def test_unreachable_endpoint_fails_check(make_s3: MakeS3, s3_server: S3Server) -> None:
    """Nothing listening at AWS_ENDPOINT_URL: check fails instead of hanging."""
    env = {**s3_server.env, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"}
    with pytest.raises(StorageError):
        await make_s3(env=env).check()


def test_s3_url_gives_bucket_and_prefix(tmp_path: Path) -> None:
    """s3://bucket/prefix builds the S3 backend without touching the network."""
    storage = storage_from_url("s3://my-images/prod/v1/", spool_dir=tmp_path)
    assert isinstance(storage, S3Storage)
    assert (storage.bucket, storage.prefix, storage.spool_dir) == ("my-images", "prod/v1", tmp_path)


@pytest.mark.asyncio(loop_scope="session")
async def test_aws_settings_in_the_env_file_are_used(
    s3_server: S3Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """.env.example puts the AWS_* variables beside STORAGE_URL: from .env they work too."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / ".env").write_text(
        "".join(f"{name}={value}\n" for name, value in s3_server.env.items())
    )
    monkeypatch.chdir(tmp_path)
    storage = S3Storage("imagetasks-test", "dotenv", spool_dir=tmp_path / "spool")
    await storage.check()
