"""Finding things (SPEC 7): ``GET /v1/messages`` with filters and a keyset cursor, and
``GET /v1/recipients?email=``."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import event

from tests.conftest import auth, unique_email

CONFIRM = {"name": "Ann", "confirm_url": "https://example.test/confirm"}


def send_batch(client: Any, key: str, to: str, count: int) -> list[str]:
    """Accept ``count`` registration confirmations to ``to`` in one batch; their ids."""
    r = client.post("/v1/messages/batch", headers=auth(key), json={"messages": [
        {"template": "registration_confirmation", "to": to, "data": CONFIRM}
        for _ in range(count)]})
    assert r.status_code == 202, r.text
    return [result["id"] for result in r.json()["results"]]


def listing(client: Any, key: str, **params: Any) -> Any:
    """GET /v1/messages with ``params``."""
    return client.get("/v1/messages", headers=auth(key), params=params)


def every_page(client: Any, key: str, **params: Any) -> list[list[dict[str, Any]]]:
    """Follow ``next_cursor`` to the end (at most 50 pages); each page's items."""
    pages: list[list[dict[str, Any]]] = []
    cursor = None
    for _ in range(50):
        r = listing(client, key, **params, **({"cursor": cursor} if cursor else {}))
        assert r.status_code == 200, r.text
        pages.append(r.json()["items"])
        cursor = r.json()["next_cursor"]
        if cursor is None:
            return pages
    raise AssertionError("more than 50 pages")


