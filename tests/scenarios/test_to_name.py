"""SPEC 6: the To of every category carries the recipient's name when known.

End to end: HTTP API -> outbox -> Redis -> real worker -> real SMTP server; the name comes
from the request when the caller gives one, else from the recipient's profile.
"""

from __future__ import annotations

import re
import uuid
from email.headerregistry import Address
from typing import Any

import pytest

from tests.conftest import auth, unique_email, wait_for
from tests.scenarios.test_unsubscribe import PROMO_DATA, consent, delivered, wait_final

pytestmark = pytest.mark.usefixtures("worker")

ALERT = {"name": "Ada", "title": "Storage nearly full", "body": "90% of your space is used."}


def profile(client: Any, keys: dict[str, str], address: str, name: str | None) -> str:
    """A profile with an active account (and ``name``); return its external id."""
    external_id = f"ext-{uuid.uuid4().hex[:12]}"
    body: dict[str, Any] = {"email": address, "account_active": True}
    if name is not None:
        body["name"] = name
    r = client.put(f"/v1/recipients/{external_id}", json=body, headers=auth(keys["recipients"]))
    assert r.status_code == 201, r.text
    return external_id


def sent_to(client: Any, keys: dict[str, str], smtp_server: Any, key: str, template: str,
            to: Any, data: dict[str, Any]) -> tuple[Address, bytes]:
    """Send one message and wait for it at the SMTP server; its To address and raw bytes."""
    r = client.post("/v1/messages", json={"template": template, "to": to, "data": data},
                    headers=auth(keys[key]))
    assert r.status_code == 202, r.text
    assert r.json()["status"] == "queued", r.json()
    final = wait_final(client, keys[key], r.json()["id"])
    assert final["status"] == "sent", final
    [mail] = wait_for(lambda: delivered(smtp_server, final["message_id"]))
    [raw] = [m.data for m in list(smtp_server.messages)
             if final["message_id"].encode() in m.data]
    [address] = mail["To"].addresses
    return address, raw


def to_line(raw: bytes) -> str:
    """The To field of the raw header block, unfolded."""
    head = raw.split(b"\r\n\r\n", 1)[0].decode("ascii")
    match = re.search(r"^To:(.*(?:\r\n[ \t].*)*)", head, flags=re.MULTILINE | re.IGNORECASE)
    assert match is not None, head
    return " ".join(match.group(1).split())


def test_a_service_alert_to_a_profile_carries_its_name(
    client: Any, keys: dict[str, str], smtp_server: Any
) -> None:
    # Given a profile named Ada Lovelace
    address = unique_email("alertname")
    external_id = profile(client, keys, address, "Ada Lovelace")
    # When a service alert is sent to it by external id, with no name in the request
    to, raw = sent_to(client, keys, smtp_server, "transactional", "service_alert",
                      {"email": address, "external_id": external_id}, ALERT)
    # Then its To names her
    assert to_line(raw) == f"Ada Lovelace <{address}>"
    assert (to.display_name, to.addr_spec) == ("Ada Lovelace", address)


def test_a_service_alert_to_a_bare_address_finds_the_profile_name(
    client: Any, keys: dict[str, str], smtp_server: Any
) -> None:
    # Given a profile whose name needs RFC 2047 encoding
    address = unique_email("alertplain")
    profile(client, keys, address, "Zoë Müller")
    # When a service alert is sent to the plain address string
    to, raw = sent_to(client, keys, smtp_server, "transactional", "service_alert", address,
                      ALERT)
    # Then the To carries her name, encoded on the wire and decoded by a reader
    assert (to.display_name, to.addr_spec) == ("Zoë Müller", address)
    assert to_line(raw).startswith("=?utf-8?")


def test_a_promotion_to_a_profile_carries_its_name(
    client: Any, keys: dict[str, str], smtp_server: Any
) -> None:
    # Given a profile named Grace Hopper subscribed to the newsletter
    address = unique_email("promoname")
    external_id = profile(client, keys, address, "Grace Hopper")
    assert consent(client, keys, external_id, "newsletter").status_code == 201
    # When the newsletter is sent to her address, by external id and without a name
    to, raw = sent_to(client, keys, smtp_server, "marketing", "newsletter",
                      {"email": address, "external_id": external_id}, PROMO_DATA)
    # Then its To names her
    assert to_line(raw) == f"Grace Hopper <{address}>"
    assert to.display_name == "Grace Hopper"


def test_the_name_the_caller_gives_wins_over_the_profile(
    client: Any, keys: dict[str, str], smtp_server: Any
) -> None:
    # Given a profile with one name
    address = unique_email("callername")
    external_id = profile(client, keys, address, "Ada Lovelace")
    # When the caller names the person otherwise
    _, raw = sent_to(client, keys, smtp_server, "transactional", "service_alert",
                     {"email": address, "external_id": external_id, "name": "Countess Ada"},
                     ALERT)
    # Then the caller's name is the one used
    assert to_line(raw) == f"Countess Ada <{address}>"


def test_without_a_name_anywhere_the_to_is_the_bare_address(
    client: Any, keys: dict[str, str], smtp_server: Any
) -> None:
    # Given an address with no profile, and a profile without a name
    stranger = unique_email("noprofile")
    nameless = unique_email("nameless")
    external_id = profile(client, keys, nameless, None)
    # When a registration confirmation and a service alert are sent
    _, first = sent_to(client, keys, smtp_server, "transactional", "registration_confirmation",
                       stranger, {"name": "A", "confirm_url": "https://example.test/c/1"})
    _, second = sent_to(client, keys, smtp_server, "transactional", "service_alert",
                        {"email": nameless, "external_id": external_id}, ALERT)
    # Then each To is the bare address: nothing is made up
    assert to_line(first) == stranger
    assert to_line(second) == nameless
