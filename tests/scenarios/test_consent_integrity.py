"""Consent integrity (SPEC 3): consent belongs to an address, and only the person speaks for it.

Two ways in which someone other than the person could once act on their consent:

- *Borrowed consent*: a message naming a consenting person's ``external_id`` with some other
  address went out on her consent, and its links then changed her preferences.
- *Claimed voice*: an API key recorded a grant as if the person had made it on our pages.

Everything here goes through HTTP, a real worker and a real aiosmtpd sink.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from email.message import EmailMessage
from typing import Any

import pytest
from sqlalchemy import func, select

from mailer.preferences.tokens import BadToken, TokenSigner
from tests.conftest import ROOT, auth, unique_email, wait_for
from tests.scenarios.test_unsubscribe import (
    PROMO_DATA,
    assert_plain_page,
    consent,
    deliver,
    delivered,
    link_token,
    path_of,
    preferences_url,
    recipient,
    recipient_id,
    register,
    state_counts,
    unsubscribe_url,
    wait_final,
)

#: Sources only our pages, the inbound listener and the webhooks may write (SPEC 3).
FORBIDDEN_SOURCES = ("preference_center", "double_opt_in", "unsubscribe_link", "one_click",
                     "mailto", "complaint")
#: What the text of a refused grant on a preference page says.
REFUSED_TEXT = "We could not subscribe you"
#: What a preference page opened from a revoke-only link says before anything is posted.
REVOKE_ONLY_TEXT = "no longer the one on your profile"


# --- helpers ------------------------------------------------------------------------------


def ledger_bytes(runtime: Any, external_id: str) -> bytes:
    """Every stored consent event and consent request of one person, as exact bytes."""
    from mailer.store.schema import consent_events, consent_requests

    rid = recipient_id(runtime, external_id)
    with runtime.engine.connect() as conn:
        events = conn.execute(select(consent_events).where(consent_events.c.recipient_id == rid)
                              .order_by(consent_events.c.id)).all()
        requests = conn.execute(select(consent_requests)
                                .where(consent_requests.c.recipient_id == rid)
                                .order_by(consent_requests.c.id)).all()
    return repr([tuple(r) for r in events] + [tuple(r) for r in requests]).encode()


def rows_to(runtime: Any, address: str) -> int:
    """Outbox rows addressed to ``address`` (by its keyed hash, as every row has one)."""
    from mailer.store.schema import messages

    with runtime.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(messages).where(
            messages.c.to_hash == runtime.hash_email(address))).scalar_one())


def received_by(smtp_server: Any, address: str) -> list[Any]:
    """Messages the sink accepted with ``address`` among the envelope recipients."""
    return [m for m in list(smtp_server.messages)
            if address.lower() in (r.lower() for r in m.rcpt_tos)]


def assert_error(response: Any, status: int, code: str) -> None:
    """A SPEC error body with this status and code."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"code", "message", "details"}
    assert error["code"] == code, error


def words(response: Any) -> str:
    """The page's text with every run of white space as one space (HTML wraps freely)."""
    return " ".join(response.text.split())


def confirm_link(mail: EmailMessage) -> str:
    """The path of the confirmation link in a double opt-in mail."""
    [link] = re.findall(r"https://\S+/confirm/\S+", mail.get_body(("plain",)).get_content())
    return path_of(link)


def doi_topic(client: Any, keys: dict[str, str]) -> str:
    """A fresh topic that asks for double opt-in, with a stored promotion template of its own."""
    name = f"doi_{uuid.uuid4().hex[:8]}"
    r = client.put(f"/v1/topics/{name}", headers=auth(keys["marketing"]),
                   json={"title": "Members' digest", "double_opt_in": True})
    assert r.status_code == 201, r.text
    r = client.put(f"/v1/templates/promo-{name}", headers=auth(keys["marketing"]), json={
        "category": "promotion", "topic": name, "subject": "{{ headline }}",
        "html": "<p>{{ headline }}: {{ body }}</p>"})
    assert r.status_code == 201, r.text
    return name


def move(client: Any, keys: dict[str, str], external_id: str, address: str) -> None:
    """The service changes the address on the person's profile."""
    r = client.put(f"/v1/recipients/{external_id}", json={"email": address, "name": "Ada"},
                   headers=auth(keys["recipients"]))
    assert r.status_code == 200, r.text


# --- borrowed consent ---------------------------------------------------------------------


