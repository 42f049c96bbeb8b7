"""Unsubscribing as a mail client and as a person does it: RFC 8058 one-click and the page.

Helpers here are shared by the other recipient-side test files.
"""

from __future__ import annotations

import email
import re
import uuid
from email import policy
from email.message import EmailMessage
from html.parser import HTMLParser
from typing import Any
from urllib.parse import urlsplit

import pytest
from sqlalchemy import func, select

from tests.conftest import auth, unique_email, wait_for

pytestmark = pytest.mark.usefixtures("worker")

PROMO_DATA = {"name": "Ada", "headline": "Autumn news", "body": "All about autumn."}
SIGNUP_EVIDENCE = {"form": "https://example.test/signup", "ip": "192.0.2.10"}


# --- helpers shared with the other recipient-side tests ---------------------------------


def register(client: Any, keys: dict[str, str], address: str) -> str:
    """Create a profile with an active account; return its external id."""
    external_id = f"ext-{uuid.uuid4().hex[:12]}"
    r = client.put(f"/v1/recipients/{external_id}", json={"email": address, "name": "Ada"},
                   headers=auth(keys["recipients"]))
    assert r.status_code == 201, r.text
    return external_id


def consent(client: Any, keys: dict[str, str], external_id: str, topic: str,
            granted: bool = True, source: str = "signup_form", **extra: Any) -> Any:
    """POST one consent event and return the response."""
    body: dict[str, Any] = {"topic": topic, "granted": granted, "source": source, **extra}
    if source == "signup_form" and "evidence" not in extra:
        body["evidence"] = SIGNUP_EVIDENCE
    return client.post(f"/v1/recipients/{external_id}/consents", json=body,
                       headers=auth(keys["recipients"]))


def recipient(client: Any, keys: dict[str, str], external_id: str) -> dict[str, Any]:
    """GET the recipient view (profile, preferences, suppressions, ledger)."""
    r = client.get(f"/v1/recipients/{external_id}", headers=auth(keys["recipients"]))
    assert r.status_code == 200, r.text
    return dict(r.json())


def send(client: Any, key: str, template: str, to: Any, data: dict[str, Any]) -> dict[str, Any]:
    """POST /v1/messages and return the 202 body."""
    r = client.post("/v1/messages", json={"template": template, "to": to, "data": data},
                    headers=auth(key))
    assert r.status_code == 202, r.text
    return dict(r.json())


def wait_final(client: Any, key: str, message_id: str) -> dict[str, Any]:
    """Wait until the message leaves queued/sending and return it."""
    def check() -> Any:
        m = client.get(f"/v1/messages/{message_id}", headers=auth(key)).json()
        return m if m["status"] not in ("queued", "sending") else None
    return dict(wait_for(check))


def delivered(smtp_server: Any, message_id_header: str) -> list[EmailMessage]:
    """Messages the SMTP server accepted with this Message-ID."""
    found = []
    for item in list(smtp_server.messages):
        parsed = email.message_from_bytes(item.data, policy=policy.default)
        if parsed["Message-ID"] == message_id_header:
            assert isinstance(parsed, EmailMessage)
            found.append(parsed)
    return found


def deliver(client: Any, keys: dict[str, str], smtp_server: Any, template: str, to: Any,
            data: dict[str, Any], key: str = "marketing") -> EmailMessage:
    """Send a message, wait until the SMTP server has it, and return it parsed."""
    accepted = send(client, keys[key], template, to, data)
    assert accepted["status"] == "queued", accepted
    final = wait_final(client, keys[key], accepted["id"])
    assert final["status"] == "sent", final
    [mail] = wait_for(lambda: delivered(smtp_server, final["message_id"]))
    return mail


def subscribed_person(client: Any, keys: dict[str, str], smtp_server: Any,
                      prefix: str) -> tuple[str, str, EmailMessage]:
    """A person who opted in to the newsletter and has received one; (address, id, mail)."""
    address = unique_email(prefix)
    external_id = register(client, keys, address)
    assert consent(client, keys, external_id, "newsletter").status_code == 201
    mail = deliver(client, keys, smtp_server, "newsletter",
                   {"email": address, "external_id": external_id}, PROMO_DATA)
    return address, external_id, mail


