"""Where event webhooks may go: public addresses only, unless the operator allows more.

An endpoint URL is chosen by whoever holds an admin key, and our server makes the
request: pointed at ``127.0.0.1``, ``10.x``, or the cloud metadata service at
``169.254.169.254``, it would let a caller probe or poke the private network behind us
(server-side request forgery). So a target is refused when any address its host resolves
to is loopback, private, link-local, multicast, reserved or otherwise not globally
routable (SPEC 13), at registration and again at every delivery. The delivery connects to
the very address it checked (:mod:`mailer.events.delivery`), so a name that resolves to a
public address for the check and to a private one a moment later (DNS rebinding) gains
nothing. IPv6 forms that embed an IPv4 address (``::ffff:10.0.0.1``, NAT64 ``64:ff9b::``,
6to4 ``2002::``) are judged by the IPv4 address inside. ``MAILER_WEBHOOK_ALLOW_PRIVATE``
turns the address check off, for receivers on the same host or network.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Sequence

import httpx

from mailer.errors import ValidationFailed

#: Longest endpoint URL accepted (and stored).
MAX_URL = 2000
#: RFC 6052 well-known NAT64 prefix: the last 32 bits are the IPv4 destination.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
#: Resolves ``(host, port)`` to IP address strings, in the order to try them.
Resolver = Callable[[str, int], Awaitable[Sequence[str]]]


class TargetRefused(ValidationFailed):
    """Raised when an endpoint URL may not be a target: bad form, or a refused address."""

    code = "webhook_target_refused"


def refusal(ip: IPAddress) -> str | None:
    """Why ``ip`` may not be a webhook target, or None when it may."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return refusal(ip.ipv4_mapped)
        if ip in _NAT64:
            return refusal(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        if ip.sixtofour is not None and (inner := refusal(ip.sixtofour)) is not None:
            return inner
        if ip.is_site_local:
            return "site-local"
    checks = (("loopback", ip.is_loopback), ("unspecified", ip.is_unspecified),
              ("link-local", ip.is_link_local), ("multicast", ip.is_multicast),
              ("reserved", ip.is_reserved), ("private", ip.is_private))
    for name, hit in checks:
        if hit:
            return name
    # What is left but not global: shared address space (100.64.0.0/10, RFC 6598) and
    # the like, reachable only inside a carrier's or our own network.
    return None if ip.is_global else "non-global"


def parse_url(raw: str) -> httpx.URL:
    """An endpoint URL as we accept it: http(s), a host, no credentials, not too long."""
    if len(raw) > MAX_URL:
        raise TargetRefused(f"the URL is longer than {MAX_URL} characters")
    try:
        url = httpx.URL(raw)
    except (httpx.InvalidURL, ValueError, TypeError):
        raise TargetRefused("not a valid URL") from None
    if url.scheme not in ("https", "http"):
        raise TargetRefused("the URL must start with https:// (or http://)")
    if not url.host:
        raise TargetRefused("the URL has no host")
    # The URL is shown by GET /v1/webhook-endpoints and kept in clear; credentials do
    # not belong in it (the signature authenticates us to the receiver).
    if url.userinfo:
        raise TargetRefused("the URL may not hold a user name or password")
    if url.fragment:
        raise TargetRefused("the URL may not have a #fragment")
    return url


def _literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


async def system_resolver(host: str, port: int) -> list[str]:
    """The host's addresses from the system resolver, without repeats, in its order."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    found: list[str] = []
    for info in infos:
        address = str(info[4][0]).split("%", 1)[0]  # drop an IPv6 zone id
        if address not in found:
            found.append(address)
    return found


async def checked_addresses(url: httpx.URL, allow_private: bool,
                            resolve: Resolver = system_resolver) -> list[str]:
    """The addresses to connect to for ``url``, every one of them allowed.

    Raises :class:`TargetRefused` when the host does not resolve, or when any address it
    resolves to is refused: one bad address is enough, since which of them a connection
    would use is not ours to choose.
    """
    host = url.host
    literal = _literal(host)
    if literal is not None:
        addresses = [str(literal)]
    else:
        try:
            addresses = list(await resolve(host, url.port or _default_port(url)))
        except (OSError, UnicodeError):
            raise TargetRefused(f"the host {host!r} does not resolve") from None
        if not addresses:
            raise TargetRefused(f"the host {host!r} does not resolve")
    if not allow_private:
        for address in addresses:
            ip = _literal(address)
            reason = "unparseable" if ip is None else refusal(ip)
            if reason is not None:
                raise TargetRefused(
                    f"the host {host!r} resolves to a {reason} address ({address}); set "
                    "MAILER_WEBHOOK_ALLOW_PRIVATE=true to allow such targets")
    return addresses


def check_target(raw: str, allow_private: bool,
                 resolve: Resolver = system_resolver) -> httpx.URL:
    """Check an endpoint URL at registration; return it parsed, or raise TargetRefused."""
    url = parse_url(raw)
    asyncio.run(checked_addresses(url, allow_private, resolve))
    return url


def _default_port(url: httpx.URL) -> int:
    return 443 if url.scheme == "https" else 80