@pytest.mark.db
@pytest.mark.usefixtures("worker")
def test_a_strangers_address_cannot_borrow_a_persons_consent(
    client: Any, keys: dict[str, str], runtime: Any, smtp_server: Any
) -> None:
    # Given Ada, who opted in to the newsletter, and a stranger who never did
    ada = unique_email("ada")
    external_id = register(client, keys, ada)
    assert consent(client, keys, external_id, "newsletter").status_code == 201
    stranger = unique_email("stranger")
    before = state_counts(runtime)
    ledger = ledger_bytes(runtime, external_id)
    # When a promotion and a service alert name Ada's external_id with the stranger's address
    attempts = [
        ("marketing", "newsletter", PROMO_DATA),
        ("transactional", "service_alert",
         {"name": "Ada", "title": "Password changed", "body": "Was it you?"}),
    ]
    for key, template, data in attempts:
        r = client.post("/v1/messages", headers=auth(keys[key]), json={
            "template": template, "data": data,
            "to": {"email": stranger, "external_id": external_id, "name": "Ada"}})
        # Then each is 409 recipient_mismatch
        assert_error(r, 409, "recipient_mismatch")
        assert stranger not in r.text
    # And nothing was queued or written anywhere
    assert state_counts(runtime) == before
    assert rows_to(runtime, stranger) == 0
    assert ledger_bytes(runtime, external_id) == ledger
    # When the same person's address is given in another spelling of the same mailbox
    # (the domain is case-insensitive, SPEC 4), Then it is her address and it is sent
    local, domain = ada.split("@")
    mail = deliver(client, keys, smtp_server, "newsletter",
                   {"email": f"{local}@{domain.upper()}", "external_id": external_id},
                   PROMO_DATA)
    assert mail["To"].addresses[0].addr_spec == ada
    # And by then the worker has long had its chance: the sink holds nothing for the stranger
    assert received_by(smtp_server, ada)
    assert received_by(smtp_server, stranger) == []


@pytest.mark.db
@pytest.mark.usefixtures("worker")
def test_a_batch_refuses_only_the_mismatched_item(
    client: Any, keys: dict[str, str], runtime: Any, smtp_server: Any
) -> None:
    # Given two people who opted in, and a stranger
    ada, bob = unique_email("bada"), unique_email("bbob")
    ada_id, bob_id = register(client, keys, ada), register(client, keys, bob)
    for person in (ada_id, bob_id):
        assert consent(client, keys, person, "newsletter").status_code == 201
    stranger = unique_email("bstranger")
    # When a batch holds a good item, a borrowed one, and another good one
    items = [{"template": "newsletter", "data": PROMO_DATA, "to": to} for to in (
        {"email": ada, "external_id": ada_id},
        {"email": stranger, "external_id": bob_id},
        {"email": bob, "external_id": bob_id},
    )]
    r = client.post("/v1/messages/batch", json={"messages": items},
                    headers=auth(keys["marketing"]))
    # Then the batch is accepted, and only the borrowed item is a recipient_mismatch error
    assert r.status_code == 202, r.text
    first, borrowed, third = r.json()["results"]
    assert first["status"] == third["status"] == "queued"
    assert set(borrowed) == {"error"}
    assert borrowed["error"]["code"] == "recipient_mismatch"
    assert set(borrowed["error"]) == {"code", "message", "details"}
    # And the two good ones are delivered to their own addresses, and the stranger gets nothing
    for result in (first, third):
        final = wait_final(client, keys["marketing"], result["id"])
        assert final["status"] == "sent", final
        assert wait_for(lambda f=final: delivered(smtp_server, f["message_id"]))
    assert rows_to(runtime, stranger) == 0
    assert received_by(smtp_server, stranger) == []


@pytest.mark.db
def test_mailer_send_shows_the_mismatch_and_queues_nothing(
    client: Any, keys: dict[str, str], runtime: Any, env: dict[str, str]
) -> None:
    # Given a person who opted in, and a stranger's address
    external_id = register(client, keys, unique_email("cliada"))
    assert consent(client, keys, external_id, "newsletter").status_code == 201
    stranger = unique_email("clistranger")
    # When an operator sends from the shell with her external id and the stranger's address
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MAILER_")}
    done = subprocess.run(
        [sys.executable, "-m", "mailer.cli", "send", "--template", "newsletter", "--to",
         stranger, "--external-id", external_id, "--data", json.dumps(PROMO_DATA)],
        cwd=ROOT, text=True, capture_output=True, timeout=60,
        env={**clean, "PYTHONPATH": str(ROOT), **env},
    )
    # Then it fails with the mismatch, and no row was written
    assert done.returncode == 1, (done.stdout, done.stderr)
    result = json.loads(done.stdout)
    assert (result["status"], result["error"]["code"]) == (409, "recipient_mismatch")
    assert rows_to(runtime, stranger) == 0


