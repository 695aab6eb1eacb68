"""Child processes of the benchmark: start, wait until they answer, wait until idle, stop."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import httpx
import psutil

from app.config import Settings

PYTHON = sys.executable
ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 30.0
# Every setting the service reads is cleared from the inherited environment,
# so the shell that runs `make bench` cannot change what is measured.
_SETTING_NAMES = {name.upper() for name in Settings.model_fields}


def clean_env(values: Mapping[str, object]) -> dict[str, str]:
    """The inherited environment without service settings, plus `values`."""
    env = {k: v for k, v in os.environ.items() if k not in _SETTING_NAMES}
    for name, value in values.items():
        env[name.upper()] = str(value).lower() if isinstance(value, bool) else str(value)
    env["PYTHONUNBUFFERED"] = "1"
    # Children run in a scratch directory (no .env there); `bench` must still import.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


class Child:
    """One `python -m bench.launcher ...` (or any command), its output in a log file."""

    def __init__(self, name: str, args: list[str], env: Mapping[str, str], workdir: Path) -> None:
        self.name = name
        self.args = args
        self.env = dict(env)
        self.workdir = workdir
        self.log_path = workdir / f"{name}.log"
        self.popen: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.popen is not None, f"{self.name} is not running"
        return self.popen.pid

    def start(self) -> Child:
        with self.log_path.open("ab") as log:
            self.popen = subprocess.Popen(
                self.args,
                cwd=self.workdir,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        return self

    def check_alive(self) -> None:
        if self.popen is not None and self.popen.poll() is not None:
            tail = self.log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{self.name} exited with {self.popen.returncode}:\n{tail}")

    def wait_http(self, url: str, timeout: float = START_TIMEOUT) -> None:
        """Poll `url` until it answers 200."""
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            try:
                if httpx.get(url, timeout=2, trust_env=False).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not answer {url} within {timeout:.0f} s")
            time.sleep(0.1)

    def wait_idle(
        self, threshold: float = 0.05, window: float = 0.5, timeout: float = 60.0
    ) -> float:
        """Wait until the process uses under `threshold` of a core for `window` seconds.

        Deferred work (callback confirmations) must not leak into the next measurement.
        Returns the seconds waited.
        """
        process = psutil.Process(self.pid)
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            before = sum(process.cpu_times()[:2])
            time.sleep(window)
            if (sum(process.cpu_times()[:2]) - before) / window < threshold:
                break
        return time.monotonic() - started

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Stopped (SIGSTOP) for the block, then continued, whatever the block raised."""
        os.kill(self.pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.kill(self.pid, signal.SIGCONT)

    def cpu_seconds(self) -> float:
        """User plus system CPU time used so far."""
        times = psutil.Process(self.pid).cpu_times()
        return float(times.user + times.system)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM, then SIGKILL if it lingers."""
        if self.popen is None or self.popen.poll() is not None:
            return
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
