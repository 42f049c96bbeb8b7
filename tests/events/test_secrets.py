"""Endpoint secrets are stored sealed under MAILER_SECRET_KEY, and only it opens them."""

from __future__ import annotations

import pytest

from mailer.events.secrets import SecretBox, SecretUnreadable, new_secret


def test_a_sealed_secret_opens_for_its_endpoint_only() -> None:
    # Given a secret sealed for endpoint e1
    box = SecretBox(["key-one"])
    secret = new_secret()
    sealed = box.seal(secret, "e1")
    # Then the stored form does not contain it, and it opens back for e1
    assert secret not in sealed and secret.removeprefix("whsec_") not in sealed
    assert box.open(sealed, "e1") == secret
    # But not when copied onto another endpoint's row
    with pytest.raises(SecretUnreadable):
        box.open(sealed, "e2")


def test_after_a_key_rotation_the_old_key_still_opens_it() -> None:
    # Given a secret sealed before MAILER_SECRET_KEY changed
    secret = new_secret()
    sealed = SecretBox(["old-key"]).seal(secret, "e1")
    # When the new key is current and the old one kept in MAILER_OLD_SECRET_KEYS
    assert SecretBox(["new-key", "old-key"]).open(sealed, "e1") == secret
    # Then without the old key it cannot be read
    with pytest.raises(SecretUnreadable):
        SecretBox(["new-key"]).open(sealed, "e1")


@pytest.mark.parametrize("stored", ["", "whsec_abc", "v1.!!!", "v1." + "A" * 10])
def test_garbage_is_unreadable_not_a_crash(stored: str) -> None:
    with pytest.raises(SecretUnreadable):
        SecretBox(["k"]).open(stored, "e1")
