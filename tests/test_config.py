"""Settings: every impossible setting stops the service with a one-line reason."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from app.config import SettingsError, load_settings

GOOD: dict[str, Any] = {
    "webhook_secret": "s" * 32,
    "public_base_url": "https://hooks.example.com/imagetasks",
    "api_tokens": "t1,t2",
}


def test_good_settings_load_and_split_lists() -> None:
    """Comma-separated secrets and tokens become lists; the first secret signs."""
    settings = load_settings(**{**GOOD, "webhook_secret": "a" * 20 + "," + "b" * 20})
    assert settings.api_tokens == ["t1", "t2"]
    assert settings.signing_secret == "a" * 20
    assert settings.public_base_url == "https://hooks.example.com/imagetasks"


@pytest.mark.parametrize(
    ("override", "reason"),
    [
        ({"webhook_secret": ""}, "WEBHOOK_SECRET is required"),
        ({"webhook_secret": "short"}, "at least 16 characters"),
        ({"public_base_url": ""}, "PUBLIC_BASE_URL is required"),
        ({"public_base_url": "http://hooks.example.com"}, "must be https://"),
        ({"public_base_url": "ftp://x"}, "PUBLIC_BASE_URL: must be an http(s) URL"),
        ({"api_tokens": ""}, "API_TOKENS is required"),
        ({"database_url": "postgresql://db/x"}, "DATABASE_URL: use an async driver"),
        ({"database_url": "mysql://db/x"}, "DATABASE_URL: must start with"),
        ({"storage_url": "ftp://bucket"}, "STORAGE_URL: must be file://"),
        ({"storage_url": "s3://"}, "STORAGE_URL: must be file://"),
        ({"max_image_bytes": 0}, "MAX_IMAGE_BYTES"),
        ({"reconcile_interval_seconds": -1}, "RECONCILE_INTERVAL_SECONDS"),
    ],
)
def test_impossible_settings_give_one_line_reasons(override: dict[str, Any], reason: str) -> None:
    """Each impossible setting is refused with a single line naming it."""
    with pytest.raises(SettingsError) as caught:
        load_settings(**{**GOOD, **override})
    message = str(caught.value)
    assert reason in message
    assert "\n" not in message


def test_opt_ins_make_local_settings_possible() -> None:
    """http callbacks and no tokens are allowed only with their explicit opt-ins."""
    settings = load_settings(
        **{**GOOD, "public_base_url": "http://127.0.0.1:8000", "api_tokens": ""},
        allow_insecure_callbacks=True,
        auth_disabled=True,
    )
    assert settings.auth_disabled


def test_the_service_refuses_to_start_with_one_line(tmp_path: Path) -> None:
    """`imagetasks serve` without WEBHOOK_SECRET exits 2 with a one-line reason."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WEBHOOK", "API_", "PUBLIC"))}
    script = Path(sys.executable).parent / "imagetasks"
    result = subprocess.run(
        [str(script), "serve", "--port", "1"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "imagetasks: WEBHOOK_SECRET is required (it signs the callback URLs)"
    ]