# --- links grant only for the address they were mailed to ---------------------------------


@pytest.mark.db
@pytest.mark.usefixtures("worker")
def test_links_mailed_to_an_old_address_revoke_but_never_grant(
    client: Any, keys: dict[str, str], runtime: Any, smtp_server: Any
) -> None:
    # Given Ada, subscribed to two topics, who received a newsletter at her old address
    old = unique_email("oldaddr")
    external_id = register(client, keys, old)
    for topic in ("newsletter", "product_updates"):
        assert consent(client, keys, external_id, topic).status_code == 201
    mail = deliver(client, keys, smtp_server, "newsletter",
                   {"email": old, "external_id": external_id}, PROMO_DATA)
    old_preferences, old_unsubscribe = path_of(preferences_url(mail)), path_of(
        unsubscribe_url(mail))
    # When her profile moves to a new address
    new = unique_email("newaddr")
    move(client, keys, external_id, new)
    # Then the old preference link still shows her page, saying it cannot subscribe
    page = client.get(old_preferences)
    assert_plain_page(page)
    assert REVOKE_ONLY_TEXT in words(page)
    assert re.search(r'name="third_party_sharing"[^>]*disabled', page.text)
    # When it is used to grant a topic and partner sharing
    before = ledger_bytes(runtime, external_id)
    topics = ["newsletter", "product_updates", "partner_offers", "third_party_sharing"]
    refused = client.post(old_preferences, data={
        "action": "save", "shown": topics,
        "topic": ["newsletter", "product_updates", "partner_offers"],
        "third_party_sharing": "yes"})
    # Then the page answers with a clear refusal, and the ledger is exactly as it was
    assert_plain_page(refused)
    assert REFUSED_TEXT in words(refused) and 'role="alert"' in refused.text
    assert ledger_bytes(runtime, external_id) == before
    # When the old unsubscribe link is used as a mail client's one-click
    r = client.post(old_unsubscribe, content=b"List-Unsubscribe=One-Click",
                    headers={"Content-Type": "application/x-www-form-urlencoded"})
    # Then the newsletter is revoked: a link can always take consent away
    assert_plain_page(r)
    prefs = recipient(client, keys, external_id)["preferences"]
    assert (prefs["newsletter"]["subscribed"], prefs["newsletter"]["source"]) == (
        False, "one_click")
    # And the preference link the unsubscribe page offers is revoke-only as well
    derived = re.search(r'href="https://[^/"]+(/preferences/[^"]+)"', client.get(
        old_unsubscribe).text)
    assert derived is not None
    assert REVOKE_ONLY_TEXT in words(client.get(derived.group(1)))
    # When the old preference link unticks product updates, and ticks the newsletter again
    mixed = client.post(old_preferences, data={"action": "save", "shown": topics[:2],
                                               "topic": ["newsletter"]})
    # Then the revoke is written, the grant refused, and the page says both
    assert_plain_page(mixed)
    assert REFUSED_TEXT in words(mixed) and "Your unsubscribes are saved." in words(mixed)
    view = recipient(client, keys, external_id)
    assert [(e["topic"], e["granted"], e["source"]) for e in view["consents"][-2:]] == [
        ("newsletter", False, "one_click"), ("product_updates", False, "preference_center")]
    # Given a new mail to her current address (after a grant of her own on a signup form)
    assert consent(client, keys, external_id, "newsletter").status_code == 201
    fresh = deliver(client, keys, smtp_server, "newsletter",
                    {"email": new, "external_id": external_id}, PROMO_DATA)
    # Then its preference link may grant (the refusal above came from the address alone)
    granted = client.post(path_of(preferences_url(fresh)), data={
        "action": "save", "shown": topics[:2], "topic": ["newsletter", "product_updates"]})
    assert_plain_page(granted)
    assert REFUSED_TEXT not in words(granted) and "Your choices are saved." in words(granted)
    prefs = recipient(client, keys, external_id)["preferences"]["product_updates"]
    assert (prefs["subscribed"], prefs["source"]) == (True, "preference_center")


