"""Webhook targets are checked before they are called (SSRF protection).

A URL must be http(s) and, unless ``IMAGEGEN_WEBHOOK_ALLOW_PRIVATE_TARGETS`` is
set, every address its host resolves to must be public: no loopback, private,
link-local, carrier-grade NAT, multicast or reserved ranges, judged also on the IPv4
address an IPv6 address embeds (NAT64, 6to4, Teredo, IPv4-mapped, -translated and
-compatible forms reach the IPv4 host). Cloud metadata addresses are refused even
with that flag set. It is checked at registration and again at each delivery, and
the delivery connects to the very address it checked, so a DNS answer that
changes in between (rebinding) cannot redirect it.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

import httpx

from shared.core.errors import UnresolvableTarget, UnsafeTarget


@dataclass(frozen=True)
class Target:
    url: httpx.URL
    address: str  # the checked IP to connect to

    def connect_url(self) -> httpx.URL:
        """The URL with its host replaced by the checked address."""
        host = f"[{self.address}]" if ":" in self.address else self.address
        return self.url.copy_with(host=host)

    @property
    def host_header(self) -> str:
        default = {"http": 80, "https": 443}[self.url.scheme]
        port = self.url.port
        return self.url.host if port in (None, default) else f"{self.url.host}:{port}"


IP = ipaddress.IPv4Address | ipaddress.IPv6Address

# IPv6 prefixes that carry an IPv4 address in their last 32 bits, which a gateway
# or the host's own stack may turn back into that IPv4 address.
_NAT64 = (
    ipaddress.ip_network("64:ff9b::/96"),  # RFC 6052 well-known prefix
    ipaddress.ip_network("64:ff9b:1::/48"),
)  # RFC 8215 local-use NAT64
_IPV4_TRANSLATED = ipaddress.ip_network("::ffff:0:0:0/96")  # RFC 2765 (SIIT)
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")  # deprecated ::a.b.c.d

# Cloud metadata services: refused even where private targets are allowed for
# development (that flag is for loopback and LAN receivers, never for these).
METADATA = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",  # AWS, GCP, Azure, OpenStack, DigitalOcean, ...
        "fd00:ec2::254",  # AWS over IPv6
        "100.100.100.200",  # Alibaba Cloud
        "169.254.170.2",  # AWS ECS task metadata
        "169.254.169.123",  # AWS time sync
    )
)


def embedded_ipv4(ip: IP) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for, if it embeds one: IPv4-mapped
    (::ffff:a.b.c.d), IPv4-translated (::ffff:0:a.b.c.d), IPv4-compatible
    (::a.b.c.d), NAT64 (64:ff9b::/96, 64:ff9b:1::/48), 6to4 (2002::/16) and Teredo
    (2001::/32, the client's address)."""
    if isinstance(ip, ipaddress.IPv4Address):
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    low32 = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if any(ip in net for net in _NAT64) or ip in _IPV4_TRANSLATED:
        return low32
    if ip in _IPV4_COMPATIBLE and int(ip) > 1:  # :: and ::1 are not IPv4 addresses
        return low32
    return None


def _unwrapped(ip: IP) -> list[IP]:
    """The address and every IPv4 address it embeds (judged together)."""
    found: list[IP] = [ip]
    inner = embedded_ipv4(ip)
    if inner is not None:
        found.append(inner)
    return found


def is_metadata(ip: IP) -> bool:
    return any(a in METADATA for a in _unwrapped(ip))


def is_public(ip: IP) -> bool:
    """Public on the internet: the address and whatever IPv4 address it embeds."""
    return all(a.is_global and not a.is_multicast for a in _unwrapped(ip))


def refusal(ip: IP, *, allow_private: bool) -> str | None:
    """Why a connection to ``ip`` is refused, or None when it is allowed."""
    if is_metadata(ip):
        return "a cloud metadata address"
    if not allow_private and not is_public(ip):
        return "a non-public address"
    return None


def check_target(url: str, *, allow_private: bool, param: str = "url") -> Target:
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError) as exc:
        raise UnsafeTarget(f"Invalid webhook URL: {exc}", param=param) from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise UnsafeTarget("A webhook URL must be an http(s) URL with a host.", param=param)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        infos = socket.getaddrinfo(parsed.host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise UnresolvableTarget(
            f"The webhook host '{parsed.host}' does not resolve: {exc}", param=param
        ) from None
    addresses = [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]
    for ip in addresses:
        why = refusal(ip, allow_private=allow_private)
        if why:
            hint = (
                ""
                if allow_private or why != "a non-public address"
                else " (IMAGEGEN_WEBHOOK_ALLOW_PRIVATE_TARGETS=true allows loopback and LAN "
                "receivers for development)"
            )
            # What the host resolved to is not said: that would answer DNS lookups
            # of internal names for whoever registers a webhook.
            raise UnsafeTarget(
                f"The webhook host '{parsed.host}' resolves to {why}; "
                f"such targets are refused{hint}.",
                param=param,
            )
    return Target(url=parsed, address=str(addresses[0]))
