"""Standard Webhooks signatures: `v1,` + base64 HMAC-SHA256 of `id.timestamp.body`.

Secrets are `whsec_` + base64 of random bytes. A token's default secret (for
per-task `webhook_url`s) is derived from WEBHOOK_SECRET, one per configured
secret, so rotating WEBHOOK_SECRET (new first, old kept) sends both signatures
until the old one is removed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections.abc import Sequence

PREFIX = "whsec_"
SECRET_BYTES = 24


def new_secret() -> str:
    """A fresh endpoint secret."""
    return PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def default_secret(service_secret: str, owner: str) -> str:
    """The caller's default secret under one of the service's WEBHOOK_SECRETs."""
    key = hmac.new(
        service_secret.encode(), b"imagetasks webhook default secret\x00" + owner.encode(), "sha256"
    ).digest()
    return PREFIX + base64.b64encode(key).decode()


def default_secrets(service_secrets: Sequence[str], owner: str) -> list[str]:
    """Every secret a per-task delivery is signed with, the current one first."""
    return [default_secret(secret, owner) for secret in service_secrets]


def _key(secret: str) -> bytes:
    return base64.b64decode(secret.removeprefix(PREFIX))


def signature(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """One `v1,<base64>` signature."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def signature_header(
    signing_secrets: Sequence[str], msg_id: str, timestamp: int, body: bytes
) -> str:
    """The `webhook-signature` value: one signature per secret, space-separated."""
    return " ".join(signature(s, msg_id, timestamp, body) for s in dict.fromkeys(signing_secrets))


def verify(secret: str, msg_id: str, timestamp: int, body: bytes, header: str) -> bool:
    """Whether any of the header's v1 signatures is this secret's (constant time)."""
    expected = signature(secret, msg_id, timestamp, body)
    return any(hmac.compare_digest(expected, part) for part in header.split())


def headers(
    signing_secrets: Sequence[str], msg_id: str, timestamp: int, body: bytes
) -> dict[str, str]:
    """The three Standard Webhooks headers plus the content type."""
    return {
        "content-type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature_header(signing_secrets, msg_id, timestamp, body),
    }