@pytest.mark.db
def test_links_minted_before_address_binding_are_revoke_only(
    client: Any, keys: dict[str, str], runtime: Any
) -> None:
    # Given a subscribed person, and links of the old format (no address binding)
    external_id = register(client, keys, unique_email("legacy"))
    assert consent(client, keys, external_id, "newsletter").status_code == 201
    rid = recipient_id(runtime, external_id)
    legacy_p = f"/preferences/{runtime.signer.sign('p', rid)}"
    legacy_u = f"/u/{runtime.signer.sign('u', rid, 'newsletter')}"
    # When the legacy preference link asks for a grant
    before = ledger_bytes(runtime, external_id)
    r = client.post(legacy_p, data={"action": "save", "shown": ["newsletter", "product_updates"],
                                    "topic": ["newsletter", "product_updates"]})
    # Then it is refused, and nothing is written
    assert_plain_page(r)
    assert REFUSED_TEXT in words(r)
    assert ledger_bytes(runtime, external_id) == before
    # When the legacy unsubscribe link is used, Then it still unsubscribes
    assert_plain_page(client.post(legacy_u, data={"scope": "topic"}))
    prefs = recipient(client, keys, external_id)["preferences"]["newsletter"]
    assert (prefs["subscribed"], prefs["source"]) == (False, "unsubscribe_link")
    # And "unsubscribe from all" on the legacy preference link still works
    assert_plain_page(client.post(legacy_p, data={"action": "unsubscribe_all"}))
    view = recipient(client, keys, external_id)
    assert [s["reason"] for s in view["suppressions"]] == ["unsubscribed"]


# --- only the person's own channels speak for the person ----------------------------------


@pytest.mark.db
@pytest.mark.parametrize("granted", [True, False], ids=["grant", "revoke"])
def test_the_api_cannot_claim_the_persons_own_channels(
    client: Any, keys: dict[str, str], runtime: Any, granted: bool
) -> None:
    # Given a person who said no to the newsletter (and yes to product updates)
    address = unique_email("claimed")
    external_id = register(client, keys, address)
    assert consent(client, keys, external_id, "product_updates").status_code == 201
    assert consent(client, keys, external_id, "newsletter", granted=False,
                   source="api").status_code == 201
    tables = state_counts(runtime)
    for source in FORBIDDEN_SOURCES:
        before = ledger_bytes(runtime, external_id)
        # When an API key claims one of the person's own channels
        r = consent(client, keys, external_id,
                    "newsletter" if granted else "product_updates", granted=granted,
                    source=source, evidence={"form": "https://example.test/f", "ip": "192.0.2.1"})
        # Then it is 422 source_not_allowed, and the ledger is byte for byte unchanged
        assert_error(r, 422, "source_not_allowed")
        assert ledger_bytes(runtime, external_id) == before, source
    assert state_counts(runtime) == tables
    # And her "no" still stands
    r = client.post("/v1/messages", headers=auth(keys["marketing"]), json={
        "template": "newsletter", "data": PROMO_DATA,
        "to": {"email": address, "external_id": external_id}})
    assert (r.json()["status"], r.json()["reason"]) == ("suppressed", "unsubscribed")


@pytest.mark.db
def test_a_signup_form_grant_needs_its_evidence(
    client: Any, keys: dict[str, str], runtime: Any
) -> None:
    # Given a person with no consent yet
    external_id = register(client, keys, unique_email("evidence"))
    before = ledger_bytes(runtime, external_id)
    # When a signup_form grant comes without a form URL, or without an IP or user agent
    for evidence in (None, {"ip": "192.0.2.1"}, {"form": "https://example.test/f"},
                     {"form": " ", "user_agent": "Mozilla/5.0"}):
        r = consent(client, keys, external_id, "newsletter", evidence=evidence)
        # Then it is refused, and nothing is written
        assert_error(r, 422, "evidence_required")
    # And an unknown source is refused too
    assert_error(consent(client, keys, external_id, "newsletter", source="telepathy"),
                 422, "invalid_source")
    assert ledger_bytes(runtime, external_id) == before
    # When it comes with the form URL and a user agent, Then it is recorded
    r = consent(client, keys, external_id, "newsletter",
                evidence={"form_url": "https://example.test/f", "user_agent": "Mozilla/5.0"})
    assert r.status_code == 201, r.text
    assert r.json()["status"] == "recorded"


