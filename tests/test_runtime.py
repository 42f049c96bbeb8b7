"""The runtime's identities: address hashes survive key rotation, Message-IDs are unique."""

from __future__ import annotations

from typing import Any

from mailer.config import Settings
from mailer.runtime import Runtime
from mailer.sending.queue import ListEnqueuer


def runtime_with(base: Any, **env: str) -> Runtime:
    settings = Settings.from_environ({"MAILER_ENV": "test", **env})
    return Runtime(settings, base.engine, base.catalogue, ListEnqueuer())


def test_address_hash_survives_key_rotation(runtime: Any) -> None:
    # Given a deployment keyed by A that rotates to B, listing A as retired
    before = runtime_with(runtime, MAILER_SECRET_KEY="key-A-0123456789abcdef")
    after = runtime_with(runtime, MAILER_SECRET_KEY="key-B-0123456789abcdef",
                         MAILER_OLD_SECRET_KEYS="key-A-0123456789abcdef")
    # Then the same address hashes alike, so every suppression still matches
    assert before.address("Ada@Example.org").hash == after.address("Ada@Example.org").hash
    # And links signed before rotation still verify after it
    token = before.signer.sign("u", 42, "newsletter")
    assert after.signer.verify(token, "u").recipient_id == 42
    # While a different deployment key gives different hashes (they are keyed)
    other = runtime_with(runtime, MAILER_SECRET_KEY="key-C-0123456789abcdef")
    assert other.address("ada@example.org").hash != before.address("ada@example.org").hash


def test_message_ids_are_unique_and_unguessable(runtime: Any) -> None:
    ids = {runtime.new_message_id() for _ in range(1000)}
    assert len(ids) == 1000
    row_id, header = next(iter(ids))
    assert header.startswith("<") and header.endswith("@example.test>")
    assert row_id not in header  # the public Message-ID does not reveal the row id
