"""The safe image fetch: address checks, limits, redirects and errors, over real sockets."""

from __future__ import annotations

import asyncio
import datetime as dt
import email.utils
import gc
import hashlib
import io
import ssl
import struct
import zlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil  # type: ignore[import-untyped]
import pytest
import pytest_asyncio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from PIL import Image

from app.fetch import FetchError, SafeFetcher, address_allowed
from app.fetch_errors import MAX_RETRY_AFTER_SECONDS, status_error

MB = 1 << 20


def image_bytes(fmt: str, size: tuple[int, int] = (37, 23)) -> bytes:
    """A real image of `size` in the Pillow format `fmt`."""
    out = io.BytesIO()
    Image.new("RGB", size, (10, 120, 240)).save(out, format=fmt)
    return out.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk: length, type, data and CRC."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


PNG = image_bytes("PNG")
IMAGES = {"png": PNG, "jpeg": image_bytes("JPEG"), "webp": image_bytes("WEBP")}
# A whole PNG (signature, header, IEND) whose header declares 9000 x 9000 pixels (81 million).
BOMB = (
    b"\x89PNG\r\n\x1a\n"
    + png_chunk(b"IHDR", struct.pack(">IIBBBBB", 9_000, 9_000, 8, 2, 0, 0, 0))
    + png_chunk(b"IEND", b"")
)


class MapResolver:
    """Resolves names from a table and counts the lookups."""

    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table = table
        self.calls: list[str] = []

    async def resolve(self, host: str, port: int) -> list[str]:
        """The table's addresses for `host`."""
        self.calls.append(host)
        return self.table[host]


# --- a tiny HTTP/1.1 server whose every misbehaviour is on purpose ----------------------

Writer = asyncio.StreamWriter


