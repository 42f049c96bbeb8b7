"""Which webhook targets are refused (SPEC 13): the address table, URL forms, resolution."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Sequence

import pytest

from mailer.events.targets import (
    TargetRefused,
    check_target,
    checked_addresses,
    parse_url,
    refusal,
)

#: Address -> why it is refused (None: allowed). IPv4, IPv6, and IPv6 forms embedding IPv4.
TABLE: list[tuple[str, str | None]] = [
    ("8.8.8.8", None),
    ("93.184.216.34", None),
    ("2606:4700:4700::1111", None),
    ("::ffff:8.8.8.8", None),            # IPv4-mapped public address
    ("64:ff9b::808:808", None),          # NAT64 of 8.8.8.8
    ("127.0.0.1", "loopback"),
    ("127.255.255.254", "loopback"),
    ("::1", "loopback"),
    ("0.0.0.0", "unspecified"),
    ("::", "unspecified"),
    ("10.0.0.1", "private"),
    ("172.16.5.4", "private"),
    ("192.168.1.1", "private"),
    ("fd12:3456::1", "private"),         # unique local
    ("fc00::1", "private"),
    ("169.254.169.254", "link-local"),   # the cloud metadata service
    ("fe80::1", "link-local"),
    ("224.0.0.1", "multicast"),
    ("239.255.255.250", "multicast"),
    ("ff02::1", "multicast"),
    ("240.0.0.1", "reserved"),
    ("255.255.255.255", "reserved"),     # limited broadcast
    ("100.64.0.1", "non-global"),        # carrier-grade NAT (RFC 6598)
    ("192.0.2.10", "private"),           # documentation
    ("198.18.0.1", "private"),           # benchmarking
    ("2001:db8::1", "private"),          # documentation
    ("fec0::1", "site-local"),
    ("::ffff:127.0.0.1", "loopback"),    # IPv4-mapped loopback
    ("::ffff:10.1.2.3", "private"),      # IPv4-mapped private
    ("::ffff:169.254.169.254", "link-local"),
    ("64:ff9b::a00:1", "private"),       # NAT64 of 10.0.0.1
    ("64:ff9b::7f00:1", "loopback"),     # NAT64 of 127.0.0.1
    ("2002:7f00:1::1", "loopback"),      # 6to4 of 127.0.0.1
    ("2002:c0a8:101::1", "private"),     # 6to4 of 192.168.1.1
    ("::7f00:1", "reserved"),            # IPv4-compatible (deprecated) 127.0.0.1
    ("2001::1", "private"),              # Teredo
]


@pytest.mark.parametrize(("address", "reason"), TABLE)
def test_the_address_table(address: str, reason: str | None) -> None:
    assert refusal(ipaddress.ip_address(address)) == reason


def fake_resolver(table: dict[str, Sequence[str]]):  # type: ignore[no-untyped-def]
    """A resolver answering from ``table``: a unit test must not depend on real DNS."""
    async def resolve(host: str, port: int) -> Sequence[str]:
        if host not in table:
            raise OSError("no such host")
        return table[host]
    return resolve


def addresses(url: str, allow_private: bool, table: dict[str, Sequence[str]]) -> list[str]:
    return asyncio.run(checked_addresses(parse_url(url), allow_private, fake_resolver(table)))


@pytest.mark.parametrize("url", [
    "http://127.0.0.1/hook",
    "http://127.0.0.1:8080/hook",
    "http://[::1]/hook",
    "http://[::ffff:127.0.0.1]/hook",
    "https://169.254.169.254/latest/meta-data/",
    "http://10.0.0.5/",
    "http://0.0.0.0:9000/",
])
def test_literal_private_targets_are_refused_unless_allowed(url: str) -> None:
    with pytest.raises(TargetRefused) as refused:
        addresses(url, False, {})
    assert refused.value.status == 422
    assert refused.value.code == "webhook_target_refused"
    assert addresses(url, True, {})  # allowed with MAILER_WEBHOOK_ALLOW_PRIVATE


def test_a_name_is_judged_by_every_address_it_resolves_to() -> None:
    table = {"public.example.test": ["93.184.216.34", "2606:2800:220:1::1"],
             "mixed.example.test": ["93.184.216.34", "10.0.0.7"],
             "inside.example.test": ["fd00::7"]}
    assert addresses("https://public.example.test/h", False, table) == [
        "93.184.216.34", "2606:2800:220:1::1"]
    # One private address among public ones is enough to refuse: we would not choose
    with pytest.raises(TargetRefused, match="private"):
        addresses("https://mixed.example.test/h", False, table)
    with pytest.raises(TargetRefused, match="private"):
        addresses("https://inside.example.test/h", False, table)
    with pytest.raises(TargetRefused, match="does not resolve"):
        addresses("https://nowhere.example.test/h", False, table)


@pytest.mark.parametrize(("url", "why"), [
    ("ftp://example.com/h", "https://"),
    ("file:///etc/passwd", "https://"),
    ("gopher://127.0.0.1:6379/_INFO", "https://"),
    ("https://user:pw@example.com/h", "user name or password"),
    ("https:///nohost", "no host"),
    ("https://example.com/h#frag", "fragment"),
    ("https://example.com/" + "a" * 2000, "longer than"),
    ("not a url", "https://"),
])
def test_bad_url_forms_are_refused(url: str, why: str) -> None:
    with pytest.raises(TargetRefused, match=why):
        parse_url(url)


def test_registration_check_with_the_system_resolver() -> None:
    # A literal needs no DNS: refused without the flag, accepted with it
    with pytest.raises(TargetRefused, match="loopback"):
        check_target("http://127.0.0.1:9/hook", allow_private=False)
    assert check_target("http://127.0.0.1:9/hook", allow_private=True).port == 9
    # "localhost" goes through the real resolver and is loopback whatever it returns
    with pytest.raises(TargetRefused, match=r"loopback|does not resolve"):
        check_target("http://localhost:9/hook", allow_private=False)
