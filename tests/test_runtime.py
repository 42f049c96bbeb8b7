"""The runtime's identities: address hashes survive key rotation, Message-IDs are unique."""

from __future__ import annotations

import itertools
import re
import time
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


def test_ids_sort_by_creation_time_and_keep_their_random_part(runtime: Any) -> None:
    # Given ids made in three rounds a few milliseconds apart
    rounds = []
    for _ in range(3):
        rounds.append([runtime.new_message_id() for _ in range(50)])
        time.sleep(0.003)
    # Then every row id is 32 lowercase hex digits, as before (String(32), VERP tokens)
    ids = [row_id for batch in rounds for row_id, _ in batch]
    assert all(re.fullmatch(r"[0-9a-f]{32}", row_id) for row_id in ids)
    # And ids of a later round sort after those of an earlier one, for the indexes
    for earlier, later in itertools.pairwise(rounds):
        assert max(r for r, _ in earlier) < min(r for r, _ in later)
    # And within a round (one millisecond, often) the random tails still differ
    assert len({row_id[12:] for row_id in ids}) == len(ids)
    # And each Message-ID carries 128 random bits after the same time prefix
    for row_id, header in rounds[0]:
        match = re.fullmatch(r"<([0-9a-f]{12})([0-9a-f]{32})@example\.test>", header)
        assert match is not None and match.group(1) == row_id[:12]


def test_a_batch_of_ids_is_as_unique_and_shaped_as_single_ones(runtime: Any) -> None:
    # Given ids made for a batch of rows in one call
    batch = runtime.new_message_ids(500)
    # Then there are as many as asked, every row id and Message-ID distinct
    assert len(batch) == 500
    assert len({row_id for row_id, _ in batch}) == 500
    assert len({header for _, header in batch}) == 500
    # And each pair has the shape of a single id: one time prefix, 80 + 128 random bits
    for row_id, header in batch:
        match = re.fullmatch(r"<([0-9a-f]{12})([0-9a-f]{32})@example\.test>", header)
        assert match is not None and match.group(1) == row_id[:12]
        assert re.fullmatch(r"[0-9a-f]{32}", row_id) and row_id[12:] not in header
    assert runtime.new_message_ids(0) == []
