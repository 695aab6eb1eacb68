"""Saturated throughput: wrk (Debian's package) when installed, else the Python closed loop."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

from bench import loadgen
from bench.stats import summarize

LUA = Path(__file__).with_name("callbacks.lua")
CONNECTIONS = 16


def wrk_path() -> str | None:
    return shutil.which("wrk")


def tool_name() -> str:
    """What measures saturation in this run."""
    return "wrk" if wrk_path() else "python closed loop (bench/loadgen.py)"


def read_entries(datafile: Path, prefix: str | None) -> list[bytes]:
    """The same requests as the wrk script builds, for the Python generators."""
    requests = []
    webhook = "/webhooks/starmagic"
    for line in datafile.read_text().splitlines():
        path, _, body = line.partition("\t")
        if prefix:
            path = prefix + path[len(webhook) :]
        headers = {"Content-Type": "application/json", "User-Agent": "StarMagic-Callback/bench"}
        requests.append(loadgen.build_request("POST", path, body.encode(), headers))
    return requests


def saturate(port: int, datafile: Path, *, prefix: str | None, duration: float) -> dict[str, Any]:
    """Requests per second with CONNECTIONS keep-alive connections, as fast as they go."""
    wrk = wrk_path()
    if wrk is None:
        result = loadgen.closed_loop(
            port, read_entries(datafile, prefix), duration=duration, connections=CONNECTIONS
        )
        return {
            "rps": round(result.achieved_rate, 1),
            "requests": result.completed,
            "non_2xx": result.non_2xx,
            "errors": result.errors,
            "latency": summarize(result.latencies),
        }
    command = [
        wrk,
        "-t1",
        f"-c{CONNECTIONS}",
        f"-d{duration:g}s",
        "--timeout",
        "10s",
        "-s",
        str(LUA),
        f"http://127.0.0.1:{port}/",
        "--",
        str(datafile),
        prefix or "",
    ]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    line = next(ln for ln in output.splitlines() if ln.startswith("BENCH_JSON "))
    data = json.loads(line.removeprefix("BENCH_JSON "))
    seconds = data["duration_us"] / 1e6
    lat = data["latency_us"]
    errors = data["errors"]
    return {
        "rps": round(data["requests"] / seconds, 1),
        "requests": data["requests"],
        "non_2xx": errors["status"],
        "errors": errors["connect"] + errors["read"] + errors["write"] + errors["timeout"],
        "latency": {
            "p50_ms": lat["p50"] / 1000,
            "p90_ms": lat["p90"] / 1000,
            "p99_ms": lat["p99"] / 1000,
            "max_ms": lat["max"] / 1000,
        },
    }


def wrk_version() -> str | None:
    wrk = wrk_path()
    if wrk is None:
        return None
    # wrk prints its version on stdout with the usage text and exits non-zero.
    out = subprocess.run([wrk, "--version"], capture_output=True, text=True, check=False)
    return (out.stdout or out.stderr).splitlines()[0].strip()