@pytest.mark.db
@pytest.mark.usefixtures("worker")
def test_an_api_grant_on_a_double_opt_in_topic_waits_for_the_confirm_link(
    client: Any, keys: dict[str, str], runtime: Any, smtp_server: Any
) -> None:
    # Given a double opt-in topic, and a person registered by a service
    topic = doi_topic(client, keys)
    address = unique_email("apidoi")
    external_id = register(client, keys, address)
    to = {"email": address, "external_id": external_id}
    promo = {"template": f"promo-{topic}", "data": {"headline": "Hi", "body": "News."}, "to": to}
    # When the service records a grant with source api
    r = consent(client, keys, external_id, topic, source="api")
    # Then the answer says it is pending, and a confirmation mail is on its way
    assert r.status_code == 201, r.text
    body = r.json()
    assert (body["status"], body["confirmation"], body["id"]) == ("pending", "queued", None)
    # And the topic is not active: no ledger grant, and its promotions are suppressed
    view = recipient(client, keys, external_id)
    assert view["preferences"][topic]["subscribed"] is False
    assert not [e for e in view["consents"] if e["topic"] == topic]
    sent = client.post("/v1/messages", json=promo, headers=auth(keys["marketing"])).json()
    assert (sent["status"], sent["reason"]) == ("suppressed", "no_consent")
    # And the mail is a consent_confirmation, delivered to the person's address
    final = wait_final(client, keys["admin"], body["confirmation_message_id"])
    assert (final["status"], final["template"]) == ("sent", "consent_confirmation")
    [mail] = wait_for(lambda: delivered(smtp_server, final["message_id"]))
    assert mail["To"].addresses[0].addr_spec == address
    path = confirm_link(mail)
    # When the link is only fetched, Then nothing changes yet
    before = ledger_bytes(runtime, external_id)
    assert "Yes, subscribe me" in client.get(path).text
    assert ledger_bytes(runtime, external_id) == before
    # When the person posts the confirmation
    done = client.post(path, data={"confirm": "yes"})
    # Then the topic becomes active with a double_opt_in grant that remembers the api request
    assert_plain_page(done)
    assert "You are subscribed" in words(done)
    grants = [e for e in recipient(client, keys, external_id)["consents"] if e["topic"] == topic]
    assert [(e["granted"], e["source"]) for e in grants] == [(True, "double_opt_in")]
    assert grants[0]["evidence"]["request_source"] == "api"
    sent = client.post("/v1/messages", json=promo, headers=auth(keys["marketing"])).json()
    assert sent["status"] == "queued", sent


@pytest.mark.db
@pytest.mark.parametrize("source", ["import", "admin", "signup_form"])
def test_every_api_source_is_pending_on_a_double_opt_in_topic(
    client: Any, keys: dict[str, str], runtime: Any, source: str
) -> None:
    from mailer.store.schema import messages

    # Given a double opt-in topic and a person
    topic = doi_topic(client, keys)
    address = unique_email(f"doi{source}")
    external_id = register(client, keys, address)
    # When any source the API may record grants it
    r = consent(client, keys, external_id, topic, source=source)
    # Then it is pending, with a confirmation mail accepted for the person's address
    assert r.status_code == 201, r.text
    assert (r.json()["status"], r.json()["confirmation"]) == ("pending", "queued")
    assert recipient(client, keys, external_id)["preferences"][topic]["subscribed"] is False
    with runtime.engine.connect() as conn:
        row = conn.execute(select(messages.c.template, messages.c.to_hash)
                           .where(messages.c.id == r.json()["confirmation_message_id"])).one()
    assert (row.template, row.to_hash) == ("consent_confirmation", runtime.hash_email(address))


@pytest.mark.db
def test_a_confirm_link_for_an_old_address_confirms_nothing(
    client: Any, keys: dict[str, str], runtime: Any
) -> None:
    # Given a pending double opt-in, confirmed by a link mailed to the address of that time
    topic = doi_topic(client, keys)
    external_id = register(client, keys, unique_email("doiold"))
    assert consent(client, keys, external_id, topic, source="api").json()["status"] == "pending"
    old_link = f"/confirm/{link_token(runtime, 'c', external_id, topic)}"
    legacy_link = f"/confirm/{runtime.signer.sign('c', recipient_id(runtime, external_id), topic)}"
    # When the profile moves to another address
    move(client, keys, external_id, unique_email("doinew"))
    before = ledger_bytes(runtime, external_id)
    # Then the old link shows a page that says it cannot confirm, and writes nothing
    for method in ("GET", "POST"):
        page = client.request(method, old_link)
        assert_plain_page(page)
        assert "This link cannot confirm" in words(page) and "no longer the one" in words(page)
    # And a link minted before links were bound to addresses cannot confirm either
    page = client.post(legacy_link)
    assert_plain_page(page)
    assert "This link cannot confirm" in words(page) and "older email" in words(page)
    assert ledger_bytes(runtime, external_id) == before
    assert recipient(client, keys, external_id)["preferences"][topic]["subscribed"] is False