@contextmanager
def statements(runtime: Any) -> Iterator[list[str]]:
    """The SQL the app runs on ``runtime``'s engine while the block runs."""
    seen: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *rest: Any) -> None:
        seen.append(statement)

    event.listen(runtime.engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(runtime.engine, "before_cursor_execute", record)


def test_pages_follow_the_cursor_newest_first_without_gaps_or_repeats(
    client: Any, keys: dict[str, str]
) -> None:
    # Given seven messages to one address accepted in one batch (one created_at for all)
    # and two more accepted a moment later
    address = unique_email("pages")
    first = send_batch(client, keys["transactional"], address, 7)
    later = send_batch(client, keys["transactional"], address, 2)
    # When an admin lists them three at a time
    pages = every_page(client, keys["admin"], to=address, limit=3)
    # Then three full pages hold the nine, none twice, and the last says it is the last
    items = [item for page in pages for item in page]
    assert [len(page) for page in pages] == [3, 3, 3]
    assert sorted(i["id"] for i in items) == sorted(first + later)
    # And newest first: the later batch leads, ties broken by id, descending
    assert {i["id"] for i in items[:2]} == set(later)
    keys_in_order = [(i["created_at"], i["id"]) for i in items]
    assert keys_in_order == sorted(keys_in_order, reverse=True)


def test_each_item_is_the_message_as_get_shows_it_without_events(
    client: Any, keys: dict[str, str]
) -> None:
    # Given one message
    address = unique_email("item")
    [message_id] = send_batch(client, keys["transactional"], address, 1)
    # When it is listed and fetched
    [item] = listing(client, keys["admin"], to=address).json()["items"]
    shown = client.get(f"/v1/messages/{message_id}", headers=auth(keys["admin"])).json()
    # Then the listed item is what GET shows, less its history
    assert shown.pop("events")
    assert item == shown


def test_to_is_matched_by_the_address_hash_and_normalised(
    client: Any, keys: dict[str, str], runtime: Any
) -> None:
    # Given messages to two addresses
    address = unique_email("hash")
    mine = send_batch(client, keys["transactional"], address, 2)
    send_batch(client, keys["transactional"], unique_email("other"), 1)
    # When listing by the address written with an upper-case domain
    local, _, domain = address.partition("@")
    with statements(runtime) as seen:
        r = listing(client, keys["admin"], to=f"{local}@{domain.upper()}")
    # Then exactly that address's messages come back
    assert r.status_code == 200, r.text
    assert sorted(i["id"] for i in r.json()["items"]) == sorted(mine)
    # And the query matched the keyed hash, never the clear address
    [query] = [s for s in seen if "FROM messages" in s and "ORDER BY" in s]
    condition = query.split("WHERE", 1)[1]
    assert "to_hash" in condition and "to_email" not in condition


def insert_messages(runtime: Any, campaign_id: str,
                    rows: list[tuple[datetime, str, str]]) -> list[str]:
    """Write outbox rows directly: (created_at, status, category) each; their ids."""
    from mailer.store.outbox import insert_messages as write

    ids = [uuid.uuid4().hex for _ in rows]
    with runtime.engine.begin() as conn:
        write(conn, [
            {"id": message_id, "campaign_id": campaign_id, "category": category,
             "template": "newsletter" if category == "promotion" else "service_alert",
             "topic": "newsletter" if category == "promotion" else None,
             "status": status, "reason": "unsubscribed" if status == "suppressed" else None,
             "attempts": 0, "message_id_header": f"<{message_id}@example.test>",
             "created_at": created, "updated_at": created}
            for message_id, (created, status, category) in zip(ids, rows, strict=True)
        ], max(r[0] for r in rows))
    return ids


def test_filters_combine(client: Any, keys: dict[str, str], runtime: Any) -> None:
    # Given messages of one campaign across three days, in several states and categories
    campaign = uuid.uuid4().hex
    day = datetime(2031, 3, 10, 12, tzinfo=UTC)
    a, b, c, d = insert_messages(runtime, campaign, [
        (day - timedelta(days=1), "sent", "promotion"),
        (day, "suppressed", "promotion"),
        (day + timedelta(hours=1), "sent", "service_alert"),
        (day + timedelta(days=1), "sent", "promotion"),
    ])

    def ids(**params: Any) -> list[str]:
        r = listing(client, keys["admin"], **{"campaign_id": campaign, **params})
        assert r.status_code == 200, r.text
        return [i["id"] for i in r.json()["items"]]

    # Then each filter narrows the campaign's messages, newest first
    assert ids() == [d, c, b, a]
    assert ids(status="sent") == [d, c, a]
    assert ids(category="promotion", status="sent") == [d, a]
    assert ids(template="service_alert") == [c]
    # And since is inclusive, until exclusive; a date alone is midnight UTC
    assert ids(since=day.isoformat(), until=(day + timedelta(days=1)).isoformat()) == [c, b]
    assert ids(since="2031-03-10", until="2031-03-11") == [c, b]
    assert ids(since="2031-03-10T13:00:00+01:00") == [d, c, b]
    assert ids(campaign_id=uuid.uuid4().hex) == []


@pytest.mark.parametrize(("params", "code"), [
    ({"status": "lost"}, "validation_error"),
    ({"category": "newsletter"}, "validation_error"),
    ({"limit": 501}, "validation_error"),
    ({"limit": 0}, "validation_error"),
    ({"limit": "ten"}, "validation_error"),
    ({"cursor": "not-a-cursor"}, "invalid_cursor"),
    ({"cursor": "WyJub3QiXQ"}, "invalid_cursor"),  # base64 of ["not"]
    ({"since": "last tuesday"}, "validation_error"),
    ({"until": "2031-02-30"}, "validation_error"),
    ({"to": "not an address"}, "invalid_address"),
    ({"statuss": "sent"}, "validation_error"),
])
def test_bad_filters_are_422_with_the_error_body(
    client: Any, keys: dict[str, str], params: dict[str, Any], code: str
) -> None:
    # When a filter is malformed or unknown
    r = listing(client, keys["admin"], **params)
    # Then 422 with the SPEC's error body, naming why
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == code


def test_listing_is_for_admin_keys_only(client: Any, keys: dict[str, str]) -> None:
    # Then a key without admin is 403, no key 401
    assert listing(client, keys["transactional"]).status_code == 403
    assert listing(client, keys["marketing"]).status_code == 403
    assert client.get("/v1/messages").status_code == 401


def test_the_limit_bounds_a_page_and_the_default_is_fifty(
    client: Any, keys: dict[str, str]
) -> None:
    # Given more than fifty messages in the outbox (this one adds 51 to one address)
    address = unique_email("limit")
    send_batch(client, keys["transactional"], address, 51)
    # Then by default a page holds 50, and 500 may be asked for
    assert len(listing(client, keys["admin"], to=address).json()["items"]) == 50
    assert len(listing(client, keys["admin"], to=address, limit=500).json()["items"]) == 51


def test_recipient_by_email(client: Any, keys: dict[str, str]) -> None:
    # Given a registered recipient
    address = unique_email("lookup")
    external_id = f"user-{uuid.uuid4().hex[:8]}"
    put = client.put(f"/v1/recipients/{external_id}", headers=auth(keys["recipients"]),
                     json={"email": address, "name": "Lou"})
    assert put.status_code == 201, put.text
    # When looked up by the address, its domain in capitals
    local, _, domain = address.partition("@")
    found = client.get("/v1/recipients", headers=auth(keys["recipients"]),
                       params={"email": f"{local}@{domain.upper()}"})
    # Then it is the recipient as GET /v1/recipients/{external_id} shows it
    assert found.status_code == 200, found.text
    direct = client.get(f"/v1/recipients/{external_id}", headers=auth(keys["recipients"]))
    assert found.json() == direct.json()
    # And an unknown address is 404, a bad one 422, a missing one 422, all with the body
    missing = client.get("/v1/recipients", headers=auth(keys["recipients"]),
                         params={"email": unique_email("nobody")})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    bad = client.get("/v1/recipients", headers=auth(keys["recipients"]),
                     params={"email": "nobody at all"})
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_address"
    absent = client.get("/v1/recipients", headers=auth(keys["recipients"]))
    assert absent.status_code == 422 and absent.json()["error"]["code"] == "validation_error"
    # And the lookup needs the recipients scope
    assert client.get("/v1/recipients", headers=auth(keys["transactional"]),
                      params={"email": address}).status_code == 403
