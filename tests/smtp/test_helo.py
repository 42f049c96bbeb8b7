"""The EHLO name (SPEC section 6): a real FQDN, else the From domain, never localhost."""

from __future__ import annotations

import socket

import pytest

from mailer.errors import ConfigError
from mailer.smtp.helo import HeloNameError, default_helo_name, helo_name, is_public_fqdn

FROM = "Example Mailer <no-reply@Mail.Example.COM>"


@pytest.mark.parametrize(
    ("fqdn", "expected"),
    [
        # a real fully qualified name is used as it is (lower case, no root dot)
        ("mx1.example.net", "mx1.example.net"),
        ("MX1.Example.NET.", "mx1.example.net"),
        ("host-7.eu-west.compute.example", "host-7.eu-west.compute.example"),
        # anything else falls back to the domain of MAILER_FROM
        ("localhost", "mail.example.com"),
        ("localhost.localdomain", "mail.example.com"),
        ("build-host.localdomain", "mail.example.com"),
        ("localhost6.localdomain6", "mail.example.com"),
        ("web.localhost", "mail.example.com"),  # RFC 6761: all of .localhost is loopback
        ("vm", "mail.example.com"),  # no dot: not fully qualified
        ("buildkitsandbox", "mail.example.com"),
        ("172.17.0.2", "mail.example.com"),  # an IP is not a host name
        ("::1", "mail.example.com"),
        ("under_score.example.com", "mail.example.com"),  # not a valid host name
        ("", "mail.example.com"),
    ],
)
def test_default_helo_name(fqdn: str, expected: str) -> None:
    assert default_helo_name(fqdn, FROM) == expected


@pytest.mark.parametrize(
    ("from_address", "expected"),
    [
        ("no-reply@example.org", "example.org"),
        ("Mailer <no-reply@example.org.>", "example.org"),
        ('"Shop, Inc." <news@shop.example>', "shop.example"),
        ("info@bücher.example", "xn--bcher-kva.example"),  # EHLO is ASCII: the A-label
    ],
)
def test_from_domain_forms(from_address: str, expected: str) -> None:
    assert default_helo_name("localhost", from_address) == expected


@pytest.mark.parametrize("from_address", ["no-reply@localhost", "no-reply@mailer", "nobody", ""])
def test_no_usable_name_is_a_configuration_error_never_localhost(from_address: str) -> None:
    # Given a machine without an FQDN and a From address without a usable domain
    # When the EHLO name is chosen; then start-up is refused with a hint, not "localhost"
    with pytest.raises(HeloNameError, match="MAILER_SMTP_HELO_NAME") as error:
        default_helo_name("localhost", from_address)
    assert isinstance(error.value, ConfigError) and isinstance(error.value, ValueError)


def test_configured_name_wins_and_is_checked() -> None:
    assert helo_name("relay-client.example.com", FROM, getfqdn=lambda: "x.example") == (
        "relay-client.example.com"
    )
    assert helo_name("[192.0.2.10]", FROM) == "[192.0.2.10]"  # an address literal is fine
    assert helo_name("[IPv6:2001:db8::1]", FROM) == "[IPv6:2001:db8::1]"
    for bad in ("localhost", "mailer", "[127.0.0.1]", "[IPv6:192.0.2.1]", "bad name.example"):
        with pytest.raises(HeloNameError, match="MAILER_SMTP_HELO_NAME"):
            helo_name(bad, FROM)


def test_unset_or_blank_name_uses_this_machines_fqdn_else_the_from_domain() -> None:
    assert helo_name(None, FROM, getfqdn=lambda: "mx.example.net") == "mx.example.net"
    assert helo_name("  ", FROM, getfqdn=lambda: "localhost") == "mail.example.com"


def test_the_real_machine_gets_a_name_a_relay_accepts() -> None:
    # Whatever this machine calls itself, the result is a public FQDN, never localhost.
    name = helo_name(None, FROM)
    assert is_public_fqdn(name)
    assert name in (socket.getfqdn().rstrip(".").lower(), "mail.example.com")
