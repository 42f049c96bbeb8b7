"""What every promotion carries, and what it may not be sent without (SPEC 6).

Pure: values in, headers and footer out. Acceptance, the campaign API and the worker
all ask :func:`require_postal_address`; the worker adds :func:`list_headers` and
:func:`add_footer` to each promotion it builds. Transactional categories carry none of it.
"""

from __future__ import annotations

from dataclasses import dataclass

from mailer.errors import ValidationFailed
from mailer.mail.locales import DEFAULT_LOCALE
from mailer.mail.templates import Footer, Rendered

#: The reason a promotion is refused (422) or failed (worker) without a postal address.
POSTAL_ADDRESS_MISSING = "postal_address_missing"
#: RFC 8058 section 3.1: the exact body a one-click unsubscribe POST carries.
ONE_CLICK = "List-Unsubscribe=One-Click"


def has_postal_address(postal_address: str | None) -> bool:
    """Whether promotions may be sent at all (a postal address is configured)."""
    # CAN-SPAM (15 U.S.C. 7704(a)(5)(A)(iii)): commercial mail carries a valid physical
    # postal address of the sender; without one no promotion is accepted or sent.
    return bool(postal_address)


def require_postal_address(postal_address: str | None) -> None:
    """Refuse a promotion with 422 ``postal_address_missing`` when none is configured."""
    if not has_postal_address(postal_address):
        raise ValidationFailed(
            "promotions cannot be sent until MAILER_POSTAL_ADDRESS is configured",
            code=POSTAL_ADDRESS_MISSING,
        )


@dataclass(frozen=True)
class PromotionLinks:
    """The links one promotion offers, each signed for its recipient and address."""

    unsubscribe: str
    preferences: str
    #: ``mailto:`` URI of the inbound listener (SPEC 12), only when one honours it.
    unsubscribe_mailto: str | None = None


def list_headers(topic: str, mail_domain: str, links: PromotionLinks) -> list[tuple[str, str]]:
    """``List-Unsubscribe`` (RFC 2369), ``-Post`` (RFC 8058) and ``List-Id`` (RFC 2919)."""
    # The https URI comes first: RFC 8058 one-click works on it alone. A mailto: is
    # advertised only when a listener honours it (SPEC 6).
    uris = f"<{links.unsubscribe}>"
    if links.unsubscribe_mailto:
        uris += f", <{links.unsubscribe_mailto}>"
    return [
        ("List-Unsubscribe", uris),
        ("List-Unsubscribe-Post", ONE_CLICK),
        # Topic names are checked to be a dot-atom list-label when they are created.
        ("List-Id", f"<{topic}.{mail_domain}>"),
    ]


def add_footer(
    footer: Footer, rendered: Rendered, *, topic_title: str, links: PromotionLinks,
    postal_address: str, language: str = DEFAULT_LOCALE, reuse: bool = False,
) -> Rendered:
    """``rendered`` with the footer: postal address, why the person gets it, both links.

    Written in ``language`` (SPEC 14: the recipient's), from the gettext catalogues;
    ``reuse`` fills the footer's cached stencil (the same bytes, rendered once).
    """
    return footer.apply(rendered, {
        "topic_title": topic_title,
        "unsubscribe_url": links.unsubscribe,
        "preferences_url": links.preferences,
        "postal_address": postal_address,
    }, language, reuse=reuse)