def path_of(url: str) -> str:
    """The path of an absolute link (the test client talks to the app directly)."""
    return urlsplit(url).path


def links(mail: EmailMessage) -> list[str]:
    """Every http(s) URL in the mail: header values, text part and HTML part."""
    found = re.findall(r"https?://[^\s<>\"']+", str(mail["List-Unsubscribe"] or ""))
    for kind in ("plain", "html"):
        part = mail.get_body((kind,))
        if part is not None:
            found += re.findall(r"https?://[^\s<>\"']+", part.get_content())
    return found


def unsubscribe_url(mail: EmailMessage) -> str:
    """The https URI of the List-Unsubscribe header (RFC 2369 angle brackets)."""
    header = str(mail["List-Unsubscribe"])
    [url] = re.findall(r"<(https://[^>]+)>", header)
    return url


def preferences_url(mail: EmailMessage) -> str:
    """The preference-centre link of the footer."""
    [url] = {u for u in links(mail) if "/preferences/" in u}
    return url


def state_counts(runtime: Any) -> dict[str, int]:
    """Row counts of every table a public page could write to."""
    from mailer.store.schema import consent_events, consent_requests, messages, suppressions

    with runtime.engine.connect() as conn:
        return {t.name: int(conn.execute(select(func.count()).select_from(t)).scalar_one())
                for t in (consent_events, suppressions, consent_requests, messages)}