# --- the tokens themselves ----------------------------------------------------------------


def test_a_bound_token_names_its_address_only_as_a_keyed_digest() -> None:
    # Given a signer, and the keyed hashes of two addresses
    signer = TokenSigner("current-key-for-binding-tests")
    mine, other = "a" * 64, "b" * 64
    # When a token is minted for one of them
    token = signer.sign("p", 7, "", mine)
    found = signer.verify(token, "p")
    # Then it verifies for that address only, and carries neither the hash nor a prefix of it
    assert signer.mailed_to(found, mine) and not signer.mailed_to(found, other)
    assert mine[:8] not in token and found.address is not None and mine[:8] not in found.address
    # And a token without a binding (the format before this rule) verifies but binds nothing
    legacy = signer.verify(signer.sign("p", 7), "p")
    assert legacy.address is None and not signer.mailed_to(legacy, mine)


def test_a_binding_survives_key_rotation() -> None:
    # Given a token bound to an address under the old key
    email_hash = "c" * 64
    old = TokenSigner("the-old-signing-key-0123456789")
    token = old.sign("u", 9, "newsletter", email_hash)
    # When the key rotates, keeping the old one
    rotated = TokenSigner("the-new-signing-key-0123456789", ["the-old-signing-key-0123456789"])
    # Then the binding still proves the address, and only that one
    found = rotated.verify(token, "u")
    assert rotated.mailed_to(found, email_hash) and not rotated.mailed_to(found, "d" * 64)
    # And once the old key is dropped, the token is not accepted at all
    with pytest.raises(BadToken):
        TokenSigner("the-new-signing-key-0123456789").verify(token, "u")


# --- consent follows the profile's address --------------------------------------------------


@pytest.mark.db
@pytest.mark.usefixtures("worker")
def test_a_promotion_waiting_for_its_time_is_not_sent_to_an_address_the_profile_left(
    client: Any, keys: dict[str, str], runtime: Any, smtp_server: Any
) -> None:
    import time
    from datetime import timedelta

    from mailer.sending.sweeper import sweep
    from mailer.times import iso

    # Given Ada, who opted in to the newsletter at her old address
    old, new = unique_email("moved-old"), unique_email("moved-new")
    external_id = register(client, keys, old)
    assert consent(client, keys, external_id, "newsletter").status_code == 201
    # And a promotion accepted for that address, scheduled two seconds ahead
    send_at = runtime.clock() + timedelta(seconds=2)
    r = client.post("/v1/messages", headers=auth(keys["marketing"]), json={
        "template": "newsletter", "data": PROMO_DATA, "send_at": iso(send_at),
        "to": {"email": old, "external_id": external_id}})
    assert r.status_code == 202, r.text
    accepted = r.json()
    assert accepted["status"] == "scheduled", accepted
    # When the service moves her profile to a new address before it is due
    move(client, keys, external_id, new)
    # And its time comes and the sweeper hands it to the worker
    time.sleep(max((send_at - runtime.clock()).total_seconds(), 0) + 0.1)
    assert sweep(runtime).enqueued >= 1
    # Then the worker suppresses it for want of consent: her consent speaks for her
    # current address only (SPEC 3), and the old one has none of its own
    final = wait_final(client, keys["marketing"], accepted["id"])
    assert (final["status"], final["reason"]) == ("suppressed", "no_consent"), final
    # And nothing reached the sink, under that Message-ID or for either address
    assert delivered(smtp_server, final["message_id"]) == []
    assert received_by(smtp_server, old) == []
    # And her consent still holds where she now is: a new promotion reaches the new address
    mail = deliver(client, keys, smtp_server, "newsletter",
                   {"email": new, "external_id": external_id}, PROMO_DATA)
    assert mail["To"].addresses[0].addr_spec == new
    assert received_by(smtp_server, old) == []