def head(status: int, headers: dict[str, str | int]) -> bytes:
    """A response head that always closes the connection."""
    lines = [f"HTTP/1.1 {status} X", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def send(w: Writer, status: int, body: bytes = b"", **headers: str | int) -> None:
    """A whole response with a truthful Content-Length."""
    w.write(head(status, {"Content-Length": len(body), **headers}) + body)
    await w.drain()


async def padded_png(w: Writer, total: int, *, length: bool) -> None:
    """A real PNG followed by zeros up to `total` bytes, sent in 64 KiB pieces."""
    w.write(head(200, {"Content-Length": total} if length else {}) + PNG)
    zeros, left = bytes(64 * 1024), total - len(PNG)
    while left > 0:
        w.write(zeros[: min(left, len(zeros))])
        left -= len(zeros)
        await w.drain()


async def route(r: asyncio.StreamReader, w: Writer, path: str) -> None:
    """Answer `path`; the first segment names the behaviour, the rest its argument."""
    name, _, arg = path.strip("/").partition("/")
    if name in IMAGES:
        await send(w, 200, IMAGES[name], **{"Content-Type": "application/octet-stream"})
    elif name == "html":
        await send(w, 200, b"<html>not an image</html>", **{"Content-Type": "image/png"})
    elif name == "r":  # /r/N redirects N times, then serves a PNG
        n = int(arg)
        await (send(w, 302, Location=f"/r/{n - 1}") if n else send(w, 200, PNG))
    elif name == "to":  # /to/<location>
        await send(w, 302, Location=arg)
    elif name == "status":
        await send(w, int(arg), b"{}", **{"Retry-After": "7"})
    elif name == "cookie":  # a PNG that tries to set a cookie for later downloads
        await send(w, 200, PNG, **{"Set-Cookie": "session=secret; Path=/"})
    elif name == "located":  # a 200 that carries a Location header anyway
        await send(w, 200, PNG, Location="/html")
    elif name == "bomb":
        await send(w, 200, BOMB)
    elif name == "short":  # /short/<body>: fewer bytes than it takes to tell a type
        await send(w, 200, arg.encode())
    elif name == "text":  # /text/N: N bytes of text, no Content-Length
        w.write(head(200, {}) + b"a" * int(arg))
        await w.drain()
    elif name == "declared":  # claims a huge body, sends only the start of it
        w.write(head(200, {"Content-Length": int(arg)}) + PNG[:16])
        await w.drain()
        await asyncio.wait_for(r.read(), 5)  # until the client hangs up
    elif name == "cut":  # /cut/<kind>: no Content-Length, connection closed mid-image
        body = IMAGES[arg]
        w.write(head(200, {}) + body[: len(body) * 2 // 3])
        await w.drain()
    elif name in ("sized", "unsized"):
        await padded_png(w, int(arg), length=name == "sized")
    elif name == "slow":  # trickles a byte every `arg` seconds
        w.write(head(200, {"Content-Length": len(PNG)}))
        for i in range(len(PNG)):
            if r.at_eof() or w.is_closing():  # the client gave up
                return
            w.write(PNG[i : i + 1])
            await w.drain()
            await asyncio.sleep(float(arg))
    else:
        await send(w, 404)


@dataclass
class Server:
    """The running test server and what it saw."""

    port: int
    hosts: list[str] = field(default_factory=list)
    headers: dict[str, dict[str, str]] = field(default_factory=dict)  # by path, lower-case names

    def url(self, path: str, host: str = "127.0.0.1", scheme: str = "http") -> str:
        """An absolute URL on this server."""
        return f"{scheme}://{host}:{self.port}{path}"


async def serve(ssl_context: ssl.SSLContext | None = None) -> tuple[Server, asyncio.Server]:
    """Start the test server on a free loopback port."""

    async def handle(reader: asyncio.StreamReader, writer: Writer) -> None:
        try:
            request = (await reader.readuntil(b"\r\n\r\n")).decode()
            for line in request.split("\r\n")[1:]:
                if line.lower().startswith("host:"):
                    state.hosts.append(line.split(":", 1)[1].strip())
            method, path = request.split(" ")[:2]
            state.headers[path] = {
                name.strip().lower(): value.strip()
                for name, _, value in (line.partition(":") for line in request.split("\r\n")[1:])
                if name
            }
            if method != "GET":  # the fetcher only ever reads
                await send(writer, 405)
                return
            await route(reader, writer, path)
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ssl_context)
    state = Server(port=server.sockets[0].getsockname()[1])
    return state, server


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def server() -> AsyncIterator[Server]:
    """A plain-HTTP test server for the whole session."""
    state, srv = await serve()
    yield state
    srv.close()
    await asyncio.sleep(1.5)  # let deliberately slow handlers notice their client left


@pytest_asyncio.fixture(loop_scope="session")
async def fetcher() -> AsyncIterator[SafeFetcher]:
    """A fetcher for local testing: private addresses allowed, 1 MiB limit, short timeouts."""
    f = SafeFetcher(allow_private=True, max_bytes=MB, read_timeout=0.5)
    yield f
    await f.aclose()


# --- address checks, no network ----------------------------------------------------------

HOSTILE_ADDRESSES = [
    "127.0.0.1", "127.8.9.10", "::1", "10.1.2.3", "172.16.0.1", "172.31.255.254",
    "192.168.1.1", "169.254.169.254", "100.64.0.1", "100.127.255.254", "0.0.0.0", "::",
    "224.0.0.1", "239.255.255.250", "255.255.255.255", "240.0.0.1", "192.0.2.1",
    "::ffff:127.0.0.1", "::ffff:10.0.0.1", "fe80::1", "fe80::1%eth0", "fc00::1", "fd12::1",
    "fec0::1", "ff02::1", "2002:7f00:1::1", "2002:a9fe:a9fe::1", "64:ff9b::7f00:1",
    "64:ff9b::a9fe:a9fe", "2001:0:4136:e378:8000:63bf:80ff:fffe", "2001:db8::1", "::7f00:1",
    "not-an-ip",
]  # fmt: skip


@pytest.mark.parametrize("address", HOSTILE_ADDRESSES)
def test_hostile_addresses_are_refused(address: str) -> None:
    """Loopback, private, link-local, shared, multicast, reserved and embedded forms are refused."""
    assert not address_allowed(address, allow_private=False)


@pytest.mark.parametrize(
    "address", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "2002:808:808::1"]
)
def test_public_addresses_are_allowed(address: str) -> None:
    """Global unicast addresses, and 6to4 wrapping a public one, pass."""
    assert address_allowed(address, allow_private=False)


@pytest.mark.parametrize(
    "address", ["169.254.169.254", "::ffff:169.254.169.254", "fe80::1", "224.0.0.1", "0.0.0.0"]
)
def test_metadata_and_multicast_refused_even_when_private_allowed(address: str) -> None:
    """Local-testing mode still never reaches cloud metadata, multicast or 0.0.0.0."""
    assert not address_allowed(address, allow_private=True)


HOSTILE_URLS = [
    ("not a url", "bad_url"), ("", "bad_url"), ("/relative/path", "bad_url"),
    ("ftp://example.com/a.png", "bad_url"), ("file:///etc/passwd", "bad_url"),
    ("http://example.com/a.png", "bad_url"), ("https://user:pw@example.com/a.png", "bad_url"),
    ("https://user@example.com/a.png", "bad_url"), ("https://2130706433/", "bad_url"),
    ("https://0x7f.1/", "bad_url"), ("https://0x7f000001/", "bad_url"),
    ("https://127.1/", "bad_url"), ("https://0177.0.0.1/", "bad_url"),
    ("https://1.2.3.4./", "bad_url"), ("https://127.0.0.1/", "blocked_address"),
    ("https://[::1]/", "blocked_address"), ("https://[::ffff:127.0.0.1]/", "blocked_address"),
    ("https://10.0.0.1/", "blocked_address"), ("https://169.254.169.254/x", "blocked_address"),
    ("https://[fe80::1]/", "blocked_address"), ("https://100.64.0.1/", "blocked_address"),
    ("https:///a.png", "bad_url"), ("https://:443/a.png", "bad_url"),
]  # fmt: skip


@pytest.mark.parametrize(("url", "code"), HOSTILE_URLS)
@pytest.mark.asyncio(loop_scope="session")
async def test_hostile_urls_are_refused(tmp_path: Path, url: str, code: str) -> None:
    """Non-https, credentials, numeric tricks and literal internal IPs never get a request."""
    resolver = MapResolver({})
    fetcher = SafeFetcher(allow_private=False, max_bytes=MB, resolver=resolver)
    with pytest.raises(FetchError) as info:
        await fetcher.fetch_to_file(url, tmp_path / "out")
    await fetcher.aclose()
    assert info.value.code == code
    assert not info.value.retryable
    assert resolver.calls == []


@pytest.mark.parametrize(
    "addresses",
    [["127.0.0.1"], ["::1"], ["10.0.0.5"], ["169.254.169.254"], ["93.184.216.34", "192.168.0.1"]],
)
@pytest.mark.asyncio(loop_scope="session")
async def test_names_resolving_inside_are_blocked(tmp_path: Path, addresses: list[str]) -> None:
    """A public-looking name is blocked at connect time if ANY of its addresses is internal."""
    resolver = MapResolver({"images.example.com": addresses})
    fetcher = SafeFetcher(allow_private=False, max_bytes=MB, resolver=resolver)
    with pytest.raises(FetchError) as info:
        await fetcher.fetch_to_file("https://images.example.com/a.png", tmp_path / "out")
    await fetcher.aclose()
    assert info.value.code == "blocked_address"
    blocked = next(a for a in addresses if not address_allowed(a, allow_private=False))
    assert f"images.example.com resolves to {blocked}" in info.value.message
    assert resolver.calls == ["images.example.com"]
    assert not (tmp_path / "out").exists()


class HangingResolver:
    """A DNS server that never answers."""

    async def resolve(self, host: str, port: int) -> list[str]:
        """Wait forever."""
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


@pytest.mark.asyncio(loop_scope="session")
async def test_a_lookup_that_never_answers_ends_at_the_connect_timeout(tmp_path: Path) -> None:
    """Name resolution is bounded by the connect timeout, not only by the whole download's."""
    fetcher = SafeFetcher(
        allow_private=False,
        max_bytes=MB,
        resolver=HangingResolver(),
        connect_timeout=0.2,
        total_timeout=30,
    )
    with pytest.raises(FetchError) as info:
        await fetcher.fetch_to_file("https://images.example.com/a.png", tmp_path / "out")
    await fetcher.aclose()
    assert (info.value.code, info.value.retryable) == ("timeout", True)
    assert "resolving images.example.com timed out" in info.value.message


# --- downloads from a real local server ---------------------------------------------------


@pytest.mark.parametrize(
    ("name", "content_type", "extension"),
    [("png", "image/png", "png"), ("jpeg", "image/jpeg", "jpg"), ("webp", "image/webp", "webp")],
)
@pytest.mark.asyncio(loop_scope="session")
async def test_images_are_stored_with_dimensions_and_sha256(
    server: Server,
    fetcher: SafeFetcher,
    tmp_path: Path,
    name: str,
    content_type: str,
    extension: str,
) -> None:
    """PNG, JPEG and WEBP land byte-exact, typed by magic bytes (not the header), with dims."""
    dest = tmp_path / "out"
    result = await fetcher.fetch_to_file(server.url(f"/{name}"), dest)
    assert dest.read_bytes() == IMAGES[name]
    assert result.sha256 == hashlib.sha256(IMAGES[name]).hexdigest()
    assert (result.content_type, result.extension) == (content_type, extension)
    assert (result.width, result.height, result.size_bytes) == (37, 23, len(IMAGES[name]))
    assert result.final_url == server.url(f"/{name}")


@pytest.mark.parametrize("name", ["png", "jpeg", "webp"])
@pytest.mark.asyncio(loop_scope="session")
async def test_a_truncated_image_is_stored_as_intact_never(
    server: Server, fetcher: SafeFetcher, tmp_path: Path, name: str
) -> None:
    """A body without Content-Length cut short by a closed connection is a retryable failure."""
    with pytest.raises(FetchError) as info:
        await fetcher.fetch_to_file(server.url(f"/cut/{name}"), tmp_path / "out")
    assert (info.value.code, info.value.retryable) == ("truncated", True)
    assert not (tmp_path / "out").exists()


@pytest.mark.asyncio(loop_scope="session")
async def test_html_is_not_an_image(server: Server, fetcher: SafeFetcher, tmp_path: Path) -> None:
    """An HTML body is refused whatever its Content-Type says, and nothing is left behind."""
    with pytest.raises(FetchError) as info:
        await fetcher.fetch_to_file(server.url("/html"), tmp_path / "out")
    assert (info.value.code, info.value.retryable) == ("not_an_image", False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("body", ["", "GIF8"])
@pytest.mark.asyncio(loop_scope="session")
async def test_a_body_too_short_to_tell_its_type_is_not_an_image(
    server: Server, fetcher: SafeFetcher, tmp_path: Path, body: str
) -> None:
    """An empty body, or one that ends before its first 12 bytes, is refused as not an image."""
    with pytest.raises(FetchError) as info:
        await fetcher.fetch_to_file(server.url(f"/short/{body}"), tmp_path / "out")
    assert (info.value.code, info.value.retryable) == ("not_an_image", False)
    assert not (tmp_path / "out").exists()


@pytest.mark.asyncio(loop_scope="session")
async def test_a_non_image_is_refused_from_its_first_bytes(
    server: Server, fetcher: SafeFetcher, tmp_path: Path
) -> None:
    """A body that is not an image is refused when its first bytes arrive, not read to the limit."""
    with pytest.raises(FetchError) as info:
        await fetcher.fetch_to_file(server.url(f"/text/{3 * MB}"), tmp_path / "out")
    assert (info.value.code, info.value.retryable) == ("not_an_image", False)


@pytest.mark.asyncio(loop_scope="session")
async def test_a_whole_png_declaring_too_many_pixels_is_not_an_image(
    server: Server, fetcher: SafeFetcher, tmp_path: Path
) -> None:
    """Magic bytes and IEND are not enough: a header that cannot be accepted is refused."""
    with pytest.raises(FetchError) as info:
        await fetcher.fetch_to_file(server.url("/bomb"), tmp_path / "out")
    assert (info.value.code, info.value.retryable) == ("not_an_image", False)
    assert "unacceptable dimensions 9000x9000" in info.value.message
    assert not (tmp_path / "out").exists()


@pytest.mark.asyncio(loop_scope="session")
async def test_declared_length_over_limit_refused_before_reading(
    server: Server, fetcher: SafeFetcher, tmp_path: Path
) -> None:
    """A Content-Length over the limit is refused from the headers, without reading the body."""
    with pytest.raises(FetchError) as info:
        await fetcher.fetch_to_file(server.url(f"/declared/{MB + 1}"), tmp_path / "out")
    # The server sends 16 bytes of the declared body and then nothing: a fetcher that
    # read the body would end in a read timeout, never in too_large.
    assert (info.value.code, info.value.retryable) == ("too_large", False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("path", [f"/unsized/{3 * MB}", f"/unsized/{MB + 1}"])
@pytest.mark.asyncio(loop_scope="session")
async def test_body_without_length_is_cut_at_the_limit(
    server: Server, fetcher: SafeFetcher, tmp_path: Path, path: str
) -> None:
    """With no Content-Length the count of bytes actually read enforces the limit."""
    with pytest.raises(FetchError) as info:
        await fetcher.fetch_to_file(server.url(path), tmp_path / "out")
    assert info.value.code == "too_large"
    assert not (tmp_path / "out").exists()


@pytest.mark.asyncio(loop_scope="session")
async def test_body_exactly_at_the_limit_is_accepted(
    server: Server, fetcher: SafeFetcher, tmp_path: Path
) -> None:
    """The limit is inclusive: MAX_IMAGE_BYTES itself is fine."""
    result = await fetcher.fetch_to_file(server.url(f"/unsized/{MB}"), tmp_path / "out")
    assert result.size_bytes == MB == (tmp_path / "out").stat().st_size


@pytest.mark.asyncio(loop_scope="session")
async def test_a_declared_length_exactly_at_the_limit_is_accepted(
    server: Server, fetcher: SafeFetcher, tmp_path: Path
) -> None:
    """The limit is inclusive for a Content-Length too, not only for the bytes counted."""
    result = await fetcher.fetch_to_file(server.url(f"/sized/{MB}"), tmp_path / "out")
    assert result.size_bytes == MB == (tmp_path / "out").stat().st_size


@pytest.mark.asyncio(loop_scope="session")
async def test_three_redirects_followed_fourth_refused(
    server: Server, fetcher: SafeFetcher, tmp_path: Path
) -> None:
    """Up to max_redirects hops are followed; one more is refused."""
    result = await fetcher.fetch_to_file(server.url("/r/3"), tmp_path / "ok")
    assert result.final_url == server.url("/r/0")
    with pytest.raises(FetchError) as info:
        await fetcher.fetch_to_file(server.url("/r/4"), tmp_path / "no")
    assert info.value.code == "too_many_redirects"


@pytest.mark.asyncio(loop_scope="session")
async def test_a_location_header_is_followed_only_on_a_redirect(
    server: Server, fetcher: SafeFetcher, tmp_path: Path
) -> None:
    """A 200 that also sends a Location header is the image itself: nothing else is fetched."""
    result = await fetcher.fetch_to_file(server.url("/located"), tmp_path / "out")
    assert result.sha256 == hashlib.sha256(PNG).hexdigest()
    assert result.final_url == server.url("/located")


@pytest.mark.parametrize(
    ("location", "code"),
    [
        ("http://169.254.169.254/latest/meta-data/", "blocked_address"),
        ("http://metadata.example/latest/", "blocked_address"),
        ("http://[fe80::1]/", "blocked_address"),
        ("ftp://example.com/a.png", "bad_url"),
        ("http://user:pw@127.0.0.1/", "bad_url"),
    ],
)
@pytest.mark.asyncio(loop_scope="session")
async def test_redirect_targets_are_checked_again(
    server: Server, tmp_path: Path, location: str, code: str
) -> None:
    """Each Location is checked like the first URL, including names resolved at connect time."""
    resolver = MapResolver({"metadata.example": ["169.254.169.254"]})
    fetcher = SafeFetcher(allow_private=True, max_bytes=MB, resolver=resolver)
    with pytest.raises(FetchError) as info:
        await fetcher.fetch_to_file(server.url(f"/to/{location}"), tmp_path / "out")
    await fetcher.aclose()
    assert info.value.code == code


@pytest.mark.asyncio(loop_scope="session")
async def test_connection_goes_to_the_resolved_address(server: Server, tmp_path: Path) -> None:
    """A name is resolved once by the injected resolver and the Host header keeps the name."""
    resolver = MapResolver({"img.test": ["127.0.0.1"]})
    fetcher = SafeFetcher(allow_private=True, max_bytes=MB, resolver=resolver)
    result = await fetcher.fetch_to_file(server.url("/png", host="img.test"), tmp_path / "out")
    await fetcher.aclose()
    assert result.width == 37
    assert resolver.calls == ["img.test"]
    assert server.hosts[-1] == f"img.test:{server.port}"


@pytest.mark.asyncio(loop_scope="session")
async def test_requests_ask_for_an_uncompressed_image_and_never_send_a_cookie(
    server: Server, fetcher: SafeFetcher, tmp_path: Path
) -> None:
    """identity only (a compressed body could inflate past the limit), and a cookie one link
    sets is never sent with the next download."""
    await fetcher.fetch_to_file(server.url("/cookie"), tmp_path / "one")
    await fetcher.fetch_to_file(server.url("/png/after-cookie"), tmp_path / "two")
    sent = server.headers["/png/after-cookie"]
    assert "cookie" not in sent
    assert sent["accept-encoding"] == "identity"
    assert (sent["accept"], sent["user-agent"]) == (
        "image/png, image/jpeg, image/webp",
        "imagetasks",
    )


@pytest.mark.asyncio(loop_scope="session")
async def test_https_verifies_the_hostname_while_connecting_to_the_checked_ip(
    tmp_path: Path,
) -> None:
    """TLS sends SNI and checks the certificate for the name, not for the IP it dialled."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "img.test")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("img.test")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    (tmp_path / "cert.pem").write_bytes(cert_pem)
    (tmp_path / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    sni: list[str | None] = []
    server_ctx.sni_callback = lambda _sock, server_name, _ctx: sni.append(server_name)
    state, srv = await serve(server_ctx)
    client_ctx = ssl.create_default_context(cadata=cert_pem.decode())
    resolver = MapResolver({"img.test": ["127.0.0.1"], "other.test": ["127.0.0.1"]})
    fetcher = SafeFetcher(
        allow_private=True, max_bytes=MB, resolver=resolver, ssl_context=client_ctx
    )
    try:
        result = await fetcher.fetch_to_file(
            state.url("/png", host="img.test", scheme="https"), tmp_path / "out"
        )
        assert result.sha256 == hashlib.sha256(PNG).hexdigest()
        assert sni == ["img.test"]
        with pytest.raises(FetchError) as info:  # certificate is not for other.test
            await fetcher.fetch_to_file(
                state.url("/png", host="other.test", scheme="https"), tmp_path / "out2"
            )
        assert info.value.code == "connection"
    finally:
        await fetcher.aclose()
        srv.close()


@pytest.mark.parametrize(
    ("status", "retryable", "renew"),
    [(503, True, False), (500, True, False), (429, True, False), (408, True, False),
     (404, False, True),
     (403, False, True), (410, False, True), (400, False, False)],
)  # fmt: skip
@pytest.mark.asyncio(loop_scope="session")
async def test_http_errors_say_whether_to_retry(
    server: Server, fetcher: SafeFetcher, tmp_path: Path, status: int, retryable: bool, renew: bool
) -> None:
    """5xx and 429 are retryable with Retry-After; 403/404/410 ask for a renewed link."""
    with pytest.raises(FetchError) as info:
        await fetcher.fetch_to_file(server.url(f"/status/{status}"), tmp_path / "out")
    err = info.value
    assert (err.code, err.status_code) == (f"http_{status}", status)
    assert (err.retryable, err.renew_link) == (retryable, renew)
    assert err.retry_after == 7.0


def http_date(when: dt.datetime) -> str:
    """`when` as an HTTP date; a naive datetime gets the "-0000" (unknown) zone."""
    return email.utils.format_datetime(when)


IN_TWO_MINUTES = dt.timedelta(minutes=2)
PLUS_2H = dt.timezone(dt.timedelta(hours=2))


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("7", 7.0),
        (" 7 ", 7.0),
        ("99999999999999", MAX_RETRY_AFTER_SECONDS),
        ("soon", None),
        ("\u00b2", None),
        ("-5", None),
        (lambda now: http_date(now + IN_TWO_MINUTES), 120.0),
        (lambda now: http_date((now + IN_TWO_MINUTES).astimezone(PLUS_2H)), 120.0),
        (lambda now: http_date((now + IN_TWO_MINUTES).replace(tzinfo=None)), 120.0),
        (lambda now: http_date(now - IN_TWO_MINUTES), 0.0),
    ],
    ids=["absent", "seconds", "padded", "huge", "word", "superscript", "negative",
         "date-gmt", "date-plus-2h", "date-unknown-zone", "date-past"],
)  # fmt: skip
def test_retry_after_is_read_as_seconds_or_a_date_and_bounded(
    header: str | Callable[[dt.datetime], str] | None, expected: float | None
) -> None:
    """Delta-seconds or an HTTP date, never negative, clamped to a day; anything else is none."""
    value = header(dt.datetime.now(dt.UTC)) if callable(header) else header
    headers = {} if value is None else {b"Retry-After": value.encode()}
    retry_after = status_error(httpx.Response(503, headers=headers)).retry_after
    if expected == 120.0:  # an HTTP date has whole seconds
        assert retry_after == pytest.approx(expected, abs=1.5)
    else:
        assert retry_after == expected


@pytest.mark.asyncio(loop_scope="session")
async def test_slow_body_hits_the_read_timeout(
    server: Server, fetcher: SafeFetcher, tmp_path: Path
) -> None:
    """A body that stalls longer than the read timeout fails as a retryable timeout."""
    with pytest.raises(FetchError) as info:
        await fetcher.fetch_to_file(server.url("/slow/1"), tmp_path / "out")
    assert (info.value.code, info.value.retryable) == ("timeout", True)
    assert not (tmp_path / "out").exists()


@pytest.mark.asyncio(loop_scope="session")
async def test_trickling_body_hits_the_total_timeout(server: Server, tmp_path: Path) -> None:
    """A body that never stalls long enough for the read timeout is still bounded in time."""
    fetcher = SafeFetcher(allow_private=True, max_bytes=MB, read_timeout=5, total_timeout=0.5)
    with pytest.raises(FetchError) as info:
        await fetcher.fetch_to_file(server.url("/slow/0.05"), tmp_path / "out")
    await fetcher.aclose()
    assert (info.value.code, info.value.retryable) == ("timeout", True)


@pytest.mark.asyncio(loop_scope="session")
async def test_refused_connection_is_retryable(tmp_path: Path) -> None:
    """Nothing listening: a retryable connection error."""
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    fetcher = SafeFetcher(allow_private=True, max_bytes=MB)
    with pytest.raises(FetchError) as info:
        await fetcher.fetch_to_file(f"http://127.0.0.1:{port}/png", tmp_path / "out")
    await fetcher.aclose()
    assert (info.value.code, info.value.retryable) == ("connection", True)


@pytest.mark.asyncio(loop_scope="session")
async def test_large_download_keeps_memory_bounded(server: Server, tmp_path: Path) -> None:
    """A ~30 MB body streams to disk with RSS growth far below its size, reporting progress."""
    size = 30 * MB
    fetcher = SafeFetcher(allow_private=True, max_bytes=64 * MB)
    progress = 0

    async def on_progress() -> None:
        nonlocal progress
        progress += 1

    gc.collect()
    process = psutil.Process()
    before = process.memory_info().rss
    peak = before

    async def sample() -> None:
        nonlocal peak
        while True:
            peak = max(peak, process.memory_info().rss)
            await asyncio.sleep(0.01)

    sampler = asyncio.create_task(sample())
    try:
        result = await fetcher.fetch_to_file(
            server.url(f"/sized/{size}"), tmp_path / "big", on_progress=on_progress
        )
    finally:
        sampler.cancel()
        await fetcher.aclose()
    assert result.size_bytes == size == (tmp_path / "big").stat().st_size
    assert (result.width, result.height) == (37, 23)
    assert progress >= 5
    assert peak - before < 12 * MB, f"RSS grew by {(peak - before) / MB:.1f} MiB"


@pytest.mark.parametrize("address", [a.split("%")[0] for a in HOSTILE_ADDRESSES[:-1]])
@pytest.mark.asyncio(loop_scope="session")
async def test_a_name_resolving_to_any_hostile_address_is_blocked(
    tmp_path: Path, address: str
) -> None:
    """Every address of the hostile table is refused when a public-looking name resolves to it."""
    resolver = MapResolver({"cdn.example.com": [address]})
    fetcher = SafeFetcher(allow_private=False, max_bytes=MB, resolver=resolver)
    with pytest.raises(FetchError) as info:
        await fetcher.fetch_to_file("https://cdn.example.com/a.png", tmp_path / "out")
    await fetcher.aclose()
    assert (info.value.code, info.value.retryable) == ("blocked_address", False)
    assert resolver.calls == ["cdn.example.com"]


@pytest.mark.asyncio(loop_scope="session")
async def test_unwritable_destination_is_a_retryable_local_error(
    server: Server, fetcher: SafeFetcher, tmp_path: Path
) -> None:
    """A spool path that cannot be written is reported as FetchError, not a bare OSError."""
    with pytest.raises(FetchError) as info:
        await fetcher.fetch_to_file(server.url("/png"), tmp_path / "missing-dir" / "out")
    assert (info.value.code, info.value.retryable) == ("local_io", True)