def assert_plain_page(response: Any, status: int = 200) -> None:
    """A public page: the status, HTML, no cookie, no redirect, a strict CSP."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("text/html")
    assert "set-cookie" not in response.headers
    assert "location" not in response.headers
    assert not response.history
    assert "default-src 'none'" in response.headers["content-security-policy"]
    assert response.headers["referrer-policy"] == "no-referrer"


# --- RFC 8058 one-click, as a mail client sends it ----------------------------------------


def _urlencoded() -> tuple[bytes, str]:
    return b"List-Unsubscribe=One-Click", "application/x-www-form-urlencoded"


def _multipart() -> tuple[bytes, str]:
    boundary = f"----client{uuid.uuid4().hex}"
    body = (f"--{boundary}\r\n"
            'Content-Disposition: form-data; name="List-Unsubscribe"\r\n\r\n'
            f"One-Click\r\n--{boundary}--\r\n").encode()
    return body, f"multipart/form-data; boundary={boundary}"


@pytest.mark.parametrize("encode", [_urlencoded, _multipart], ids=["urlencoded", "multipart"])
def test_one_click_as_a_mail_client_stops_promotions_but_not_service_mail(
    client: Any, keys: dict[str, str], smtp_server: Any, encode: Any
) -> None:
    # Given a person who received a promotion
    address, external_id, mail = subscribed_person(client, keys, smtp_server, "oneclick")
    assert mail["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    url = unsubscribe_url(mail)
    # When their mail client sends exactly the RFC 8058 POST: no cookies, no auth
    body, content_type = encode()
    response = client.post(path_of(url), content=body, follow_redirects=False,
                           headers={"Content-Type": content_type})
    # Then it answers 200 with no Location and no Set-Cookie
    assert_plain_page(response)
    assert "You are unsubscribed" in response.text
    # And the revoke was written before the answer, with source one_click
    ledger = recipient(client, keys, external_id)["consents"]
    assert (ledger[-1]["topic"], ledger[-1]["granted"], ledger[-1]["source"]) == (
        "newsletter", False, "one_click")
    # And a repeated POST (clients retry) changes nothing
    again = client.post(path_of(url), content=body, headers={"Content-Type": content_type})
    assert again.status_code == 200
    assert recipient(client, keys, external_id)["consents"] == ledger
    # And the next promotion is suppressed at once
    to = {"email": address, "external_id": external_id}
    promo = send(client, keys["marketing"], "newsletter", to, PROMO_DATA)
    assert (promo["status"], promo["reason"]) == ("suppressed", "unsubscribed")
    # While a service alert and a legal notice still go out
    deliver(client, keys, smtp_server, "service_alert", to,
            {"name": "Ada", "title": "Password changed", "body": "Was it you?"},
            key="transactional")
    deliver(client, keys, smtp_server, "legal_notice", to,
            {"name": "Ada", "title": "Terms update", "body": "New terms."}, key="legal")


def test_page_form_unsubscribes_the_topic_with_source_unsubscribe_link(
    client: Any, keys: dict[str, str], smtp_server: Any, runtime: Any
) -> None:
    # Given a delivered promotion whose link a person opens in a browser
    _, external_id, mail = subscribed_person(client, keys, smtp_server, "pageform")
    path = path_of(unsubscribe_url(mail))
    before = state_counts(runtime)
    page = client.get(path)
    # Then the page asks, and changed nothing
    assert_plain_page(page)
    assert 'method="post"' in page.text and "Unsubscribe from Newsletter" in page.text
    assert state_counts(runtime) == before
    # When they press the topic button
    response = client.post(path, data={"scope": "topic"})
    # Then the newsletter is revoked with source unsubscribe_link, and nothing else
    assert_plain_page(response)
    view = recipient(client, keys, external_id)
    assert view["consents"][-1]["source"] == "unsubscribe_link"
    assert view["preferences"]["newsletter"]["subscribed"] is False
    assert view["suppressions"] == []


def test_unsubscribe_from_all_marketing_revokes_every_topic_and_suppresses(
    client: Any, keys: dict[str, str], smtp_server: Any, runtime: Any
) -> None:
    # Given a person subscribed to two topics and to partner sharing
    address, external_id, mail = subscribed_person(client, keys, smtp_server, "allmkt")
    assert consent(client, keys, external_id, "product_updates").status_code == 201
    assert consent(client, keys, external_id, "third_party_sharing").status_code == 201
    # When they choose "unsubscribe from all marketing" on the page
    response = client.post(path_of(unsubscribe_url(mail)), data={"scope": "all"})
    assert_plain_page(response)
    assert "no more marketing" in response.text
    # Then every topic and the sharing choice are revoked, and marketing is suppressed
    view = recipient(client, keys, external_id)
    assert all(not p["subscribed"] for p in view["preferences"].values())
    assert all(p["source"] == "unsubscribe_link" for p in view["preferences"].values())
    assert view["third_party_sharing"]["subscribed"] is False
    assert [(s["scope"], s["reason"]) for s in view["suppressions"]] == [
        ("marketing", "unsubscribed")]
    # And doing it again writes nothing new
    before = state_counts(runtime)
    assert client.post(path_of(unsubscribe_url(mail)), data={"scope": "all"}).status_code == 200
    assert state_counts(runtime) == before
    # And a product update is suppressed too
    to = {"email": address, "external_id": external_id}
    promo = send(client, keys["admin"], "newsletter", to, PROMO_DATA)
    assert promo["status"] == "suppressed"


@pytest.mark.parametrize("method", ["GET", "HEAD", "POST"])
def test_bad_tokens_are_404_and_change_nothing(
    client: Any, keys: dict[str, str], runtime: Any, method: str
) -> None:
    # Given a real token of each kind, then broken in different ways
    address = unique_email("badtok")
    external_id = register(client, keys, address)
    rid = recipient_id(runtime, external_id)
    good_u = runtime.signer.sign("u", rid, "newsletter")
    good_p = runtime.signer.sign("p", rid)
    kid, payload, sig = good_u.split(".")
    flipped = sig[:-1] + ("A" if sig[-1] != "A" else "B")
    broken = [
        f"/u/{kid}.{payload}.{flipped}",          # tampered signature
        f"/u/{kid}.{payload[:-2]}xx.{sig}",        # tampered payload
        f"/u/00000000.{payload}.{sig}",            # unknown key id
        f"/u/{good_p}",                            # a preference token on the unsubscribe page
        f"/preferences/{good_u}",                  # and the other way round
        f"/confirm/{good_u}",
        "/u/not-a-token",
        "/preferences/..",
    ]
    before = state_counts(runtime)
    for path in broken:
        # When a bad token is used
        response = client.request(method, path, data={"List-Unsubscribe": "One-Click"}
                                  if method == "POST" else None)
        # Then the answer is 400/404 with no cookie, and nothing changed
        assert response.status_code in (400, 404), (path, response.status_code)
        assert "set-cookie" not in response.headers
    assert state_counts(runtime) == before
    assert recipient(client, keys, external_id)["consents"] == []


def recipient_id(runtime: Any, external_id: str) -> int:
    """The row id of a profile (what tokens name)."""
    from mailer.store.schema import recipients

    with runtime.engine.connect() as conn:
        return int(conn.execute(select(recipients.c.id)
                                .where(recipients.c.external_id == external_id)).scalar_one())


def link_token(runtime: Any, purpose: str, external_id: str, topic: str = "") -> str:
    """A token as a mail to the profile's current address carries it (address-bound)."""
    from mailer.store.schema import recipients

    with runtime.engine.connect() as conn:
        row = conn.execute(select(recipients.c.id, recipients.c.email_hash)
                           .where(recipients.c.external_id == external_id)).one()
    return str(runtime.signer.sign(purpose, row.id, topic, row.email_hash))


