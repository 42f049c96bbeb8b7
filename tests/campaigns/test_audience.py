"""A campaign's audience filter: what it accepts, and the same answer in SQL and Python."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from sqlalchemy import func, select

from mailer.campaigns.audience import MAX_FILTER_KEYS, AudienceFilter, audience_count
from mailer.errors import ValidationFailed
from mailer.store.recipients import upsert_recipient
from mailer.store.schema import recipients
from tests.units import unit_runtime


@pytest.mark.parametrize("raw", [
    {"tags": ["a"]},                                        # only "attributes" is supported
    {"attributes": ["plan", "pro"]},                        # not an object
    {"attributes": {"bad key!": 1}},                        # a name outside [A-Za-z0-9_-]
    {"attributes": {"plan": {"nested": True}}},             # values are scalars
    {"attributes": {f"k{i}": i for i in range(MAX_FILTER_KEYS + 1)}},
])
def test_a_malformed_filter_is_a_422_invalid_audience(raw: dict[str, Any]) -> None:
    # Given a malformed audience object / When it is parsed / Then the API answers 422
    with pytest.raises(ValidationFailed) as refused:
        AudienceFilter.parse(raw)
    assert refused.value.code == "invalid_audience"


def test_matching_is_typed_json_equality() -> None:
    # Given a filter on a string, a number, a boolean and null
    flt = AudienceFilter.parse({"attributes": {"plan": "pro", "seats": 3, "beta": True,
                                               "churned": None}})
    wanted = {"plan": "pro", "seats": 3.0, "beta": True, "churned": None, "extra": 1}
    # Then a profile with those values matches (3 and 3.0 are the same JSON number)
    assert flt.matches(wanted)
    # And "1" is not 1, 1 is not true, and a missing key is not null
    assert not flt.matches({**wanted, "seats": "3"})
    assert not flt.matches({**wanted, "beta": 1})
    assert not flt.matches({k: v for k, v in wanted.items() if k != "churned"})
    # And no filter matches everybody
    assert AudienceFilter.parse(None).matches(None)


def test_the_database_counts_what_python_matches(db_url: str) -> None:
    # Given profiles of one cohort with attributes of different JSON types
    rt = unit_runtime(db_url)
    cohort = uuid.uuid4().hex[:8]
    values: list[Any] = [True, 1, "1", None, 1.0, False]
    now = rt.clock()
    with rt.engine.begin() as conn:
        for index, value in enumerate(values):
            address = rt.address(f"aud-{cohort}-{index}@example.org")
            upsert_recipient(conn, f"aud-{cohort}-{index}", address,
                             {"attributes": {"cohort": cohort, "v": value}}, now)
        upto = conn.execute(select(func.max(recipients.c.id))).scalar_one()
    # When the audience of each value is counted in SQL
    counted = {}
    for want in (True, 1, "1", None):
        flt = AudienceFilter.parse({"attributes": {"cohort": cohort, "v": want}})
        with rt.engine.connect() as conn:
            counted[repr(want)] = audience_count(conn, flt, upto)
        # Then it is the number Python's typed comparison finds
        assert counted[repr(want)] == sum(
            1 for v in values if flt.matches({"cohort": cohort, "v": v})), want
    # And that is JSON's equality: 1 and 1.0 are one number; true, 1 and "1" are three
    assert counted == {"True": 1, "1": 2, "'1'": 1, "None": 1}
