"""Running the `imagetasks` command as a subprocess, and the sandbox it talks to."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx

from app.config import Settings

IMAGETASKS = str(Path(sys.executable).with_name("imagetasks"))
# The runner's own settings and client variables must not leak into the processes.
_CLEARED = {name.upper() for name in Settings.model_fields} | {"IMAGETASKS_URL", "IMAGETASKS_TOKEN"}


def clean_env(**extra: str) -> dict[str, str]:
    """The inherited environment without imagetasks settings, plus `extra`."""
    env = {key: value for key, value in os.environ.items() if key not in _CLEARED}
    return {**env, "COLUMNS": "200", **extra}


@dataclass(frozen=True)
class Sandbox:
    """A running sandbox service: where it listens, its token, its directory."""

    url: str
    token: str
    directory: Path

    def run(self, *args: str, token: str | None = None, timeout: float = 30) -> Result:
        """`imagetasks ARGS` pointed at this sandbox through the environment."""
        env = clean_env(IMAGETASKS_URL=self.url, IMAGETASKS_TOKEN=token or self.token)
        return run_cli(*args, env=env, cwd=self.directory, timeout=timeout)

    def api(self, path: str) -> httpx.Response:
        """A direct, authenticated GET on the service."""
        headers = {"Authorization": f"Bearer {self.token}"}
        return httpx.get(self.url + path, headers=headers, timeout=10)


@dataclass(frozen=True)
class Result:
    """What one `imagetasks` run returned and printed."""

    code: int
    stdout: str
    stderr: str

    def field(self, label: str) -> str:
        """The value of a `label value` line on stdout."""
        for line in self.stdout.splitlines():
            name, _, value = line.partition(" ")
            if name == label:
                return value.strip()
        raise AssertionError(f"no {label!r} line in:\n{self.stdout}\n{self.stderr}")


def run_cli(*args: str, env: dict[str, str], cwd: Path, timeout: float = 30) -> Result:
    """Run the installed `imagetasks` script and capture what it printed."""
    done = subprocess.run(
        [IMAGETASKS, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )
    return Result(done.returncode, done.stdout, done.stderr)
