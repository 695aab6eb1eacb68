"""Where outbound webhooks may go: public HTTPS, or what WEBHOOK_ALLOWED_NETWORKS lists.

Callers live on private networks, so the operator lists the hosts and networks
webhooks may reach besides public addresses. Loopback, link-local (cloud
metadata) and private addresses are refused unless listed; a listed host name
reaches private addresses, while loopback and link-local ones must be listed as
networks or addresses themselves. `http://` is only for
destinations inside the list; a public one needs `https://`. A URL is checked
when it is subscribed (a clear 422) and again at every connection, against the
addresses its host resolves to then (the guard pins the checked address).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

import httpx

from app.netguard import GuardError, IPAddress, Resolver, SystemResolver, address_allowed
from app.netguard import _literal_ip as literal_ip

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
MAX_URL_LENGTH = 2000
RESOLVE_TIMEOUT_SECONDS = 5.0


class PolicyError(Exception):
    """A webhook URL that may not be used; the message says why."""


def parse_allowed(entries: Sequence[str]) -> tuple[tuple[IPNetwork, ...], frozenset[str]]:
    """WEBHOOK_ALLOWED_NETWORKS: CIDR networks (or single addresses) and host names."""
    networks: list[IPNetwork] = []
    hosts: set[str] = set()
    for entry in entries:
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
            continue
        except ValueError:
            pass
        host = entry.strip().lower().rstrip(".")
        if not host or any(c in host for c in "/:@ ") or host.startswith("."):
            raise ValueError(f"{entry!r} is neither a CIDR network nor a host name")
        hosts.add(host)
    return tuple(networks), frozenset(hosts)


def _ip(address: str) -> IPAddress | None:
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return None
    return getattr(ip, "ipv4_mapped", None) or ip


def _name_may_reach(ip: IPAddress) -> bool:
    return not (
        ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_unspecified or ip.is_reserved
    )


@dataclass(frozen=True)
class WebhookPolicy:
    """The allow-list, and the checks made with it."""

    networks: tuple[IPNetwork, ...] = ()
    hosts: frozenset[str] = frozenset()

    @classmethod
    def from_entries(cls, entries: Sequence[str]) -> WebhookPolicy:
        """The policy WEBHOOK_ALLOWED_NETWORKS describes."""
        networks, hosts = parse_allowed(entries)
        return cls(networks, hosts)

    def listed(self, host: str, address: str) -> bool:
        """Whether this address of the host is on the allow-list.

        A listed network (or address) permits itself. A listed host name permits
        private and public addresses only: loopback, link-local (cloud metadata),
        multicast and the like must be listed as networks themselves, so a name
        that resolves there (by mistake or by a DNS change) reaches nothing.
        """
        ip = _ip(address)
        if ip is None:
            return False
        if any(ip in network for network in self.networks):
            return True
        return host.lower().rstrip(".") in self.hosts and _name_may_reach(ip)

    def may_connect(self, scheme: str, host: str, address: str) -> bool:
        """Listed, or (over HTTPS only) a public address."""
        if self.listed(host, address):
            return True
        return scheme == "https" and address_allowed(address, allow_private=False)

    def parse(self, url: str) -> httpx.URL:
        """The URL's form alone: scheme, no credentials, a canonical host (PolicyError)."""
        if len(url) > MAX_URL_LENGTH:
            raise PolicyError(f"longer than {MAX_URL_LENGTH} characters")
        try:
            parsed = httpx.URL(url)
        except (httpx.InvalidURL, TypeError) as exc:
            raise PolicyError(f"not a URL: {exc}") from exc
        if parsed.scheme not in ("http", "https"):
            raise PolicyError("must be an http:// or https:// URL")
        if parsed.userinfo:
            raise PolicyError("credentials in the URL are not allowed (nothing secret is sent)")
        host = parsed.raw_host.decode("ascii", "replace")
        if not host:
            raise PolicyError("the URL has no host")
        if parsed.fragment:
            raise PolicyError("a fragment is never sent; remove it")
        try:
            literal_ip(host)
        except GuardError as exc:
            raise PolicyError(str(exc)) from exc
        return parsed

    async def check(self, url: str, resolver: Resolver | None = None) -> httpx.URL:
        """The whole check, resolving the host now: every address must be permitted."""
        parsed = self.parse(url)
        host = parsed.raw_host.decode("ascii")
        if literal_ip(host) is not None:
            addresses = [host]
        else:
            import anyio

            try:
                with anyio.fail_after(RESOLVE_TIMEOUT_SECONDS):
                    addresses = await (resolver or SystemResolver()).resolve(
                        host, parsed.port or (443 if parsed.scheme == "https" else 80)
                    )
            except (OSError, TimeoutError) as exc:
                raise PolicyError(f"cannot resolve {host}: {exc or 'timed out'}") from exc
            if not addresses:
                raise PolicyError(f"{host} has no address")
        for address in addresses:
            if self.may_connect(parsed.scheme, host, address):
                continue
            if parsed.scheme == "http" and address_allowed(address, allow_private=False):
                raise PolicyError(
                    "public destinations need https:// (http:// only inside "
                    "WEBHOOK_ALLOWED_NETWORKS)"
                )
            where = host if address == host else f"{host} ({address})"
            raise PolicyError(
                f"{where} is not a public address and not in WEBHOOK_ALLOWED_NETWORKS"
            )
        return parsed
