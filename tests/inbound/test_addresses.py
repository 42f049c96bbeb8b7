"""VERP and ``mailto:`` unsubscribe addresses: short, case-proof, signed (SPEC 6, 12)."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from mailer.inbound.addresses import InboundAddresses, Mailbox
from mailer.mail.dkim import DkimSigner
from mailer.mail.mime import MessageBuilder
from mailer.sending.compliance import PromotionLinks, list_headers
from tests.mail.test_mime import verify

DOMAIN = "in.example.test"
KEY = "current-secret-0123456789"
OLD = "older-secret-0123456789"


@pytest.fixture()
def addresses() -> InboundAddresses:
    """Given addresses signed with the current key, an older one still accepted."""
    return InboundAddresses.from_keys(DOMAIN, KEY, [OLD])


def test_bounce_address_names_its_message_whatever_the_case(
    addresses: InboundAddresses,
) -> None:
    # Given a message row id / When its VERP address is minted
    row_id = uuid.uuid4().hex
    address = addresses.bounce_address(row_id)
    assert address is not None
    local = address.split("@")[0]
    # Then it is short (RFC 5321 4.5.3.1.1: 64), lower-case, and reads back to the row,
    # also after an MTA upper- or lower-cased it
    assert len(local) <= 64 and local == local.lower()
    for spelling in (address, address.upper(), f"<{address}>"):
        target = addresses.read(spelling)
        assert target is not None
        assert (target.mailbox, target.message_id) == (Mailbox.BOUNCES, row_id)


def test_unsubscribe_address_names_recipient_and_topic(addresses: InboundAddresses) -> None:
    # Given a profile and a topic / When the mailto: address is minted and read back
    address = addresses.unsubscribe_address(123456, "newsletter.weekly")
    target = addresses.read(address)
    # Then it names the profile, and the topic among the ones we have
    assert target is not None and target.recipient_id == 123456
    assert addresses.topic_for(target, ["offers", "newsletter.weekly"]) == "newsletter.weekly"
    assert addresses.topic_for(target, ["offers"]) is None
    assert len(address.split("@")[0]) <= 64


def test_tokens_signed_with_an_older_key_still_work() -> None:
    # Given an address minted before the key rotated
    row_id = uuid.uuid4().hex
    old = InboundAddresses.from_keys(DOMAIN, OLD).bounce_address(row_id)
    assert old is not None
    # When read after rotation / Then it still names the message; with the old key
    # dropped, it is refused
    found = InboundAddresses.from_keys(DOMAIN, KEY, [OLD]).read(old)
    assert found is not None and found.message_id == row_id
    assert InboundAddresses.from_keys(DOMAIN, KEY).read(old) is None


def test_forged_or_foreign_addresses_are_refused(addresses: InboundAddresses) -> None:
    # Given a genuine address
    genuine = addresses.bounce_address(uuid.uuid4().hex)
    assert genuine is not None
    local, _, _ = genuine.partition("@")
    flipped = local[:-1] + ("a" if local[-1] != "a" else "b")
    # When forged, moved to another domain, or used for the other purpose
    forged = [
        f"{flipped}@{DOMAIN}",
        f"{local}@other.example",
        genuine.replace("bounces+", "unsubscribe+"),
        f"bounces+{'a' * 39}@{DOMAIN}",
        f"bounces+@{DOMAIN}",
        f"bounces@{DOMAIN}",
    ]
    # Then none is read
    assert [addresses.read(a) for a in forged] == [None] * len(forged)


def test_fbl_and_postmaster_are_mailboxes(addresses: InboundAddresses) -> None:
    # Given the fixed mailboxes / When read (postmaster also without a domain, RFC 5321)
    # Then they name themselves
    assert addresses.read(f"FBL@{DOMAIN}").mailbox is Mailbox.FBL  # type: ignore[union-attr]
    assert addresses.read("Postmaster").mailbox is Mailbox.POSTMASTER  # type: ignore[union-attr]


def test_non_uuid_row_ids_get_no_verp_address(addresses: InboundAddresses) -> None:
    # Given an id that is not 32 hex digits / When minted / Then None (the caller falls
    # back to the return path)
    assert addresses.bounce_address("not-a-row-id") is None


def test_dkim_covers_list_unsubscribe_with_its_mailto(addresses: InboundAddresses) -> None:
    # Given a promotion's List-Unsubscribe with the https link and the mailto:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    mailto = f"mailto:{addresses.unsubscribe_address(42, 'newsletter')}?subject=unsubscribe"
    links = PromotionLinks(unsubscribe="https://mail.example.test/u/" + "x" * 90,
                           preferences="https://mail.example.test/p/y", unsubscribe_mailto=mailto)
    builder = MessageBuilder("Shop <shop@example.com>", None,
                             DkimSigner("example.com", "s1", pem))
    # When a message is built and signed
    envelope = builder.build(
        to_email="a@example.org", to_name=None, subject="Hi", html="<p>Hi</p>", text=None,
        message_id=f"<{uuid.uuid4().hex}@example.com>",
        date=datetime.now(UTC),
        extra_headers=list_headers("newsletter", "example.com", links))
    # Then the signature verifies and its h= tag lists List-Unsubscribe (SPEC 6)
    assert verify(envelope.data, key)
    signature = envelope.data.split(b"\r\n\r\n", 1)[0].decode()
    tags = re.search(r"h=([^;]+);", " ".join(signature.split()))
    assert tags is not None and "list-unsubscribe" in tags.group(1).lower()
    assert "mailto:unsubscribe+" in " ".join(signature.split())
