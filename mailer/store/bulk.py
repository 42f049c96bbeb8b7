"""executemany for the hot write paths, without SQLAlchemy's per-row parameter work on SQLite.

``conn.execute(statement, rows)`` builds, for every row, a dictionary of every bound
parameter and runs each value through its type's processor, in Python: about 7 us a row,
a tenth of a campaign fan-out's CPU and a good part of recording a worker's outcomes. On
SQLite the statement here is compiled once per shape, and each row becomes a tuple in the
compiled parameter order, with the same processors (the column types' own, so a value is
written exactly as ``conn.execute`` would write it; tests compare the two). Other
dialects take ``conn.execute`` unchanged.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

from sqlalchemy import BindParameter, Connection
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.dml import Insert, Update

_Processor = Callable[[Any], Any] | None


class _Plan:
    """One statement compiled for SQLite: its SQL and, per position, where the value comes
    from: the row's own value under a name, through its type's processor, or a literal
    the statement binds itself (``status == 'sending'``), processed once here."""

    def __init__(self, compiled: SQLCompiler, keys: tuple[str, ...]) -> None:
        self.sql = compiled.string
        dialect = compiled.dialect
        slots: list[tuple[str | None, _Processor, Any]] = []
        for name in compiled.positiontup or ():
            bind = compiled.binds[name]
            process = bind.type._cached_bind_processor(dialect)
            if name in keys:
                slots.append((name, process, None))
            else:
                value = bind.effective_value
                slots.append((None, None, value if process is None else process(value)))
        self.slots = tuple(slots)

    def row(self, values: Mapping[str, Any]) -> tuple[Any, ...]:
        """The row's parameters in the compiled order, processed."""
        return tuple(fixed if name is None else values[name] if process is None
                     else process(values[name]) for name, process, fixed in self.slots)


#: Plans by statement and key set; None: the statement needs conn.execute (defaults).
_plans: dict[tuple[Hashable, ...], _Plan | None] = {}
_MAX_PLANS = 256
_lock = threading.Lock()


def executemany(conn: Connection, statement: Insert | Update,
                rows: Sequence[Mapping[str, Any]]) -> int:
    """Run ``statement`` once per row (every row with the same keys); return the rows an
    UPDATE changed (for an INSERT, whatever count the driver reports).

    Meant for module-level statements (a plan is kept per statement object and key set):
    a plain ``insert(table)``, whose columns are the rows' keys, or a statement whose only
    parameters are named ``bindparam`` s that every row supplies. A statement that needs
    more (a column default to fill in, say) is run by ``conn.execute`` as it would be.
    """
    if not rows:
        return 0
    plan = _plan(conn, statement, tuple(rows[0])) if conn.dialect.name == "sqlite" else None
    if plan is None:
        return int(conn.execute(statement, list(rows)).rowcount or 0)
    result = conn.exec_driver_sql(plan.sql, [plan.row(r) for r in rows])
    return int(result.rowcount or 0)


def _plan(conn: Connection, statement: Insert | Update, keys: tuple[str, ...]
          ) -> _Plan | None:
    cache_key = (statement, keys)
    try:
        return _plans[cache_key]
    except KeyError:
        pass
    compiled = statement.compile(dialect=conn.dialect, column_keys=list(keys))
    plan: _Plan | None = None
    if (isinstance(compiled, SQLCompiler) and compiled.positional
            and not compiled.insert_prefetch and not compiled.update_prefetch
            and not compiled.literal_execute_params and not compiled.post_compile_params
            and all(name in keys or _literal(compiled.binds[name])
                    for name in compiled.positiontup or ())):
        plan = _Plan(compiled, keys)
    with _lock:
        if len(_plans) >= _MAX_PLANS:
            _plans.clear()
        _plans[cache_key] = plan
    return plan


def _literal(bind: BindParameter[Any]) -> bool:
    """Whether the statement binds this value itself (not a parameter a row must give)."""
    return not bind.required and bind.callable is None
