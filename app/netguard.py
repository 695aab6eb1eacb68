"""Which addresses an outgoing connection may reach, enforced when it connects.

Every TCP connection goes through `_GuardedBackend`: the host is resolved once, every
address is checked, and the socket is opened to a checked address, so a DNS answer
cannot change between the check and the connect (rebinding). TLS still verifies and
sends SNI for the hostname, because httpcore passes it to `start_tls` separately.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import ssl
from collections.abc import Callable, Iterable
from typing import Protocol

import anyio
import httpcore
import httpx

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
# A last label that is a number makes the host an IPv4 address in inet_aton/WHATWG
# terms (2130706433, 0x7f.1, 127.1); only the canonical dotted quad is accepted.
_NUMERIC_LABEL = re.compile(r"(0x[0-9a-f]*|[0-9]+)", re.IGNORECASE)


class GuardError(Exception):
    """A host the guard refuses to connect to."""


class BadURLError(GuardError):
    """The host is written in a form that is never fetched (a non-canonical number)."""


class BlockedAddressError(GuardError):
    """The host is, or resolves to, an address that may not be reached."""


class Resolver(Protocol):
    """Turns a hostname into the IP addresses a connection may use."""

    async def resolve(self, host: str, port: int) -> list[str]: ...


class SystemResolver:
    """The operating system's resolver, off the event loop."""

    async def resolve(self, host: str, port: int) -> list[str]:
        """All distinct addresses for `host`, in the resolver's order."""
        infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        return list(dict.fromkeys(str(info[4][0]) for info in infos))


def _is_public(ip: IPAddress) -> bool:
    if isinstance(ip, ipaddress.IPv6Address):
        teredo = ip.teredo
        nat64 = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF) if ip in _NAT64 else None
        embedded = [ip.ipv4_mapped, ip.sixtofour, nat64, *(teredo or ())]
        if any(v4 is not None and not _is_public(v4) for v4 in embedded):
            return False
        if ip.is_site_local:
            return False
    return ip.is_global and not (
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
    )


def address_allowed(address: str, *, allow_private: bool) -> bool:
    """Whether a connection to this IP address is permitted."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if allow_private:
        # Local testing reaches loopback and LAN hosts, never cloud metadata or multicast.
        ip = getattr(ip, "ipv4_mapped", None) or ip
        return not (ip.is_link_local or ip.is_multicast or ip.is_unspecified)
    return _is_public(ip)


def _literal_ip(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if _NUMERIC_LABEL.fullmatch(host.rstrip(".").rsplit(".", 1)[-1]):
        raise BadURLError(f"non-canonical numeric host {host!r}")
    return None


def check_host(host: str, *, allow_private: bool) -> None:
    """Refuse a non-canonical numeric host (BadURLError) or a forbidden address literal.

    Hostnames pass here: they are checked at connect time, against what they resolve to.
    """
    ip = _literal_ip(host)
    if ip is not None and not address_allowed(str(ip), allow_private=allow_private):
        raise BlockedAddressError(f"{host} is not a public address")


# Decides, for a hostname as written in the URL and one address it resolved to,
# whether a connection may be opened.
AddressPolicy = Callable[[str, str], bool]


class _GuardedBackend(httpcore.AsyncNetworkBackend):
    def __init__(
        self, resolver: Resolver, *, allow_private: bool, policy: AddressPolicy | None = None
    ) -> None:
        self._resolver = resolver
        self._allow_private = allow_private
        self._policy = policy
        self._inner = httpcore.AnyIOBackend()

    def _allowed(self, host: str, address: str) -> bool:
        if self._policy is not None:
            return self._policy(host, address)
        return address_allowed(address, allow_private=self._allow_private)

    async def _addresses(self, host: str, port: int, limit: float | None) -> list[str]:
        try:
            ipaddress.ip_address(host.split("%", 1)[0])
            return [host]
        except ValueError:
            pass
        try:
            with anyio.fail_after(limit):
                addresses = await self._resolver.resolve(host, port)
        except TimeoutError as exc:
            raise httpcore.ConnectTimeout(f"resolving {host} timed out") from exc
        except OSError as exc:
            raise httpcore.ConnectError(f"cannot resolve {host}: {exc}") from exc
        if not addresses:
            raise httpcore.ConnectError(f"{host} has no address")
        return addresses

    async def connect_tcp(  # httpcore's signature, timeout included
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        addresses = await self._addresses(host, port, timeout)
        for address in addresses:
            if not self._allowed(host, address):
                raise BlockedAddressError(f"{host} resolves to {address}")
        error: Exception | None = None
        for address in addresses:
            try:
                return await self._inner.connect_tcp(
                    address, port, timeout, local_address, socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                error = exc
        assert error is not None
        raise error

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("unix sockets are not allowed")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class _GuardedTransport(httpx.AsyncHTTPTransport):
    def __init__(self, backend: httpcore.AsyncNetworkBackend, ssl_context: ssl.SSLContext) -> None:
        super().__init__(verify=ssl_context, trust_env=False)
        # httpx 0.28 cannot be given a network backend: replacing the pool it built is
        # the only way to route every connection (redirects included) through the check.
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=ssl_context,
            max_connections=50,
            max_keepalive_connections=10,
            keepalive_expiry=5.0,
            network_backend=backend,
        )


def guarded_transport(
    resolver: Resolver,
    *,
    allow_private: bool,
    ssl_context: ssl.SSLContext,
    policy: AddressPolicy | None = None,
) -> httpx.AsyncHTTPTransport:
    """An httpx transport whose every connection is resolved and checked by the guard.

    `policy` replaces the public-only (or `allow_private`) rule when given. A refused
    address surfaces as BlockedAddressError from the request that connected.
    """
    backend = _GuardedBackend(resolver, allow_private=allow_private, policy=policy)
    return _GuardedTransport(backend, ssl_context)