def test_a_thousand_gets_and_heads_change_nothing(
    client: Any, keys: dict[str, str], runtime: Any
) -> None:
    # Given a subscribed person with unsubscribe, preference and confirmation links
    address = unique_email("scanner")
    external_id = register(client, keys, address)
    assert consent(client, keys, external_id, "newsletter").status_code == 201
    rid = recipient_id(runtime, external_id)
    urls = [f"/u/{runtime.signer.sign('u', rid, 'newsletter')}",
            f"/preferences/{runtime.signer.sign('p', rid)}"]
    before = state_counts(runtime)
    ledger = recipient(client, keys, external_id)["consents"]
    # When a link scanner fetches them 1,000 times with GET and HEAD
    for i in range(250):
        for url in urls:
            for method in ("GET", "HEAD"):
                response = client.request(method, url)
                assert response.status_code == 200
                assert "set-cookie" not in response.headers
                if i == 0 and method == "HEAD":
                    assert response.headers["content-type"].startswith("text/html")
    # Then no row was added anywhere and the person is still subscribed
    assert state_counts(runtime) == before
    view = recipient(client, keys, external_id)
    assert view["consents"] == ledger
    assert view["preferences"]["newsletter"]["subscribed"] is True


class _Resources(HTMLParser):
    """Collects what a page would load or link to."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.urls: list[str] = []
        self.unlabelled: list[str] = []
        self.labels: set[str] = set()
        self.inputs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        values = dict(attrs)
        for name in ("src", "href", "action", "srcset", "data", "poster"):
            if values.get(name):
                self.urls.append(str(values[name]))
        if tag == "label" and values.get("for"):
            self.labels.add(str(values["for"]))
        if tag == "input" and values.get("type") == "checkbox":
            self.inputs.append(str(values.get("id")))


def test_pages_are_small_accessible_and_load_nothing_from_other_hosts(
    client: Any, keys: dict[str, str], runtime: Any
) -> None:
    # Given every kind of public page
    address = unique_email("pages")
    external_id = register(client, keys, address)
    rid = recipient_id(runtime, external_id)
    pages = [
        client.get(f"/u/{runtime.signer.sign('u', rid, 'newsletter')}"),
        client.post(f"/u/{runtime.signer.sign('u', rid, 'newsletter')}", data={"scope": "x"}),
        client.get(f"/preferences/{runtime.signer.sign('p', rid)}"),
        client.get(f"/confirm/{runtime.signer.sign('c', rid, 'newsletter')}"),
        client.get("/u/broken"),
    ]
    public = runtime.settings.public_url
    for response in pages:
        assert response.status_code in (200, 404)
        assert "set-cookie" not in response.headers
        html = response.text
        parsed = _Resources()
        parsed.feed(html)
        # Then nothing is fetched: no scripts, stylesheets, images or frames at all
        assert not {"script", "link", "img", "iframe", "object", "embed"} & set(parsed.tags)
        assert "url(" not in html and "@import" not in html
        # And every link stays on our own site
        for url in parsed.urls:
            assert url == "" or url.startswith(public + "/"), url
        # And it is a small, mobile-friendly, labelled page
        assert len(html) < 12_000
        assert '<html lang="en">' in html
        assert 'name="viewport"' in html
        assert set(parsed.inputs) <= parsed.labels
