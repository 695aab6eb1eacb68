"""Standard Webhooks signatures, checked by two verifiers nobody here wrote."""

from __future__ import annotations

import json
import time

import pytest
from standardwebhooks.webhooks import Webhook as StandardWebhook
from standardwebhooks.webhooks import WebhookVerificationError
from svix.webhooks import Webhook as SvixWebhook
from svix.webhooks import WebhookVerificationError as SvixVerificationError

from app.webhooks import signing

BODY = json.dumps({"id": "evt_1", "type": "image.stored", "data": {"id": "tsk_1"}}).encode()


def test_a_signature_verifies_with_both_reference_libraries() -> None:
    """A fresh secret's headers pass standardwebhooks' and svix's verify."""
    secret = signing.new_secret()
    assert secret.startswith("whsec_")
    headers = signing.headers([secret], "evt_1", int(time.time()), BODY)
    assert StandardWebhook(secret).verify(BODY, headers)["id"] == "evt_1"
    SvixWebhook(secret).verify(BODY, headers)


def test_a_tampered_body_or_another_secret_is_refused_by_both() -> None:
    """One changed byte, or the wrong secret, fails verification in both libraries."""
    secret, other = signing.new_secret(), signing.new_secret()
    headers = signing.headers([secret], "evt_1", int(time.time()), BODY)
    tampered = BODY.replace(b"tsk_1", b"tsk_2")
    with pytest.raises(WebhookVerificationError):
        StandardWebhook(secret).verify(tampered, headers)
    with pytest.raises(SvixVerificationError):
        SvixWebhook(other).verify(BODY, headers)


def test_during_rotation_both_secrets_verify_one_header() -> None:
    """Two secrets sign: the header has two space-separated signatures, each verifies."""
    old, new = signing.new_secret(), signing.new_secret()
    headers = signing.headers([new, old], "evt_9", int(time.time()), BODY)
    assert len(headers["webhook-signature"].split(" ")) == 2
    for secret in (old, new):
        StandardWebhook(secret).verify(BODY, headers)
        SvixWebhook(secret).verify(BODY, headers)


def test_the_default_secret_depends_on_the_owner_and_the_service_secret() -> None:
    """Stable for one owner and WEBHOOK_SECRET; different for another owner or secret."""
    service = "s" * 32
    mine = signing.default_secret(service, "caller-a")
    assert mine == signing.default_secret(service, "caller-a")
    assert mine != signing.default_secret(service, "caller-b")
    assert mine != signing.default_secret("t" * 32, "caller-a")
    headers = signing.headers(
        signing.default_secrets(["t" * 32, service], "caller-a"), "evt_2", int(time.time()), BODY
    )
    # Rotating WEBHOOK_SECRET (new first, old kept) still verifies with the old default.
    StandardWebhook(mine).verify(BODY, headers)


def test_our_own_verify_matches_the_header() -> None:
    """`verify` accepts its own signature and refuses a stale timestamp's."""
    secret = signing.new_secret()
    header = signing.signature_header([secret], "evt_3", 1700000000, BODY)
    assert signing.verify(secret, "evt_3", 1700000000, BODY, header)
    assert not signing.verify(secret, "evt_3", 1700000001, BODY, header)
