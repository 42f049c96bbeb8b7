"""Link tokens: forgery-proof, rotation-proof, and never carrying the address."""

from __future__ import annotations

import base64
import re
from typing import Any
from urllib.parse import quote, unquote

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from mailer.preferences.tokens import PURPOSES, BadToken, TokenSigner
from tests.conftest import unique_email
from tests.scenarios.test_unsubscribe import (
    PROMO_DATA,
    consent,
    deliver,
    delivered,
    links,
    recipient_id,
    register,
    state_counts,
    wait_final,
)

KEY = "current-secret-key-for-token-tests"
topics = st.from_regex(r"[a-z0-9_-]{0,40}", fullmatch=True)
recipient_ids = st.integers(min_value=1, max_value=2**53)
purposes = st.sampled_from(sorted(PURPOSES))
# Where to flip (as a fraction of the length) and which of the 8 bits of the character.
flips = st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 7)),
                 min_size=1, max_size=4)


def flip(token: str, where: list[tuple[float, int]]) -> str:
    """The token with the given bits of the given characters inverted."""
    chars = list(token)
    for fraction, bit in where:
        i = int(fraction * len(chars))
        chars[i] = chr(ord(chars[i]) ^ (1 << bit))
    return "".join(chars)


@given(purposes, recipient_ids, topics)
def test_a_valid_token_says_what_was_signed(purpose: str, rid: int, topic: str) -> None:
    signer = TokenSigner(KEY)
    token = signer.sign(purpose, rid, topic)
    found = signer.verify(token, purpose)
    assert (found.purpose, found.recipient_id, found.topic) == (purpose, rid, topic)
    # And a token is accepted only by the page it was made for
    for other in PURPOSES - {purpose}:
        with pytest.raises(BadToken):
            signer.verify(token, other)


@settings(max_examples=2000)
@given(purposes, recipient_ids, topics, flips)
def test_no_token_with_flipped_bits_is_accepted(
    purpose: str, rid: int, topic: str, where: list[tuple[float, int]]
) -> None:
    # Given a valid token, When any bits of it are flipped
    signer = TokenSigner(KEY, ["an-older-key-still-trusted"])
    token = signer.sign(purpose, rid, topic)
    forged = flip(token, where)
    assume(forged != token)
    # Then no page accepts it
    for any_purpose in PURPOSES:
        with pytest.raises(BadToken):
            signer.verify(forged, any_purpose)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(where=flips)
def test_flipped_tokens_change_nothing_over_http(
    client: Any, runtime: Any, where: list[tuple[float, int]]
) -> None:
    # Given real unsubscribe and preference tokens of an existing recipient
    for path, token in (("u", runtime.signer.sign("u", 1, "newsletter")),
                        ("preferences", runtime.signer.sign("p", 1))):
        forged = flip(token, where)
        assume(forged != token)
        before = state_counts(runtime)
        # When a forged one is posted as a one-click unsubscribe
        response = client.post(f"/{path}/{quote(forged, safe='')}",
                               content=b"List-Unsubscribe=One-Click",
                               headers={"Content-Type": "application/x-www-form-urlencoded"})
        # Then it is refused and nothing changed
        assert response.status_code in (400, 404, 405)
        assert state_counts(runtime) == before


def test_tokens_signed_with_an_old_key_still_work_after_rotation(
    env: dict[str, str], runtime: Any, client: Any, keys: dict[str, str]
) -> None:
    from fastapi.testclient import TestClient

    from mailer.api.app import create_app
    from mailer.config import Settings
    from mailer.runtime import Runtime
    from mailer.sending.queue import ListEnqueuer

    # Given links mailed while the current key was in use
    external_id = register(client, keys, unique_email("rotate"))
    rid = recipient_id(runtime, external_id)
    old_unsubscribe = runtime.signer.sign("u", rid, "newsletter")
    old_preferences = runtime.signer.sign("p", rid)
    # When the key is rotated, keeping the old one in MAILER_OLD_SECRET_KEYS
    old_key = env["MAILER_SECRET_KEY"]
    rotated = Runtime.from_settings(Settings.from_environ({
        **env, "MAILER_SECRET_KEY": "a-brand-new-secret-key-0123456789",
        "MAILER_OLD_SECRET_KEYS": f"some-retired-key,{old_key}",
    }), ListEnqueuer())
    # Then the old tokens verify, and new tokens use the new key id
    assert rotated.signer.verify(old_unsubscribe, "u").recipient_id == rid
    new_token = rotated.signer.sign("u", rid, "newsletter")
    assert new_token.split(".")[0] != old_unsubscribe.split(".")[0]
    with TestClient(create_app(rotated)) as rotated_client:
        assert rotated_client.get(f"/u/{old_unsubscribe}").status_code == 200
        assert rotated_client.get(f"/preferences/{old_preferences}").status_code == 200
        assert rotated_client.get(f"/u/{new_token}").status_code == 200
    # And once the old key is dropped from the list, its tokens stop working
    forgotten = TokenSigner("a-brand-new-secret-key-0123456789", ["some-retired-key"])
    with pytest.raises(BadToken):
        forgotten.verify(old_unsubscribe, "u")


def _encodings(address: str) -> set[str]:
    """The address as it could hide in a URL: clear, %-encoded, and base64 at any offset."""
    data = address.encode()
    found = {address, address.lower(), quote(address, safe=""), quote(address)}
    for shift in range(3):
        padded = b"\0" * shift + data
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            text = encode(padded).decode()
            # Skip the characters that depend on the bytes around the address.
            found.add(text[(shift * 4 + 2) // 3 + 1:-3])
    return {f for f in found if len(f) >= 8}


def _decoded_pieces(url: str) -> list[bytes]:
    """Every base64-looking piece of the URL, decoded as well as it will decode."""
    pieces = []
    for piece in re.split(r"[/.?=&#:]", unquote(url)):
        for text in (piece, piece.replace("-", "+").replace("_", "/")):
            try:
                pieces.append(base64.b64decode(text + "=" * (-len(text) % 4)))
            except ValueError:
                continue
    return pieces


@pytest.mark.usefixtures("worker")
def test_the_address_appears_in_no_url_in_clear_or_base64(
    client: Any, keys: dict[str, str], smtp_server: Any
) -> None:
    # Given a delivered promotion and a double opt-in confirmation mail to one address
    address = unique_email("nourl")
    external_id = register(client, keys, address)
    assert consent(client, keys, external_id, "newsletter").status_code == 201
    promo = deliver(client, keys, smtp_server, "newsletter",
                    {"email": address, "external_id": external_id}, PROMO_DATA)
    pending = consent(client, keys, external_id, "partner_offers").json()
    assert pending["status"] == "pending"
    final = wait_final(client, keys["admin"], pending["confirmation_message_id"])
    [confirmation] = delivered(smtp_server, final["message_id"])
    urls = links(promo) + links(confirmation)
    assert any("/u/" in u for u in urls) and any("/preferences/" in u for u in urls)
    assert any("/confirm/" in u for u in urls)
    # Then no URL carries the address, in clear, %-encoded or base64 encoded
    hidden = _encodings(address) | _encodings(address.split("@")[0])
    for url in urls:
        for form in hidden:
            assert form not in url, url
        for piece in _decoded_pieces(url):
            assert address.encode() not in piece and address.split("@")[0].encode() not in piece
    # (the check itself finds an address that is there)
    assert any(f in f"https://x.test/u/{base64.urlsafe_b64encode(address.encode()).decode()}"
               for f in _encodings(address))
