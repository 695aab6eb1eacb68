"""Sandbox mode: the service and a StarMagic simulator in one process, with
no configuration. Never used unless `imagetasks serve --sandbox` asks for it."""

from __future__ import annotations

import secrets
from pathlib import Path

from dotenv import dotenv_values

from app.config import Settings, check_env_file, load_settings
from app.simulator import SimulatorConfig

SIMULATOR_PREFIX = "/_sandbox/starmagic"
SIMULATOR_KEY = "sandbox-key"
ENV_FILE = Path(".env")


def ensure_env_file(path: Path = ENV_FILE) -> bool:
    """Write a local `.env` with fresh random secrets unless one exists; True if written."""
    if path.exists():
        return False
    path.write_text(
        "# Written by `imagetasks serve --sandbox` for local use; see .env.example.\n"
        f"API_TOKENS={secrets.token_urlsafe(24)}\n"
        f"WEBHOOK_SECRET={secrets.token_urlsafe(32)}\n",
        encoding="utf-8",
    )
    path.chmod(0o600)
    return True


def prepare_sandbox(host: str, port: int) -> tuple[Settings, SimulatorConfig]:
    """Settings pointing at the mounted simulator, and the simulator's own config."""
    ensure_env_file()
    check_env_file(str(ENV_FILE))
    local = {k: v for k, v in dotenv_values(ENV_FILE).items() if v}
    origin = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    settings = load_settings(
        api_tokens=local.get("API_TOKENS") or secrets.token_urlsafe(24),
        webhook_secret=local.get("WEBHOOK_SECRET") or secrets.token_urlsafe(32),
        auth_disabled=False,
        starmagic_base_url=origin + SIMULATOR_PREFIX,
        starmagic_api_key=SIMULATOR_KEY,
        public_base_url=origin,
        allow_insecure_callbacks=True,
        download_allow_private_networks=True,
        reconcile_after_seconds=20,
        reconcile_interval_seconds=5,
        # Webhooks to a receiver on this machine (the demo's, `imagetasks listen`'s target).
        webhook_allowed_networks="127.0.0.0/8,::1",
    )
    simulator = SimulatorConfig(
        api_key=SIMULATOR_KEY,
        public_base_url=origin + SIMULATOR_PREFIX,
        # StarMagic's 100 s estimate plays out in 3 s: long enough to see the
        # task pending and processing, short enough for a first try.
        time_scale=0.03,
        allow_http_callbacks=True,
    )
    return settings, simulator


def banner(settings: Settings) -> str:
    """What to paste to try the sandbox."""
    origin = settings.public_base_url
    token = settings.api_tokens[0]
    return (
        "\nimagetasks sandbox: StarMagic is simulated in this process.\n"
        f"  API token: {token}\n"
        "  Try it:\n"
        f"    curl -s -X POST {origin}/tasks -H 'Authorization: Bearer {token}' \\\n"
        "         -H 'Content-Type: application/json' -d '{\"prompt\": \"a lighthouse at dawn\"}'\n"
        f"    curl -s {origin}/tasks/<id> -H 'Authorization: Bearer {token}'\n"
        f"  API docs: {origin}/docs\n"
        f"  Console:  {origin}/console (sign in with the API token)\n"
    )
