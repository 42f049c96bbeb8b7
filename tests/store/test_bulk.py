"""bulk.executemany stores exactly what conn.execute stores, byte for byte."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from sqlalchemy import Connection, bindparam, insert, text, update

from mailer.runtime import Runtime
from mailer.store import bulk
from mailer.store.outbox import _FINISH
from mailer.store.schema import message_events, messages
from mailer.store.status import MessageStatus as S
from tests.units import message_row, unit_runtime

_MOMENTS = [
    datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC),  # no microseconds
    datetime(2030, 1, 2, 3, 4, 5, 123456, tzinfo=UTC),
    datetime(2030, 1, 2, 5, 4, 5, 7, tzinfo=timezone(timedelta(hours=2))),
]
_DATA: list[dict[str, Any]] = [
    {}, {"name": "Zoë \u2014 \U0001f600", "n": 1.5, "items": [{"a": None}, True]},
    {"quote": "\"'\\</script>", "big": 10**20},
]


def _rows(rt: Runtime, status: S) -> list[dict[str, Any]]:
    rows = []
    for i, (moment, data) in enumerate(zip(_MOMENTS, _DATA, strict=True)):
        rows.append(message_row(rt, status, moment, data=data, to_name=None if i else "Ada",
                                send_at=moment if i == 2 else None, topic=f"t{i}",
                                updated_at=_MOMENTS[0]))
    return rows


def _stored(conn: Connection, ids: list[str]) -> list[tuple[Any, ...]]:
    """The rows as the database holds them (SQLite: text as written), unique keys blanked."""
    found = {r[0]: r for r in conn.execute(
        text("SELECT * FROM messages WHERE id IN (" + ",".join(f"'{i}'" for i in ids) + ")"))}
    out = []
    for row_id in ids:
        values = list(found[row_id])
        for name in ("id", "message_id_header", "to_hash"):  # unique per row
            values[list(messages.c.keys()).index(name)] = None
        out.append(tuple(values))
    return out


def test_inserted_rows_are_stored_alike(db_url: str) -> None:
    rt = unit_runtime(db_url)
    ours, theirs = _rows(rt, S.QUEUED), _rows(rt, S.QUEUED)
    with rt.engine.begin() as conn:
        bulk.executemany(conn, insert(messages), ours)
        conn.execute(insert(messages), theirs)
        assert _stored(conn, [r["id"] for r in ours]) == \
            _stored(conn, [r["id"] for r in theirs])
        # And the event rows too (a datetime, text and NULL)
        events = [{"message_id": r["id"], "at": m, "type": "queued", "detail": d}
                  for r, m, d in zip(ours, _MOMENTS, [None, "x", "\u00e9"], strict=True)]
        bulk.executemany(conn, insert(message_events), events)
        conn.execute(insert(message_events),
                     [{**e, "message_id": t["id"]} for e, t in zip(events, theirs, strict=True)])
        got = conn.execute(text("SELECT message_id, at, type, detail FROM message_events "
                                "ORDER BY id")).all()
    by_message = {row[0]: row[1:] for row in got}
    assert [by_message[r["id"]] for r in ours] == [by_message[r["id"]] for r in theirs]


def test_finish_update_changes_rows_alike_and_counts_only_matches(db_url: str) -> None:
    rt = unit_runtime(db_url)
    ours, theirs = _rows(rt, S.SENDING), _rows(rt, S.SENDING)
    # The last row of each set is no longer sending: the compare-and-set skips it.
    ours[-1]["status"] = theirs[-1]["status"] = S.SENT
    with rt.engine.begin() as conn:
        conn.execute(insert(messages), ours + theirs)

    def params(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{"b_id": r["id"], "b_status": S.DEFERRED, "b_reason": "relay_error",
                 "b_code": 451, "b_response": "4.3.0 try later \u2014 later",
                 "b_next": _MOMENTS[2], "b_sent": None, "b_now": _MOMENTS[1],
                 "b_cap": 3 if i else None} for i, r in enumerate(rows)]

    with rt.engine.begin() as conn:
        changed = bulk.executemany(conn, _FINISH, params(ours))
        reference = conn.execute(_FINISH, params(theirs)).rowcount
        assert changed == reference == 2
        assert _stored(conn, [r["id"] for r in ours]) == \
            _stored(conn, [r["id"] for r in theirs])


def test_a_statement_needing_defaults_takes_the_ordinary_path(db_url: str) -> None:
    # Given rows that leave out "attempts", whose column default (0) fills it in
    rt = unit_runtime(db_url)
    rows = _rows(rt, S.QUEUED)
    for row in rows:
        del row["attempts"]
    statement = insert(messages)
    with rt.engine.begin() as conn:
        bulk.executemany(conn, statement, rows)
        stored = conn.execute(text("SELECT attempts FROM messages WHERE id = :id"),
                              {"id": rows[0]["id"]}).scalar_one()
    assert stored == 0
    # And an update whose parameters the rows do not all name is refused as conn.execute
    # would refuse it, not run with a gap
    partial = update(messages).where(messages.c.id == bindparam("b_id")).values(
        reason=bindparam("b_reason"))
    with rt.engine.begin() as conn:
        try:
            bulk.executemany(conn, partial, [{"b_id": rows[0]["id"]}])
        except Exception as exc:  # the type is SQLAlchemy's on both paths
            assert "b_reason" in str(exc)
        else:
            raise AssertionError("a missing parameter was not refused")
