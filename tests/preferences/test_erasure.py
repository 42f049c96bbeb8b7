"""Access, export and erasure (SPEC 3): nothing of the address stays in clear afterwards."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from sqlalchemy import inspect, select, text

from tests.conftest import auth, unique_email
from tests.scenarios.test_unsubscribe import (
    PROMO_DATA,
    SIGNUP_EVIDENCE,
    consent,
    deliver,
    path_of,
    recipient,
    recipient_id,
    register,
    send,
    state_counts,
    unsubscribe_url,
)

pytestmark = pytest.mark.usefixtures("worker")


def rows_mentioning(runtime: Any, needle: str) -> list[tuple[str, str]]:
    """(table, column) of every stored value, in every table, that contains ``needle``."""
    needle = needle.lower()
    found = []
    with runtime.engine.connect() as conn:
        for table in inspect(conn).get_table_names():
            columns = [c["name"] for c in inspect(conn).get_columns(table)]
            quoted = conn.dialect.identifier_preparer.quote
            result = conn.execute(text(f"SELECT * FROM {quoted(table)}"))
            for row in result:
                for column, value in zip(columns, row, strict=True):
                    if value is None:
                        continue
                    if isinstance(value, bytes | bytearray | memoryview):
                        shown = bytes(value).decode("utf-8", "replace")
                    elif isinstance(value, dict | list):
                        shown = json.dumps(value)
                    else:
                        shown = str(value)
                    if needle in shown.lower():
                        found.append((table, column))
    return found


def person_with_history(client: Any, keys: dict[str, str], smtp_server: Any, runtime: Any
                        ) -> tuple[str, str]:
    """Someone with a profile, consents, delivered mail, suppressions and a pending opt-in."""
    address = unique_email("erase")
    external_id = register(client, keys, address)
    r = client.put(f"/v1/recipients/{external_id}",
                   json={"email": address, "name": "Ada Lovelace",
                         "attributes": {"plan": "pro", "backup_email": address}},
                   headers=auth(keys["recipients"]))
    assert r.status_code == 200
    # consents whose evidence quotes the address (a signup form URL with it in the query)
    evidence = {**SIGNUP_EVIDENCE, "form": f"https://example.test/signup?email={address}"}
    assert consent(client, keys, external_id, "newsletter", evidence=evidence).status_code == 201
    assert consent(client, keys, external_id, "product_updates").status_code == 201
    to = {"email": address, "external_id": external_id, "name": "Ada Lovelace"}
    mail = deliver(client, keys, smtp_server, "newsletter", to, PROMO_DATA)
    deliver(client, keys, smtp_server, "registration_confirmation", address,
            {"name": "Ada", "confirm_url": f"https://example.test/c?u={address}"},
            key="transactional")
    # a one-click unsubscribe from the newsletter, a manual entry, a pending double opt-in
    assert client.post(path_of(unsubscribe_url(mail)),
                       content=b"List-Unsubscribe=One-Click",
                       headers={"Content-Type": "application/x-www-form-urlencoded"}
                       ).status_code == 200
    assert client.post("/v1/suppressions", json={"email": address, "scope": "marketing",
                                                 "reason": "complaint"},
                       headers=auth(keys["recipients"])).status_code == 201
    r = consent(client, keys, external_id, "partner_offers")
    assert (r.status_code, r.json()["status"]) == (201, "pending"), r.text
    return address, external_id


def test_export_holds_everything_about_the_person(
    client: Any, keys: dict[str, str], smtp_server: Any, runtime: Any
) -> None:
    # Given a person with some history
    address, external_id = person_with_history(client, keys, smtp_server, runtime)
    # When the export is fetched
    r = client.get(f"/v1/recipients/{external_id}/export", headers=auth(keys["recipients"]))
    assert r.status_code == 200, r.text
    export = r.json()
    # Then it holds the profile, preferences, the full ledger, suppressions, pending
    # opt-ins and every message with its data
    assert export["profile"]["email"] == address
    assert export["profile"]["attributes"]["plan"] == "pro"
    assert [(e["topic"], e["granted"], e["source"]) for e in export["consents"]] == [
        ("newsletter", True, "signup_form"), ("product_updates", True, "signup_form"),
        ("newsletter", False, "one_click")]
    assert export["consents"] == recipient(client, keys, external_id)["consents"]
    assert export["preferences"]["newsletter"]["subscribed"] is False
    assert [s["reason"] for s in export["suppressions"]] == ["complaint"]
    assert [p["topic"] for p in export["pending_consents"]] == ["partner_offers"]
    templates = sorted(m["template"] for m in export["messages"])
    assert templates == ["consent_confirmation", "newsletter", "registration_confirmation"]
    assert all(m["to_email"] == address for m in export["messages"])
    assert all(m["events"] for m in export["messages"])
    # And it needs the recipients scope
    denied = client.get(f"/v1/recipients/{external_id}/export", headers=auth(keys["marketing"]))
    assert denied.status_code == 403


def test_erasure_leaves_no_clear_address_and_keeps_what_the_law_needs(
    client: Any, keys: dict[str, str], smtp_server: Any, runtime: Any
) -> None:
    # Given a person with a full history, whose address is stored in several tables
    address, external_id = person_with_history(client, keys, smtp_server, runtime)
    assert rows_mentioning(runtime, address)  # the check below can see it
    email_hash = runtime.hash_email(runtime.address(address).email)
    rid = recipient_id(runtime, external_id)
    before = recipient(client, keys, external_id)
    # When the recipient is erased
    r = client.delete(f"/v1/recipients/{external_id}", headers=auth(keys["recipients"]))
    # Then the answer is 204, and the profile is gone
    assert r.status_code == 204, r.text
    assert client.get(f"/v1/recipients/{external_id}",
                      headers=auth(keys["recipients"])).status_code == 404
    # And no table, no column holds the address in clear (nor base64 of it)
    assert rows_mentioning(runtime, address) == []
    for shift in range(3):
        encoded = base64.b64encode(("x" * shift + address).encode()).decode()[4:-4]
        assert rows_mentioning(runtime, encoded) == []
    # And the ledger is kept, pseudonymised: same events, no profile link, keyed hash kept
    from mailer.store.schema import consent_events, messages, suppressions

    with runtime.engine.connect() as conn:
        ledger = list(conn.execute(select(consent_events)
                                   .where(consent_events.c.email_hash == email_hash)
                                   .order_by(consent_events.c.id)))
        entries = list(conn.execute(select(suppressions)
                                    .where(suppressions.c.email_hash == email_hash)))
        leftovers = list(conn.execute(select(messages).where(messages.c.recipient_id == rid)))
    assert [(e.topic, bool(e.granted), e.source) for e in ledger] == [
        (e["topic"], e["granted"], e["source"]) for e in before["consents"]]
    assert all(e.recipient_id is None for e in ledger)
    assert "[erased]" in json.dumps(ledger[0].evidence)
    # And the suppression list keeps the keyed hash only, with reason erased
    assert sorted((s.reason, s.email) for s in entries) == [
        ("complaint", None), ("erased", None)]
    assert leftovers == []
    # And a token mailed before erasure now changes nothing
    counts = state_counts(runtime)
    token = runtime.signer.sign("u", rid, "newsletter")
    assert client.post(f"/u/{token}", content=b"List-Unsubscribe=One-Click",
                       headers={"Content-Type": "application/x-www-form-urlencoded"}
                       ).status_code == 200
    assert client.get(f"/preferences/{runtime.signer.sign('p', rid)}").status_code == 404
    assert state_counts(runtime) == counts


def test_after_erasure_marketing_stays_blocked_and_a_new_registration_works(
    client: Any, keys: dict[str, str], smtp_server: Any, runtime: Any
) -> None:
    # Given an erased person
    address, external_id = person_with_history(client, keys, smtp_server, runtime)
    assert client.delete(f"/v1/recipients/{external_id}",
                         headers=auth(keys["recipients"])).status_code == 204
    # When a promotion is sent to the address (typed in capitals), with no profile,
    # Then it is suppressed erased
    by_address = send(client, keys["marketing"], "newsletter", address.upper(), PROMO_DATA)
    assert (by_address["status"], by_address["reason"]) == ("suppressed", "erased")
    # When the same person registers again
    again = client.put("/v1/recipients/new-" + external_id, json={"email": address},
                       headers=auth(keys["recipients"]))
    assert again.status_code == 201
    # Then their registration confirmation goes out (the earlier one no longer counts)
    deliver(client, keys, smtp_server, "registration_confirmation",
            {"email": address, "external_id": "new-" + external_id},
            {"name": "Ada", "confirm_url": "https://example.test/welcome"}, key="transactional")
    # And even an opt-in on a signup form does not bring marketing back: only an admin can
    assert consent(client, keys, "new-" + external_id, "newsletter").status_code == 201
    promo = send(client, keys["marketing"], "newsletter",
                 {"email": address, "external_id": "new-" + external_id}, PROMO_DATA)
    assert (promo["status"], promo["reason"]) == ("suppressed", "erased")


def test_erasing_an_unknown_recipient_is_404_and_needs_the_scope(
    client: Any, keys: dict[str, str]
) -> None:
    assert client.delete("/v1/recipients/nobody-here",
                         headers=auth(keys["recipients"])).status_code == 404
    external_id = register(client, keys, unique_email("erasescope"))
    r = client.delete(f"/v1/recipients/{external_id}", headers=auth(keys["marketing"]))
    assert r.status_code == 403
    assert r.json()["error"]["code"] == "forbidden"
    assert client.get(f"/v1/recipients/{external_id}",
                      headers=auth(keys["recipients"])).status_code == 200


def test_an_erased_persons_id_is_never_given_to_someone_else(
    client: Any, keys: dict[str, str], runtime: Any
) -> None:
    # Given the most recently registered person is erased
    external_id = register(client, keys, unique_email("idreuse"))
    erased_id = recipient_id(runtime, external_id)
    assert client.delete(f"/v1/recipients/{external_id}",
                         headers=auth(keys["recipients"])).status_code == 204
    # When someone new registers
    newcomer = register(client, keys, unique_email("idreuse"))
    # Then they get a fresh id, so links mailed to the erased person cannot act for them
    assert recipient_id(runtime, newcomer) != erased_id
