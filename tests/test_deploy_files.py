"""The deployment files agree with the settings they configure."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from app.config import Settings

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = {name.upper() for name in Settings.model_fields}


def test_env_example_documents_every_setting() -> None:
    """.env.example names each variable, commented or not, and nothing unknown."""
    text = (ROOT / ".env.example").read_text()
    named = set(re.findall(r"^#?\s?([A-Z][A-Z0-9_]+)=", text, flags=re.MULTILINE))
    assert named >= SETTINGS
    assert named - SETTINGS <= {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION"}


def test_compose_parses_and_sets_only_real_settings() -> None:
    """Every imagetasks variable in docker-compose.yml is a setting the service reads."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    env = compose["x-imagetasks-env"]
    unknown = {name for name in env if name not in SETTINGS and not name.startswith("AWS_")}
    assert unknown == set()
    assert {"DATABASE_URL", "STORAGE_URL", "PUBLIC_BASE_URL", "WEBHOOK_SECRET"} <= set(env)
    assert env["DATABASE_URL"].startswith("postgresql+asyncpg://")
    assert env["STORAGE_URL"].startswith("s3://")
    assert compose["services"]["worker"]["command"] == ["imagetasks", "worker"]


def test_dockerfile_migrates_then_serves_like_the_readme() -> None:
    """The image runs the README's production steps, from the hashed lock."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "--require-hashes -r requirements.lock" in dockerfile
    assert "imagetasks migrate && exec imagetasks serve" in dockerfile
    assert "imagetasks migrate" in readme
    assert "imagetasks serve" in readme
