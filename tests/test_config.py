"""Settings: every impossible setting stops the service, all of them reported at once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from dotenv import dotenv_values

from app.config import SettingsError, load_settings

ROOT = Path(__file__).resolve().parent.parent
GOOD: dict[str, Any] = {
    "starmagic_api_key": "sk-live-0123456789",
    "webhook_secret": "s" * 32,
    "public_base_url": "https://hooks.imagetasks.internal/imagetasks",
    "api_tokens": "token-one-0123456789,token-two-0123456789",
}
SETTING_PREFIXES = ("WEBHOOK", "API_", "PUBLIC", "STARMAGIC", "LOG_", "ROOT_", "TRUSTED")


def test_good_settings_load_and_split_lists() -> None:
    """Comma-separated secrets and tokens become lists; the first secret signs."""
    settings = load_settings(**{**GOOD, "webhook_secret": "a" * 20 + "," + "b" * 20})
    assert settings.api_tokens == ["token-one-0123456789", "token-two-0123456789"]
    assert settings.signing_secret == "a" * 20
    assert settings.public_base_url == "https://hooks.imagetasks.internal/imagetasks"


@pytest.mark.parametrize(
    ("override", "reason"),
    [
        ({"starmagic_api_key": ""}, "STARMAGIC_API_KEY: is required"),
        ({"starmagic_api_key": "  "}, "STARMAGIC_API_KEY: is required"),
        ({"starmagic_api_key": "change-me"}, "STARMAGIC_API_KEY: is a placeholder"),
        ({"webhook_secret": ""}, "WEBHOOK_SECRET: is required"),
        ({"webhook_secret": "short"}, "at least 16 characters"),
        ({"webhook_secret": "changeme-changeme-changeme"}, "WEBHOOK_SECRET: is a placeholder"),
        ({"public_base_url": ""}, "PUBLIC_BASE_URL: is required"),
        ({"public_base_url": "http://hooks.imagetasks.internal"}, "must be https://"),
        ({"public_base_url": "ftp://x"}, "PUBLIC_BASE_URL: must be an http(s) URL"),
        ({"public_base_url": "https://imagetasks.example.com"}, "example's placeholder"),
        ({"public_base_url": "https://example.org/x"}, "example's placeholder"),
        ({"public_base_url": "https://hooks.test/cb?x=1"}, "PUBLIC_BASE_URL: no query"),
        ({"public_base_url": "https://hooks.test/cb#top"}, "PUBLIC_BASE_URL: no query"),
        ({"public_base_url": "https://user:pw@hooks.test"}, "PUBLIC_BASE_URL: no user"),
        ({"public_base_url": "https://:443"}, "PUBLIC_BASE_URL: must be an http(s) URL"),
        ({"public_base_url": "https://hooks.test:99999"}, "PUBLIC_BASE_URL: the port"),
        ({"public_base_url": "https://hooks.test/a b"}, "PUBLIC_BASE_URL: no spaces"),
        ({"root_path": "//imagetasks"}, "ROOT_PATH: "),
        ({"api_tokens": ""}, "API_TOKENS: is required"),
        ({"api_tokens": "good-token-0123456789,change-me"}, "API_TOKENS: holds a placeholder"),
        ({"api_tokens": "good-token-0123456789,abc"}, "API_TOKENS: every token needs at least 16"),
        ({"database_url": "postgresql://db/x"}, "DATABASE_URL: use an async driver"),
        ({"database_url": "mysql://db/x"}, "DATABASE_URL: must start with"),
        ({"storage_url": "ftp://bucket"}, "STORAGE_URL: must be file://"),
        ({"storage_url": "s3://"}, "STORAGE_URL: must be file://"),
        ({"max_image_bytes": 0}, "MAX_IMAGE_BYTES"),
        ({"reconcile_interval_seconds": -1}, "RECONCILE_INTERVAL_SECONDS"),
        ({"log_level": "LOUD"}, "LOG_LEVEL: must be one of CRITICAL, ERROR, WARNING, INFO"),
        ({"root_path": "imagetasks"}, "ROOT_PATH: must start with a slash (/imagetasks)"),
        ({"trusted_proxies": "10.0.0.1,proxy.lan"}, "TRUSTED_PROXIES: not IP addresses"),
        ({"trusted_proxies": "10.0.0.0/33"}, "'10.0.0.0/33'"),
    ],
)
def test_impossible_settings_give_one_line_reasons(override: dict[str, Any], reason: str) -> None:
    """Each impossible setting is refused with a single line naming it."""
    with pytest.raises(SettingsError) as caught:
        load_settings(**{**GOOD, **override})
    assert len(caught.value.problems) == 1
    assert reason in caught.value.problems[0]
    assert "\n" not in caught.value.problems[0]


def test_every_problem_is_reported_at_once() -> None:
    """Several bad settings give one line each in one error, not one per restart."""
    with pytest.raises(SettingsError) as caught:
        load_settings(
            starmagic_api_key="",
            webhook_secret="",
            public_base_url="",
            api_tokens="",
            log_level="chatty",
            trusted_proxies="nginx",
            root_path="api",
        )
    fields = [line.split(":")[0] for line in caught.value.problems]
    assert fields == [
        "STARMAGIC_API_KEY",
        "PUBLIC_BASE_URL",
        "WEBHOOK_SECRET",
        "API_TOKENS",
        "LOG_LEVEL",
        "ROOT_PATH",
        "TRUSTED_PROXIES",
    ]


def test_opt_ins_make_local_settings_possible() -> None:
    """http callbacks and no tokens are allowed only with their explicit opt-ins."""
    settings = load_settings(
        **{**GOOD, "public_base_url": "http://127.0.0.1:8000", "api_tokens": ""},
        allow_insecure_callbacks=True,
        auth_disabled=True,
    )
    assert settings.auth_disabled
    assert settings.public_base_url == "http://127.0.0.1:8000"


def test_levels_proxies_and_prefixes_are_normalised() -> None:
    """A lower-case level, IPs and networks, and a trailing slash on ROOT_PATH are accepted."""
    settings = load_settings(
        **GOOD, log_level="debug", trusted_proxies="10.0.0.0/8, ::1,*", root_path="/api/"
    )
    assert settings.log_level == "DEBUG"
    assert settings.trusted_proxies == ["10.0.0.0/8", "::1", "*"]
    assert settings.root_path == "/api"


def _serve(cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """`imagetasks serve` in `cwd` with only `env` as settings."""
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(SETTING_PREFIXES)}
    script = Path(sys.executable).parent / "imagetasks"
    return subprocess.run(
        [str(script), "serve", "--port", "1"],
        cwd=cwd,
        env={**inherited, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_service_refuses_to_start_listing_each_missing_setting(tmp_path: Path) -> None:
    """`imagetasks serve` with nothing configured exits 2 with one line per setting."""
    result = _serve(tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "imagetasks: STARMAGIC_API_KEY: is required: every submission would fail without it",
        "imagetasks: PUBLIC_BASE_URL: is required: StarMagic calls back there",
        "imagetasks: WEBHOOK_SECRET: is required: it signs the callback URLs",
        "imagetasks: API_TOKENS: is required (or AUTH_DISABLED=true, for local use only)",
    ]


def test_the_example_env_file_is_refused_as_is(tmp_path: Path) -> None:
    """A copied .env.example, unedited, cannot start the service: its placeholders are named."""
    (tmp_path / ".env").write_text((ROOT / ".env.example").read_text())
    result = _serve(tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert any(line.startswith("imagetasks: STARMAGIC_API_KEY:") for line in lines)
    assert any("PUBLIC_BASE_URL: imagetasks.example.com is the example's" in li for li in lines)
    assert not any("Traceback" in line for line in lines)
    example = dotenv_values(ROOT / ".env.example")
    assert set(example) >= {"STARMAGIC_API_KEY", "PUBLIC_BASE_URL", "WEBHOOK_SECRET"}


def test_an_unknown_log_level_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    """LOG_LEVEL=LOUD stops the service with one line, whatever else is right."""
    result = _serve(
        tmp_path,
        STARMAGIC_API_KEY=GOOD["starmagic_api_key"],
        WEBHOOK_SECRET=GOOD["webhook_secret"],
        PUBLIC_BASE_URL=GOOD["public_base_url"],
        API_TOKENS=GOOD["api_tokens"],
        LOG_LEVEL="LOUD",
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "imagetasks: LOG_LEVEL: must be one of CRITICAL, ERROR, WARNING, INFO, DEBUG, not 'LOUD'"
    ]


@pytest.mark.parametrize(
    "command",
    [["serve", "--port", "1"], ["serve", "--sandbox", "--port", "1"], ["worker"], ["migrate"]],
)
def test_a_dotenv_that_is_not_utf8_is_one_line_not_a_traceback(
    tmp_path: Path, command: list[str]
) -> None:
    """A .env saved in Latin-1 (an editor's choice) is named, with the byte, on one line."""
    (tmp_path / ".env").write_bytes(b"STARMAGIC_API_KEY=cl\xe9\n")
    script = Path(sys.executable).with_name("imagetasks")
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(SETTING_PREFIXES)}
    inherited.pop("DATABASE_URL", None)
    result = subprocess.run(
        [str(script), *command],
        cwd=tmp_path,
        env=inherited,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("imagetasks: .env: not UTF-8 text (byte 0xe9 on line 1")


def test_a_dotenv_line_that_does_not_parse_is_named_with_the_other_problems(
    tmp_path: Path,
) -> None:
    """An unterminated quote loses its setting: the line is named (not its secret value),
    alongside every other problem, once, in the service's own words."""
    (tmp_path / ".env").write_text(
        f"STARMAGIC_API_KEY={GOOD['starmagic_api_key']}\n"
        'WEBHOOK_SECRET="s3cr3t-value-never-printed\n'
        f"PUBLIC_BASE_URL={GOOD['public_base_url']}\n"
    )
    result = _serve(tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "imagetasks: .env line 2: cannot be parsed (NAME=value, quotes closed); "
        "its setting is ignored",
        "imagetasks: WEBHOOK_SECRET: is required: it signs the callback URLs",
        "imagetasks: API_TOKENS: is required (or AUTH_DISABLED=true, for local use only)",
    ]


def test_log_format_is_read_like_log_level() -> None:
    """LOG_LEVEL=debug works, so LOG_FORMAT=JSON (or with stray spaces) works too."""
    assert load_settings(**GOOD, log_format="JSON").log_format == "json"
    assert load_settings(**GOOD, log_format=" Console ").log_format == "console"
