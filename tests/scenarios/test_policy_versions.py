"""Privacy-policy versions (SPEC 14): the version each consent records, the listing, and the
notice to every active account, which changes nobody's preferences.

Each test has a database of its own (``fresh_db``): registering a version changes what
every later consent records, which must not leak into the rest of the suite.
"""

from __future__ import annotations

import email
import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from email import policy
from typing import Any

import pytest

from tests.conftest import WorkerProcess, auth, base_env
from tests.scenarios import test_campaigns as campaigns
from tests.scenarios.test_campaigns import Stack
from tests.scenarios.test_unsubscribe import SIGNUP_EVIDENCE, path_of
from tests.services import RedisServer, redis_server_available, require

pytestmark = pytest.mark.db

#: A migrated database of the test's own (SQLite file or PostgreSQL database).
fresh_db = campaigns.fresh_db


@pytest.fixture()
def offline(fresh_db: str) -> Iterator[Stack]:
    """The API on its own database; enqueued ids go to a list (no Redis, no SMTP)."""
    from mailer.sending.queue import ListEnqueuer

    env = base_env(fresh_db, "redis://127.0.0.1:1/0", 1)
    with campaigns._stack(env, None, ListEnqueuer()) as built:
        yield built


@pytest.fixture()
def world(fresh_db: str) -> Iterator[Stack]:
    """The API on its own database, with its own Redis and SMTP sink for a real worker."""
    from tests.smtp_servers import running_smtp_server

    require("redis-server", redis_server_available(), "redis-server is not installed")
    with RedisServer() as redis, running_smtp_server() as (_, port, recorder):
        env = base_env(fresh_db, redis.url, port)
        with campaigns._stack(env, recorder) as built:
            yield built
            built.rt.enqueuer.close()

#: Subjects of the shipped policy_update template, by the language of the version.
SUBJECTS = {"en": "We are updating our privacy policy",
            "de": "Wir aktualisieren unsere Datenschutzerklärung",
            "ru": "Мы обновляем политику конфиденциальности"}


def _admin(stack: Stack) -> str:
    from mailer.keys import create_key

    with stack.rt.engine.begin() as conn:
        return create_key(conn, "admin", ["admin"])


def _register(stack: Stack, key: str, **body: Any) -> Any:
    return stack.client.post("/v1/policy-versions", json=body, headers=auth(key))


def _listing(stack: Stack, key: str) -> list[dict[str, Any]]:
    r = stack.client.get("/v1/policy-versions", headers=auth(key))
    assert r.status_code == 200, r.text
    return list(r.json()["items"])


def _person(stack: Stack, locale: str | None = None) -> str:
    external_id = f"ext-{uuid.uuid4().hex[:12]}"
    body: dict[str, Any] = {"email": f"{external_id}@example.org", "name": "Ada"}
    if locale:
        body["locale"] = locale
    r = stack.client.put(f"/v1/recipients/{external_id}", json=body,
                         headers=auth(stack.keys["recipients"]))
    assert r.status_code == 201, r.text
    return external_id


def _consent(stack: Stack, external_id: str, **body: Any) -> Any:
    payload = {"topic": "newsletter", "granted": True, "source": "signup_form",
               "evidence": SIGNUP_EVIDENCE, **body}
    return stack.client.post(f"/v1/recipients/{external_id}/consents", json=payload,
                             headers=auth(stack.keys["recipients"]))


def _ledger(stack: Stack, external_id: str) -> list[dict[str, Any]]:
    r = stack.client.get(f"/v1/recipients/{external_id}", headers=auth(stack.keys["recipients"]))
    return list(r.json()["consents"])


