"""What every promotion carries (SPEC 6): list headers, footer, and the postal-address rule."""

from __future__ import annotations

import pytest

from mailer.config import PROJECT_ROOT
from mailer.errors import ValidationFailed
from mailer.mail.templates import Footer, Rendered
from mailer.sending.compliance import (
    PromotionLinks,
    add_footer,
    has_postal_address,
    list_headers,
    require_postal_address,
)

LINKS = PromotionLinks(unsubscribe="https://mail.example.test/u/TOKEN",
                       preferences="https://mail.example.test/preferences/PTOKEN")
POSTAL = "Example Ltd, 1 Example Street, 00000 Example City"


def test_a_promotion_carries_one_click_unsubscribe_and_its_list_id() -> None:
    # Given the links of one promotion of the newsletter / When its headers are made
    headers = dict(list_headers("newsletter", "example.test", LINKS))
    # Then List-Unsubscribe holds the https link only (RFC 2369), with the RFC 8058 body
    assert headers == {
        "List-Unsubscribe": "<https://mail.example.test/u/TOKEN>",
        "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
        "List-Id": "<newsletter.example.test>",
    }


def test_a_mailto_unsubscribe_is_offered_second_when_a_listener_answers_it() -> None:
    # Given an inbound listener's mailto: address (SPEC 12)
    mailto = "mailto:unsubscribe+T@in.example.test?subject=unsubscribe"
    links = PromotionLinks(LINKS.unsubscribe, LINKS.preferences, unsubscribe_mailto=mailto)
    # When the headers are made / Then the https URI stays first, for one-click clients
    headers = dict(list_headers("newsletter", "example.test", links))
    assert headers["List-Unsubscribe"] == f"<{LINKS.unsubscribe}>, <{mailto}>"


def test_the_footer_names_the_sender_the_reason_and_both_links() -> None:
    # Given a rendered promotion with a body element, and the shipped footer
    footer = Footer(PROJECT_ROOT / "templates" / "_system")
    rendered = Rendered("Autumn news", "<html><body><p>News</p></body></html>", "News\n")
    # When the footer is added
    out = add_footer(footer, rendered, topic_title="Newsletter", links=LINKS,
                     postal_address=POSTAL)
    # Then both parts carry the postal address and both links, the subject is untouched
    assert out.subject == "Autumn news"
    for part in (out.html, out.text):
        assert POSTAL in part and LINKS.unsubscribe in part and LINKS.preferences in part
    # And in HTML the footer sits inside the body, after the content
    assert out.html.index("News") < out.html.index(POSTAL) < out.html.lower().index("</body>")
    # And the text part begins with the original text
    assert out.text.startswith("News\n")


@pytest.mark.parametrize("configured", [None, ""])
def test_no_promotion_without_a_postal_address(configured: str | None) -> None:
    # Given no postal address configured / When a promotion asks / Then a 422 says why
    assert not has_postal_address(configured)
    with pytest.raises(ValidationFailed) as refused:
        require_postal_address(configured)
    assert (refused.value.status, refused.value.code) == (422, "postal_address_missing")
    # And with one configured it passes
    require_postal_address(POSTAL)
