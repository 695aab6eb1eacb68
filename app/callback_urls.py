"""Callback URLs: our task id plus an HMAC token of it, so a delivery can be
matched to its task even before the provider has told us its own id."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

from app.schemas import MAX_URL_LENGTH

WEBHOOK_PATH = "/webhooks/starmagic"


def sign(task_id: str, secret: str) -> str:
    """The token of one task under one secret (URL-safe hex, 32 characters)."""
    digest = hmac.new(secret.encode(), f"callback:{task_id}".encode(), hashlib.sha256)
    return digest.hexdigest()[:32]


def verify(task_id: str, token: str, secrets: Sequence[str]) -> bool:
    """Constant-time check against every configured secret (rotation)."""
    matched = False
    for secret in secrets:
        # No early exit: every secret is tried, so timing says nothing about which.
        matched |= hmac.compare_digest(sign(task_id, secret).encode(), token.encode())
    return matched


def callback_url(public_base_url: str, task_id: str, secret: str) -> str:
    """The URL handed to the provider for one task."""
    url = f"{public_base_url.rstrip('/')}{WEBHOOK_PATH}/{task_id}/{sign(task_id, secret)}"
    if len(url) > MAX_URL_LENGTH:
        raise ValueError(f"callback URL longer than {MAX_URL_LENGTH} characters")
    return url