def test_each_consent_records_the_version_in_force_when_it_happened(offline: Stack) -> None:
    stack, admin = offline, _admin(offline)
    now = stack.rt.clock()
    # Given nothing registered: the configured MAILER_POLICY_VERSION ("1") is in force
    assert _listing(stack, admin) == [{"version": "1", "effective_at": None,
                                       "active_consents": 0, "summary_url": None,
                                       "campaign_id": None}]
    early = _person(stack)
    assert _consent(stack, early).status_code == 201
    # When version 2 is registered as in force since an hour ago, and 3 for next month
    effective = now - timedelta(hours=1)
    r = _register(stack, admin, version="2", effective_at=effective.isoformat(),
                  summary_url="https://example.test/privacy/changes-2")
    assert r.status_code == 201, r.text
    assert r.json()["campaign_id"] is None  # no notify, no campaign
    assert _register(stack, admin, version="3",
                     effective_at=(now + timedelta(days=30)).isoformat()).status_code == 201
    # Then a consent dated before version 2 took effect records 1, and one after records 2
    person = _person(stack)
    before = (effective - timedelta(minutes=5)).isoformat()
    after = (effective + timedelta(minutes=5)).isoformat()
    assert _consent(stack, person, occurred_at=before).status_code == 201
    assert _consent(stack, person, topic="product_updates", occurred_at=after).status_code == 201
    # (one without a date happens now, under 2: version 3 is not in force yet)
    assert _consent(stack, person, topic="newsletter", granted=False, source="api"
                    ).status_code == 201
    # (and a version the caller names is recorded as named: SPEC 7's policy_version)
    named = _person(stack)
    assert _consent(stack, named, policy_version="paper-form-7").status_code == 201
    versions = [(e["topic"], e["granted"], e["policy_version"]) for e in _ledger(stack, person)]
    assert versions == [("newsletter", True, "1"), ("product_updates", True, "2"),
                        ("newsletter", False, "2")]
    assert _ledger(stack, named)[-1]["policy_version"] == "paper-form-7"
    # And a choice on the person's own page records the version in force too
    from mailer.store.recipients import get_recipient

    with stack.rt.engine.connect() as conn:
        recipient_id = get_recipient(conn, early).id
    token = stack.rt.signer.sign("p", recipient_id,
                                 email_hash=stack.rt.hash_email(f"{early}@example.org"))
    page = stack.client.post(f"/preferences/{token}", data={
        "action": "save", "shown": ["newsletter", "product_updates"],
        "topic": ["newsletter", "product_updates"]})
    assert page.status_code == 200
    assert [(e["topic"], e["source"], e["policy_version"]) for e in _ledger(stack, early)] == [
        ("newsletter", "signup_form", "1"), ("product_updates", "preference_center", "2")]
    # And the listing counts the active grants whose deciding event was under each version:
    # early's newsletter (1) and product updates (2), person's product updates (2; their
    # newsletter was revoked), and named's newsletter (not a listed version)
    assert [(i["version"], i["effective_at"] is not None, i["active_consents"])
            for i in _listing(stack, admin)] == [("1", False, 1), ("2", True, 2), ("3", True, 0)]
    assert _listing(stack, admin)[1]["summary_url"] == "https://example.test/privacy/changes-2"


def test_registration_is_checked_and_admin_only(offline: Stack) -> None:
    stack, admin = offline, _admin(offline)
    at = "2031-01-01T00:00:00Z"
    assert _register(stack, admin, version="2031", effective_at=at).status_code == 201
    # A name already registered is a conflict
    r = _register(stack, admin, version="2031", effective_at=at)
    assert (r.status_code, r.json()["error"]["code"]) == (409, "policy_version_exists")
    # Bad input is a 422 with nothing written
    for body in ({"version": "x", "effective_at": "2031-01-01T00:00:00"},
                 {"version": "line\nbreak", "effective_at": at},
                 {"version": " padded", "effective_at": at},
                 {"version": "y", "effective_at": at, "summary_url": "javascript:alert(1)"},
                 {"version": "z", "effective_at": at, "unknown": True},
                 {"version": "z" * 41, "effective_at": at}):
        assert _register(stack, admin, **body).status_code == 422, body
    # Only admin keys register; the configured version is listed first, unregistered
    assert _register(stack, stack.keys["marketing"], version="q",
                     effective_at=at).status_code == 403
    assert [i["version"] for i in _listing(stack, stack.keys["recipients"])] == ["1", "2031"]
    # And registering the configured version itself lists it once, with its time
    assert _register(stack, admin, version="1", effective_at="2020-01-01T00:00:00Z"
                     ).status_code == 201
    assert [(i["version"], i["effective_at"]) for i in _listing(stack, admin)] == [
        ("1", "2020-01-01T00:00:00Z"), ("2031", "2031-01-01T00:00:00Z")]


# --- the notice to every active account ------------------------------------------------------


@dataclass(frozen=True)
class Planted:
    """One person of the population and what the notice should do for them."""

    external_id: str
    email: str
    locale: str | None
    state: str
    #: "sent", a suppression reason, or None (not in the audience at all).
    expect: str | None


