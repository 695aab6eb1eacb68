"""A static file server for the download benchmark: asyncio plus os.sendfile.

Zero-copy, so the server is never what limits a loopback download; the
service's worker and curl fetch the very same URLs from it. `--rate` paces the
body instead (bytes per second): a link like a real network's.
`python -m bench.fileserver --port N --root DIR [--rate BYTES_PER_S]`
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path
from typing import BinaryIO

_PACE_CHUNK = 256 * 1024


async def _paced(writer: asyncio.StreamWriter, body: BinaryIO, rate: float) -> None:
    """Send the body at `rate` bytes per second, a chunk at a time."""
    started = time.monotonic()
    sent = 0
    while chunk := body.read(_PACE_CHUNK):
        writer.write(chunk)
        await writer.drain()
        sent += len(chunk)
        ahead = sent / rate - (time.monotonic() - started)
        if ahead > 0:
            await asyncio.sleep(ahead)


async def _handle(
    root: Path, rate: float, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            method, target, _ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
            path = root / target.lstrip("/").split("?", 1)[0]
            if method != "GET" or not path.is_file() or path.parent != root:
                writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
                await writer.drain()
                continue
            size = path.stat().st_size
            reply = f"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: {size}\r\n\r\n"
            writer.write(reply.encode())
            await writer.drain()
            with path.open("rb") as body:
                if rate:
                    await _paced(writer, body, rate)
                else:
                    await asyncio.get_running_loop().sendfile(writer.transport, body)
    except (asyncio.IncompleteReadError, ConnectionError, ValueError):
        pass
    finally:
        writer.close()


async def _serve(port: int, root: Path, rate: float) -> None:
    server = await asyncio.start_server(
        lambda r, w: _handle(root, rate, r, w), "127.0.0.1", port, reuse_address=True
    )
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.fileserver")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--rate", type=float, default=0.0, help="bytes/s; 0: as fast as it goes")
    args = parser.parse_args()
    # The default loop: uvloop has no loop.sendfile.
    asyncio.run(_serve(args.port, args.root.resolve(), args.rate))


if __name__ == "__main__":
    main()
