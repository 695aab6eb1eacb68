"""The deployment files agree with the settings they configure."""

from __future__ import annotations

import ipaddress
import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

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


def _compose() -> dict[str, Any]:
    compose: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return compose


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines()]
    pairs = [tuple(line.split(None, 1)) for line in lines if line and not line.startswith("#")]
    return [(pair[0].upper(), pair[1] if len(pair) > 1 else "") for pair in pairs]


def test_migrations_run_once_before_the_replicas() -> None:
    """A one-shot `migrate` service; the API and the worker wait for it to succeed."""
    services = _compose()["services"]
    assert services["migrate"]["command"] == ["imagetasks", "migrate"]
    assert services["migrate"]["depends_on"]["db"] == {"condition": "service_healthy"}
    for name in ("api", "worker"):
        wait = services[name]["depends_on"]["migrate"]
        assert wait == {"condition": "service_completed_successfully"}
        assert "migrate" not in " ".join(services[name].get("command", []))
    # The image's own command only serves: replicas never migrate on start.
    cmd = next(args for name, args in _dockerfile_instructions() if name == "CMD")
    assert "migrate" not in cmd
    assert json.loads(cmd)[:2] == ["imagetasks", "serve"]


def test_compose_images_are_pinned() -> None:
    """Every third-party image names a tag other than `latest`; ours is built and tagged."""
    for name, service in _compose()["services"].items():
        image = service["image"]
        tag = image.rsplit("/", 1)[-1].partition(":")[2]
        assert tag, f"{name}: {image} has no tag"
        assert tag != "latest", f"{name}: {image}"
    for name in ("migrate", "api", "worker"):
        assert _compose()["services"][name]["build"] == "."


def test_trusted_proxies_match_the_proxy_the_api_sees() -> None:
    """TRUSTED_PROXIES is the compose network's gateway, where the host's proxy comes from."""
    compose = _compose()
    default = re.fullmatch(
        r"\$\{TRUSTED_PROXIES:-(.+)\}", compose["x-imagetasks-env"]["TRUSTED_PROXIES"]
    )
    assert default is not None
    (network,) = compose["networks"]["default"]["ipam"]["config"]
    subnet = ipaddress.ip_network(network["subnet"])
    proxies = [ipaddress.ip_address(value) for value in default[1].split(",")]
    assert proxies == [ipaddress.ip_address(network["gateway"])]
    assert all(proxy in subnet for proxy in proxies)
    # Only the host (where the proxy runs) reaches the API's port.
    assert compose["services"]["api"]["ports"] == ["127.0.0.1:8000:8000"]


def test_dockerfile_is_multi_stage_from_the_lock_with_a_healthcheck() -> None:
    """A build-arg base, a build stage installing the hashed lock, non-root, HEALTHCHECK."""
    instructions = _dockerfile_instructions()
    assert instructions[0] == ("ARG", "PYTHON_IMAGE=python:3.11-slim")
    froms = [args for name, args in instructions if name == "FROM"]
    assert froms == ["${PYTHON_IMAGE} AS build", "${PYTHON_IMAGE}"]
    runs = " ".join(args for name, args in instructions if name == "RUN")
    assert "pip install --require-hashes -r /src/requirements.lock" in runs
    assert "--no-deps --no-build-isolation /src" in runs
    assert " -e " not in runs  # a regular install, not an editable one
    final = instructions[[name for name, _ in instructions].index("FROM", 2) :]
    assert ("COPY", "--from=build /opt/venv /opt/venv") in final
    users = [args for name, args in final if name == "USER"]
    assert users == ["imagetasks"]
    (healthcheck,) = [args for name, args in final if name == "HEALTHCHECK"]
    assert "/readyz" in healthcheck
    assert "127.0.0.1:8000" in healthcheck
    cmd = json.loads(next(args for name, args in final if name == "CMD"))
    assert cmd[cmd.index("--port") + 1] == "8000"


def test_dockerignore_keeps_secrets_and_local_state_out_of_the_context() -> None:
    """Everything is ignored but what the Dockerfile copies: no .env, .venv or var/."""
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    copied = set()
    for name, args in _dockerfile_instructions():
        if name == "COPY" and not args.startswith("--from"):
            copied.update(source.rstrip("/") for source in args.split()[:-1])
    assert copied == allowed
    assert not {".env", ".venv", "var", ".git", "tests"} & allowed
    for source in copied:
        assert (ROOT / source).exists(), source


def test_the_wheel_ships_the_consoles_templates_and_static_files(tmp_path: Path) -> None:
    """An installed service (the container image) has every console template and asset."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("imagetasks-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        shipped = set(archive.namelist())
    console = ROOT / "app" / "console"
    wanted = {
        path.relative_to(ROOT).as_posix()
        for folder in ("templates", "static")
        for path in (console / folder).iterdir()
    }
    assert wanted
    assert wanted <= shipped


def _locked_names(lock: str) -> set[str]:
    text = (ROOT / lock).read_text()
    return {name.lower() for name in re.findall(r"(?m)^([A-Za-z0-9_.-]+)==", text)}


def test_make_run_installs_only_what_running_needs() -> None:
    """`make run` installs requirements.lock, which holds no test or lint tool."""
    makefile = (ROOT / "Makefile").read_text()
    run_target = re.search(r"(?m)^run: (.*?)##", makefile)
    assert run_target is not None
    assert run_target.group(1).split() == ["$(BIN)/.installed-run"]
    stamp = re.search(r"(?m)^\$\(BIN\)/\.installed-run: .*\n\t\$\(call install,([^,]+),", makefile)
    assert stamp is not None
    assert stamp.group(1) == "requirements.lock"
    dev_tools = {"pytest", "ruff", "mypy", "moto", "matplotlib", "schemathesis", "playwright"}
    assert _locked_names("requirements.lock") & dev_tools == set()
    assert _locked_names("requirements-dev.lock") >= dev_tools
