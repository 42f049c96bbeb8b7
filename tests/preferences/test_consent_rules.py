"""SPEC 3 consent rules through the API: latest wins, no silent re-subscription, double opt-in."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import func, select

from tests.conftest import auth, unique_email
from tests.scenarios.test_unsubscribe import (
    PROMO_DATA,
    assert_plain_page,
    consent,
    delivered,
    link_token,
    path_of,
    recipient,
    register,
    send,
    state_counts,
    wait_final,
)


def at(minutes_ago: int) -> str:
    """An ISO time some minutes in the past."""
    return (datetime.now(UTC) - timedelta(minutes=minutes_ago)).isoformat()


def promotion_status(client: Any, keys: dict[str, str], address: str,
                     external_id: str) -> tuple[str, str | None]:
    """Accept a newsletter for the person; return (status, reason) of the decision."""
    result = send(client, keys["marketing"], "newsletter",
                  {"email": address, "external_id": external_id}, PROMO_DATA)
    return result["status"], result.get("reason")


def doi_topic(client: Any, keys: dict[str, str]) -> str:
    """A fresh first-party topic that asks for double opt-in."""
    name = f"doi_{uuid.uuid4().hex[:8]}"
    r = client.put(f"/v1/topics/{name}", json={"title": "Weekly digest",
                                                "description": "Our best articles.",
                                                "double_opt_in": True},
                   headers=auth(keys["marketing"]))
    assert r.status_code == 201, r.text
    return name


# --- latest wins, deterministically -------------------------------------------------------


def test_latest_occurred_at_wins_not_the_order_of_arrival(
    client: Any, keys: dict[str, str]
) -> None:
    # Given a grant made 5 minutes ago
    address = unique_email("latest")
    external_id = register(client, keys, address)
    assert consent(client, keys, external_id, "newsletter", occurred_at=at(5)).status_code == 201
    # When a revoke dated 60 minutes ago arrives afterwards (a late import of old data)
    late = consent(client, keys, external_id, "newsletter", granted=False, source="import",
                   occurred_at=at(60))
    assert late.status_code == 201
    # Then the newer grant still decides, and a promotion is allowed
    prefs = recipient(client, keys, external_id)["preferences"]["newsletter"]
    assert (prefs["subscribed"], prefs["source"]) == (True, "signup_form")
    assert promotion_status(client, keys, address, external_id) == ("queued", None)
    # When a revoke dated now arrives
    assert consent(client, keys, external_id, "newsletter", granted=False,
                   source="api").status_code == 201
    # Then it decides
    assert promotion_status(client, keys, address, external_id) == ("suppressed", "unsubscribed")


@pytest.mark.parametrize("revoke_first", [True, False])
def test_a_revoke_beats_a_grant_at_the_same_instant(
    client: Any, keys: dict[str, str], revoke_first: bool
) -> None:
    # Given a grant and a revoke with the same occurred_at, in either order
    address = unique_email("tie")
    external_id = register(client, keys, address)
    moment = at(1)
    order = [False, True] if revoke_first else [True, False]
    for granted in order:
        r = consent(client, keys, external_id, "newsletter", granted=granted,
                    source="signup_form" if granted else "api", occurred_at=moment)
        assert r.status_code == 201, r.text
    # Then the revoke wins: no promotion
    assert recipient(client, keys, external_id)["preferences"]["newsletter"]["subscribed"] is False
    assert promotion_status(client, keys, address, external_id) == ("suppressed", "unsubscribed")


# --- no silent re-subscription ------------------------------------------------------------


@pytest.mark.parametrize("source", ["import", "api", "admin"])
def test_an_operator_grant_after_a_revoke_is_409_and_writes_nothing(
    client: Any, keys: dict[str, str], source: str
) -> None:
    # Given a person who said no
    external_id = register(client, keys, unique_email("conflict"))
    assert consent(client, keys, external_id, "newsletter").status_code == 201
    assert consent(client, keys, external_id, "newsletter", granted=False,
                   source="api").status_code == 201
    ledger = recipient(client, keys, external_id)["consents"]
    # When an import, a service or staff tries to turn it back to yes
    r = consent(client, keys, external_id, "newsletter", source=source,
                evidence={"note": "re-imported list"})
    # Then it is refused with consent_conflict, and the ledger is unchanged
    assert r.status_code == 409, r.text
    assert r.json()["error"]["code"] == "consent_conflict"
    assert set(r.json()["error"]) == {"code", "message", "details"}
    assert recipient(client, keys, external_id)["consents"] == ledger


def test_only_the_persons_own_action_turns_a_no_back_to_yes(
    client: Any, keys: dict[str, str], runtime: Any
) -> None:
    # Given a person who revoked
    address = unique_email("ownaction")
    external_id = register(client, keys, address)
    assert consent(client, keys, external_id, "newsletter", granted=False,
                   source="api").status_code == 201
    # When a signup form reports a grant without evidence, Then it is refused
    r = consent(client, keys, external_id, "newsletter", evidence=None)
    assert r.status_code == 409
    # When it reports one with evidence (form URL, IP), Then it is recorded
    assert consent(client, keys, external_id, "newsletter").status_code == 201
    assert promotion_status(client, keys, address, external_id) == ("queued", None)
    # And after another revoke, the preference centre (a link mailed to them) may grant again
    assert consent(client, keys, external_id, "newsletter", granted=False,
                   source="api").status_code == 201
    page = client.post(f"/preferences/{link_token(runtime, 'p', external_id)}",
                       data={"action": "save", "shown": ["newsletter"], "topic": ["newsletter"]})
    assert_plain_page(page)
    prefs = recipient(client, keys, external_id)["preferences"]["newsletter"]
    assert (prefs["subscribed"], prefs["source"]) == (True, "preference_center")


def test_policy_version_and_evidence_are_recorded(
    client: Any, keys: dict[str, str], runtime: Any
) -> None:
    # Given grants with and without an explicit policy version
    external_id = register(client, keys, unique_email("policy"))
    evidence = {"form": "https://example.test/signup", "ip": "192.0.2.7",
                "user_agent": "Mozilla/5.0"}
    assert consent(client, keys, external_id, "newsletter", evidence=evidence).status_code == 201
    assert consent(client, keys, external_id, "product_updates",
                   policy_version="2024-05").status_code == 201
    # Then the ledger holds the version in force, or the one given, and the evidence
    ledger = {e["topic"]: e for e in recipient(client, keys, external_id)["consents"]}
    assert ledger["newsletter"]["policy_version"] == runtime.settings.policy_version
    assert ledger["newsletter"]["evidence"] == evidence
    assert ledger["product_updates"]["policy_version"] == "2024-05"


def test_a_new_policy_version_changes_no_ones_preferences(
    client: Any, keys: dict[str, str], env: dict[str, str]
) -> None:
    from fastapi.testclient import TestClient

    from mailer.api.app import create_app
    from mailer.config import Settings
    from mailer.runtime import Runtime
    from mailer.sending.queue import ListEnqueuer

    # Given a subscribed person under policy version 1
    external_id = register(client, keys, unique_email("newpolicy"))
    assert consent(client, keys, external_id, "newsletter").status_code == 201
    before = recipient(client, keys, external_id)
    # When the service restarts with policy version 2
    settings = Settings.from_environ({**env, "MAILER_POLICY_VERSION": "2"})
    with TestClient(create_app(Runtime.from_settings(settings, ListEnqueuer()))) as new:
        after = new.get(f"/v1/recipients/{external_id}", headers=auth(keys["recipients"])).json()
    # Then their preferences and ledger are exactly as they were
    assert after["preferences"] == before["preferences"]
    assert after["consents"] == before["consents"]


# --- double opt-in ------------------------------------------------------------------------


@pytest.mark.usefixtures("worker")
def test_double_opt_in_waits_for_the_link_in_the_confirmation_mail(
    client: Any, keys: dict[str, str], runtime: Any, smtp_server: Any
) -> None:
    # Given a topic that asks for double opt-in
    topic = doi_topic(client, keys)
    address = unique_email("doi")
    external_id = register(client, keys, address)
    # When a signup form reports a grant
    r = consent(client, keys, external_id, topic)
    # Then it is pending, not a ledger grant, and a confirmation mail goes out
    assert r.status_code == 201, r.text
    body = r.json()
    assert (body["status"], body["confirmation"]) == ("pending", "queued")
    view = recipient(client, keys, external_id)
    assert view["preferences"][topic]["subscribed"] is False
    assert not [e for e in view["consents"] if e["topic"] == topic]
    assert promotion_status(client, keys, address, external_id)[0] == "suppressed"
    final = wait_final(client, keys["admin"], body["confirmation_message_id"])
    assert (final["status"], final["category"], final["template"]) == (
        "sent", "registration_confirmation", "consent_confirmation")
    [mail] = delivered(smtp_server, final["message_id"])
    assert mail["List-Unsubscribe"] is None  # transactional
    text = mail.get_body(("plain",)).get_content()
    assert "Weekly digest" in text
    [link] = re.findall(r"https://\S+/confirm/\S+", text)
    path = path_of(link)
    # When the link is fetched (by a scanner or the person), Then nothing changes yet
    before = state_counts(runtime)
    for method in ("GET", "HEAD"):
        page = client.request(method, path)
        assert_plain_page(page)
    assert "Yes, subscribe me" in client.get(path).text
    assert state_counts(runtime) == before
    # When the person presses the button
    confirmed = client.post(path, data={"confirm": "yes"})
    # Then the ledger gets a grant with source double_opt_in, carrying the signup evidence
    assert_plain_page(confirmed)
    assert "You are subscribed" in confirmed.text
    grants = [e for e in recipient(client, keys, external_id)["consents"] if e["topic"] == topic]
    assert [(e["granted"], e["source"]) for e in grants] == [(True, "double_opt_in")]
    assert grants[0]["evidence"]["request_source"] == "signup_form"
    assert grants[0]["evidence"]["request_evidence"]["form"] == "https://example.test/signup"
    # And confirming again is harmless
    again = client.post(path)
    assert again.status_code == 200 and "already confirmed" in again.text
    assert len([e for e in recipient(client, keys, external_id)["consents"]
                if e["topic"] == topic]) == 1
    # And the confirmation mail did not use up the one registration confirmation
    reg = send(client, keys["transactional"], "registration_confirmation",
               {"email": address, "external_id": external_id},
               {"name": "Ada", "confirm_url": "https://example.test/welcome"})
    assert reg["status"] == "queued", reg


def test_confirmation_mails_are_limited_per_address_per_day(
    client: Any, keys: dict[str, str], runtime: Any
) -> None:
    from mailer.preferences.double_opt_in import DEFAULT_CONFIRMATION_LIMIT
    from mailer.store.schema import messages

    # Given a double opt-in topic and someone typing the same address into a form again and again
    topic = doi_topic(client, keys)
    address = unique_email("doilimit")
    external_id = register(client, keys, address)
    answers = [consent(client, keys, external_id, topic)
               for _ in range(DEFAULT_CONFIRMATION_LIMIT + 2)]
    # Then every request is pending, but only the first few send a mail
    assert all(a.status_code == 201 for a in answers)
    assert [a.json()["confirmation"] for a in answers] == (
        ["queued"] * DEFAULT_CONFIRMATION_LIMIT + ["rate_limited"] * 2)
    with runtime.engine.connect() as conn:
        mails = conn.execute(select(func.count()).select_from(messages).where(
            messages.c.template == "consent_confirmation", messages.c.to_email == address,
        )).scalar_one()
    assert mails == DEFAULT_CONFIRMATION_LIMIT
    # And any of the mailed links still confirms
    token = link_token(runtime, "c", external_id, topic)
    assert "You are subscribed" in client.post(f"/confirm/{token}").text


def test_double_opt_in_rules_for_other_sources(
    client: Any, keys: dict[str, str], runtime: Any
) -> None:
    topic = doi_topic(client, keys)
    # Given an operator import, Then it waits for confirmation like a signup form (SPEC 3:
    # a grant through the API on a double opt-in topic is pending, whatever its source)
    external_id = register(client, keys, unique_email("doiimport"))
    r = consent(client, keys, external_id, topic, source="import")
    assert r.status_code == 201, r.text
    assert r.json()["status"] == "pending"
    assert recipient(client, keys, external_id)["preferences"][topic]["subscribed"] is False
    # Given a person who revoked, When a signup form without evidence reports a grant,
    # Then it is a consent_conflict before any mail is sent
    assert consent(client, keys, external_id, topic, granted=False,
                   source="api").status_code == 201
    refused = consent(client, keys, external_id, topic, evidence=None)
    assert refused.status_code == 409
    assert refused.json()["error"]["code"] == "consent_conflict"
    # Given a confirmation link with no pending request, Then it says so and changes nothing
    other = register(client, keys, unique_email("doinone"))
    token = link_token(runtime, "c", other, topic)
    before = state_counts(runtime)
    answer = client.post(f"/confirm/{token}")
    assert_plain_page(answer)
    assert "expired" in answer.text
    assert state_counts(runtime) == before
