"""Webhook target checks (SSRF): every way of writing a non-public address is refused.

Literal addresses resolve to themselves, so these run without a network.
"""

from __future__ import annotations

import pytest

from shared.core.errors import ErrorCode, UnsafeTarget
from shared.webhooks.targets import check_target

# (URL, refused without the private-targets flag, refused even with it)
CASES: list[tuple[str, bool, bool]] = [
    # Plain IPv4 and IPv6 ranges.
    ("http://127.0.0.1/", True, False),
    ("http://10.1.2.3/", True, False),
    ("http://192.168.0.10:8080/hook", True, False),
    ("http://100.64.0.1/", True, False),  # carrier-grade NAT
    ("http://[::1]/", True, False),
    ("http://[fc00::1]/", True, False),  # unique local
    ("http://[fe80::1]/", True, False),  # link-local
    ("http://224.0.0.1/", True, False),  # multicast
    ("http://0.0.0.0/", True, False),
    ("http://[::]/", True, False),
    # IPv6 forms that embed a loopback or private IPv4 address.
    ("http://[64:ff9b::7f00:1]/", True, False),  # NAT64 of 127.0.0.1
    ("http://[64:ff9b:1::a00:1]/", True, False),  # local-use NAT64 of 10.0.0.1
    ("http://[2002:7f00:1::]/", True, False),  # 6to4 of 127.0.0.1
    ("http://[2002:c0a8:1::1]/", True, False),  # 6to4 of 192.168.0.1
    ("http://[2001:0:4136:e378:8000:63bf:80ff:fffe]/", True, False),  # Teredo of 127.0.0.1
    ("http://[::127.0.0.1]/", True, False),  # IPv4-compatible
    ("http://[::ffff:127.0.0.1]/", True, False),  # IPv4-mapped
    ("http://[::ffff:0:7f00:1]/", True, False),  # IPv4-translated
    ("http://[::ffff:0:a00:1]/", True, False),  # IPv4-translated 10.0.0.1
    # Cloud metadata: refused even with the flag, in every spelling.
    ("http://169.254.169.254/latest/meta-data/", True, True),
    ("http://[64:ff9b::a9fe:a9fe]/", True, True),  # NAT64 of 169.254.169.254
    ("http://[64:ff9b:1::a9fe:a9fe]/", True, True),
    ("http://[2002:a9fe:a9fe::]/", True, True),  # 6to4
    ("http://[::169.254.169.254]/", True, True),  # IPv4-compatible
    ("http://[::ffff:169.254.169.254]/", True, True),  # IPv4-mapped
    ("http://[::ffff:0:a9fe:a9fe]/", True, True),  # IPv4-translated
    ("http://[2001:0:4136:e378:8000:63bf:5601:5601]/", True, True),  # Teredo of it
    ("http://[fd00:ec2::254]/", True, True),  # AWS over IPv6
    ("http://100.100.100.200/", True, True),  # Alibaba Cloud
    ("http://[64:ff9b::6464:64c8]/", True, True),  # NAT64 of 100.100.100.200
    # Public addresses, plain and embedded, are fine.
    ("http://93.184.216.34/", False, False),
    ("https://[2606:4700:4700::1111]/hook", False, False),
    ("http://[64:ff9b::5db8:d822]/", False, False),  # NAT64 of 93.184.216.34
    ("http://[2002:5db8:d822::1]/", False, False),  # 6to4 of 93.184.216.34
]


@pytest.mark.parametrize(("url", "refused", "refused_always"), CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("allow_private", [False, True], ids=["strict", "private-allowed"])
def test_target_check(url: str, refused: bool, refused_always: bool, allow_private: bool) -> None:
    expect_refusal = refused_always or (refused and not allow_private)
    if expect_refusal:
        with pytest.raises(UnsafeTarget) as info:
            check_target(url, allow_private=allow_private, param="webhook_url")
        assert info.value.param == "webhook_url"
        assert info.value.code == ErrorCode.unsafe_target  # the edge answers it as a 400
    else:
        target = check_target(url, allow_private=allow_private)
        assert target.connect_url().host  # the checked address is what is connected to


def test_refusal_names_the_development_flag_for_private_targets() -> None:
    with pytest.raises(UnsafeTarget) as info:
        check_target("http://127.0.0.1:9000/hook", allow_private=False)
    assert "IMAGEGEN_WEBHOOK_ALLOW_PRIVATE_TARGETS" in info.value.message
    with pytest.raises(UnsafeTarget) as info:
        check_target("http://169.254.169.254/", allow_private=True)
    assert "metadata" in info.value.message


def test_non_http_schemes_are_refused() -> None:
    for url in ("file:///etc/passwd", "gopher://127.0.0.1/", "ftp://93.184.216.34/"):
        with pytest.raises(UnsafeTarget):
            check_target(url, allow_private=True)


def test_a_refusal_does_not_say_what_the_host_resolved_to() -> None:
    """Naming the address answered internal DNS lookups for anyone with a key."""
    with pytest.raises(UnsafeTarget) as caught:
        check_target("http://localhost:9/hook", allow_private=False)
    assert "non-public address" in str(caught.value)
    assert "127.0.0.1" not in str(caught.value)
    assert "::1" not in str(caught.value)