#: Every consent state a person can be in, and what a service alert does for each (SPEC 2:
#: it ignores consents and unsubscribes; hard bounce, manual block, complaint and the
#: frequency cap stop it; it goes to active accounts only).
STATES: dict[str, str | None] = {
    "never_asked": "sent", "granted": "sent", "revoked": "sent", "unsubscribed_all": "sent",
    "pending_double_opt_in": "sent", "sharing_granted": "sent", "soft_bounce_limit": "sent",
    "complaint": "complaint", "hard_bounce": "hard_bounce", "manual": "manual",
    "frequency_capped": "frequency_cap", "inactive_account": None, "erased": None,
}
LOCALES = (None, "de-AT", "ru", "fr")
LANGUAGE = {None: "en", "de-AT": "de", "ru": "ru", "fr": "en"}


def _populate(stack: Stack) -> list[Planted]:
    """Two people per state, in rotating languages, written as the system would have."""
    from sqlalchemy import insert

    from mailer.store.schema import (
        consent_events,
        consent_requests,
        messages,
        recipients,
        suppressions,
    )

    rt = stack.rt
    now = rt.clock()
    people: list[Planted] = []
    n = 0
    for state, expect in STATES.items():
        for _ in range(2):
            locale = LOCALES[n % len(LOCALES)]
            n += 1
            external_id = f"pop-{state}-{uuid.uuid4().hex[:6]}"
            address = f"{external_id}@example.org"
            email_hash = rt.hash_email(address)
            with rt.engine.begin() as conn:
                rid = conn.execute(insert(recipients).values(
                    external_id=external_id, email=address, email_hash=email_hash,
                    name=f"Person {n}", locale=locale, attributes={},
                    account_active=state != "inactive_account", created_at=now,
                    updated_at=now)).inserted_primary_key[0]  # type: ignore[index]
                day = now - timedelta(days=2)

                def event(topic: str, granted: bool, source: str, at: datetime | None = None,
                          rid: int = rid, email_hash: str = email_hash, day: datetime = day
                          ) -> dict[str, Any]:
                    at = at or day
                    return {"recipient_id": rid, "email_hash": email_hash, "topic": topic,
                            "granted": granted, "source": source, "policy_version": "1",
                            "occurred_at": at, "recorded_at": at, "evidence": None}

                def block(reason: str, scope: str, expires: datetime | None = None,
                          address: str = address, email_hash: str = email_hash,
                          day: datetime = day) -> dict[str, Any]:
                    return {"email": address, "email_hash": email_hash, "scope": scope,
                            "reason": reason, "source": "test", "created_at": day,
                            "expires_at": expires}

                events: list[dict[str, Any]] = []
                blocks: list[dict[str, Any]] = []
                if state in ("granted", "complaint", "hard_bounce", "manual",
                             "frequency_capped", "inactive_account", "erased",
                             "soft_bounce_limit"):
                    events.append(event("newsletter", True, "signup_form"))
                if state == "revoked":
                    events += [event("newsletter", True, "signup_form"),
                               event("newsletter", False, "unsubscribe_link", now)]
                if state == "unsubscribed_all":
                    events += [event(t, False, "unsubscribe_link", now)
                               for t in ("newsletter", "product_updates", "partner_offers")]
                    blocks.append(block("unsubscribed", "marketing"))
                if state == "sharing_granted":
                    events += [event("partner_offers", True, "double_opt_in"),
                               event("third_party_sharing", True, "preference_center")]
                if state == "complaint":
                    events.append(event("newsletter", False, "complaint", now))
                    blocks.append(block("complaint", "marketing"))
                if state in ("hard_bounce", "manual"):
                    blocks.append(block(state, "all"))
                if state == "soft_bounce_limit":
                    blocks.append(block(state, "all", now + timedelta(days=20)))
                if events:
                    conn.execute(insert(consent_events), events)
                if blocks:
                    conn.execute(insert(suppressions), blocks)
                if state == "pending_double_opt_in":
                    conn.execute(insert(consent_requests).values(
                        recipient_id=rid, topic="partner_offers", source="signup_form",
                        policy_version="1", evidence=None, requested_at=now, recorded_at=now))
                if state == "frequency_capped":
                    conn.execute(insert(messages), [{
                        "id": uuid.uuid4().hex, "category": "service_alert",
                        "template": "service_alert", "recipient_id": rid, "to_email": address,
                        "to_hash": email_hash, "status": "sent", "attempts": 1,
                        "message_id_header": f"<{uuid.uuid4().hex}@example.test>",
                        "created_at": now - timedelta(days=d), "updated_at": now,
                    } for d in (1, 2, 3)])
            if state == "erased":
                r = stack.client.delete(f"/v1/recipients/{external_id}",
                                        headers=auth(stack.keys["recipients"]))
                assert r.status_code == 204
            people.append(Planted(external_id, address, locale, state, expect))
    return people


