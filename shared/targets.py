"""Webhook targets are checked before they are called (SSRF protection).

A URL must be http(s) and, unless ``IMAGEGEN_WEBHOOK_ALLOW_PRIVATE_TARGETS`` is
set, every address its host resolves to must be public: no loopback, private,
link-local (cloud metadata at 169.254.169.254), carrier-grade NAT, multicast or
reserved ranges. It is checked at registration and again at each delivery, and
the delivery connects to the very address it checked, so a DNS answer that
changes in between (rebinding) cannot redirect it.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

import httpx

from shared.errors import InvalidRequest


class UnsafeTarget(InvalidRequest):
    """The webhook URL is not http(s) or points at a non-public address."""


class UnresolvableTarget(InvalidRequest):
    """The webhook host does not resolve (now): worth another try later."""


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


def _public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return _public(ip.ipv4_mapped)
    return ip.is_global and not ip.is_multicast


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
        raise UnresolvableTarget(f"The webhook host '{parsed.host}' does not resolve: {exc}",
                           param=param) from None
    addresses = [ipaddress.ip_address(info[4][0]) for info in infos]
    if not allow_private:
        for ip in addresses:
            if not _public(ip):
                raise UnsafeTarget(
                    f"The webhook host '{parsed.host}' resolves to {ip}, a non-public "
                    "address; such targets are refused.", param=param)
    return Target(url=parsed, address=str(addresses[0]))
