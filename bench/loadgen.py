"""A small HTTP/1.1 load generator on asyncio (uvloop) for loopback benchmarks.

Open loop (`open_loop`): requests are scheduled at a constant rate, whatever the
server does, and each latency is measured from the request's *scheduled* time,
so a stalled server shows up in the percentiles instead of slowing the
generator down (no coordinated omission). Requests are pre-built bytes, sent
over a fixed set of keep-alive connections.

Closed loop (`closed_loop`): each connection sends its next request as soon as
the previous answer arrived; only used to find the saturating rate when `wrk`
is not installed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import uvloop


def build_request(
    method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
) -> bytes:
    """The bytes of one HTTP/1.1 keep-alive request."""
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


@dataclass
class LoadResult:
    """What one run measured; latencies in seconds."""

    offered_rate: float | None
    duration: float
    latencies: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    errors: int = 0
    unfinished: int = 0
    generator_cpu_seconds: float = 0.0

    @property
    def completed(self) -> int:
        return len(self.latencies)

    @property
    def achieved_rate(self) -> float:
        return self.completed / self.duration if self.duration else 0.0

    @property
    def non_2xx(self) -> int:
        return sum(count for status, count in self.statuses.items() if not 200 <= status < 300)


async def _read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
            break
    if length:
        await reader.readexactly(length)
    return status


class _Connection:
    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def exchange(self, raw: bytes) -> int:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        self.writer.write(raw)
        return await _read_response(self.reader)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


async def _exchange(
    connection: _Connection, raw: bytes, started: float, result: LoadResult
) -> None:
    """One request and its answer, recorded with its latency from `started`."""
    try:
        status = await connection.exchange(raw)
    except (OSError, asyncio.IncompleteReadError, ValueError):
        result.errors += 1
        connection.close()
        return
    result.latencies.append(time.perf_counter() - started)
    result.statuses[status] = result.statuses.get(status, 0) + 1


async def _open_loop(
    host: str,
    port: int,
    requests: Sequence[bytes],
    rate: float,
    duration: float,
    connections: int,
    drain_timeout: float,
) -> LoadResult:
    total = int(rate * duration)
    result = LoadResult(offered_rate=rate, duration=duration)
    queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()

    async def worker() -> None:
        connection = _Connection(host, port)
        try:
            while (item := await queue.get()) is not None:
                scheduled, raw = item
                await _exchange(connection, raw, scheduled, result)
        finally:
            connection.close()

    workers = [asyncio.create_task(worker()) for _ in range(connections)]
    cpu = time.process_time()
    start = time.perf_counter() + 0.05
    for k in range(total):
        scheduled = start + k / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        queue.put_nowait((scheduled, requests[k % len(requests)]))
    for _ in workers:
        queue.put_nowait(None)
    _, pending = await asyncio.wait(workers, timeout=drain_timeout)
    for task in pending:
        task.cancel()
    result.generator_cpu_seconds = time.process_time() - cpu
    result.unfinished = total - result.completed - result.errors
    return result


async def _closed_loop(
    host: str, port: int, requests: Sequence[bytes], duration: float, connections: int
) -> LoadResult:
    result = LoadResult(offered_rate=None, duration=duration)
    counter = iter(range(1 << 62))
    deadline = time.perf_counter() + duration

    async def worker() -> None:
        connection = _Connection(host, port)
        try:
            while time.perf_counter() < deadline:
                raw = requests[next(counter) % len(requests)]
                await _exchange(connection, raw, time.perf_counter(), result)
        finally:
            connection.close()

    cpu = time.process_time()
    await asyncio.gather(*(worker() for _ in range(connections)))
    result.generator_cpu_seconds = time.process_time() - cpu
    return result


def open_loop(
    port: int,
    requests: Sequence[bytes],
    *,
    rate: float,
    duration: float,
    connections: int = 32,
    host: str = "127.0.0.1",
) -> LoadResult:
    """Send `rate` requests per second for `duration` seconds; latency from the schedule."""
    return uvloop.run(
        _open_loop(host, port, requests, rate, duration, connections, drain_timeout=duration + 30)
    )


def closed_loop(
    port: int,
    requests: Sequence[bytes],
    *,
    duration: float,
    connections: int = 16,
    host: str = "127.0.0.1",
) -> LoadResult:
    """As fast as `connections` keep-alive connections go, for `duration` seconds."""
    return uvloop.run(_closed_loop(host, port, requests, duration, connections))