def _preferences_snapshot(stack: Stack) -> str:
    """The ledger, suppressions, pending grants and profiles, row by row, as text."""
    from sqlalchemy import select

    from mailer.store.schema import consent_events, consent_requests, recipients, suppressions

    with stack.rt.engine.connect() as conn:
        tables = {t.name: [[str(v) for v in row] for row in conn.execute(
            select(t).order_by(*t.primary_key.columns))]
            for t in (consent_events, suppressions, consent_requests, recipients)}
    return json.dumps(tables, sort_keys=True)


def test_notify_reaches_every_active_account_in_their_language_and_changes_no_choice(
    world: Stack,
) -> None:
    from mailer.campaigns.tick import tick

    stack = world
    admin = _admin(stack)
    people = _populate(stack)
    before = _preferences_snapshot(stack)
    listed_before = _listing(stack, admin)
    worker = WorkerProcess(stack.env, threads=4)
    try:
        # When a new version is registered with notify
        r = _register(stack, admin, version="2031-03", effective_at="2031-03-01T00:00:00Z",
                      summary_url="https://example.test/privacy/2031", notify=True)
        assert r.status_code == 201, r.text
        campaign_id = r.json()["campaign_id"]
        assert campaign_id
        # Then it runs as a campaign of service alerts, to completion
        deadline = time.monotonic() + 60
        shown: dict[str, Any] = {}
        while time.monotonic() < deadline:
            tick(stack.rt)
            got = stack.client.get(f"/v1/campaigns/{campaign_id}",
                                   headers=auth(stack.keys["marketing"]))
            assert got.status_code == 200, got.text
            shown = got.json()
            if shown["status"] == "completed":
                break
            time.sleep(0.2)
        assert shown["status"] == "completed", shown
    finally:
        worker.stop()
    assert (shown["category"], shown["topic"], shown["template"]) == (
        "service_alert", None, "policy_update")

    # And exactly the active accounts the policy allows got it, once each
    mails = {}
    for item in list(stack.recorder.messages):
        parsed = email.message_from_bytes(item.data, policy=policy.default)
        address = parsed["To"].addresses[0].addr_spec
        assert address not in mails, f"{address} got two notices"
        mails[address] = parsed
    sent = {p.email for p in people if p.expect == "sent"}
    assert set(mails) == sent
    # And the counts add up: the audience is the active accounts, each sent or suppressed
    counts = shown["counts"]
    active = [p for p in people if p.expect is not None]
    assert counts["audience"] == len(active)
    assert counts["sent"] == len(sent)
    assert counts["sent"] + counts["suppressed"] == counts["audience"]
    assert counts["failed"] == counts["queued"] == 0
    expected_reasons: dict[str, int] = {}
    for p in active:
        if p.expect != "sent":
            expected_reasons[p.expect] = expected_reasons.get(p.expect, 0) + 1
    assert shown["suppressed_by_reason"] == expected_reasons

    # And each notice is in its reader's language, dated that way, with their own
    # preference-centre link, which opens their page in the same language
    for p in people:
        if p.expect != "sent":
            continue
        mail = mails[p.email]
        language = LANGUAGE[p.locale]
        assert (mail["Content-Language"], mail["Subject"]) == (language, SUBJECTS[language])
        assert "List-Unsubscribe" not in mail  # a service alert, not marketing (SPEC 6)
        body = mail.get_body(("plain",))
        assert body is not None
        text = " ".join(body.get_content().split())
        date = {"en": "March 1, 2031", "de": "1. März 2031", "ru": "1 марта 2031"}[language]
        assert date in text and "https://example.test/privacy/2031" in text
        [link] = [w for w in text.split() if "/preferences/" in w]
        page = stack.client.get(path_of(link))
        assert page.status_code == 200
        assert f'<html lang="{language}">' in page.text

    # And nobody's preferences changed: ledger, suppressions, pending grants and profiles
    # are exactly as they were, row for row
    assert _preferences_snapshot(stack) == before
    after = _listing(stack, admin)
    assert [(i["version"], i["active_consents"]) for i in after] == [
        *[(i["version"], i["active_consents"]) for i in listed_before], ("2031-03", 0)]
    assert after[-1]["campaign_id"] == campaign_id
