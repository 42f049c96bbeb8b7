"""Render a template once, then fill in each recipient's own values (a campaign's speed-up).

A campaign sends one template with the same shared data to many people; only a few
personal fields (``{{ name }}``) differ. Rendering jinja2 and deriving the text part per
recipient was most of a worker's CPU per campaign message that was not DKIM. A *stencil*
is the template rendered once with a marker in place of each personal value, cut at the
markers; filling it is a join.

It is only used where filling gives byte for byte what rendering would:

- the variable appears only as a bare ``{{ name }}`` output in every part of the version
  (no filter, test, attribute, condition or loop over it, never assigned, and the template
  includes or imports nothing), so rendering inserts the value itself, HTML-escaped in
  the HTML part, as is elsewhere;
- the value is a non-empty printable string with no white space at either end and no
  runs of it, so the derived text part (which folds white space) holds it unchanged.

Everything else (other types, other uses) is a *fixed* value: part of the stencil's key,
rendered into it. Tests compare filled stencils with full renders on random values.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from jinja2 import Environment, nodes
from markupsafe import escape

#: Private-use code points around a slot number: never produced by escaping or the text
#: reader, and refused in values and templates (a stencil is not built if they occur).
_OPEN, _CLOSE = "\ue000", "\ue001"
_MARK = re.compile(f"{_OPEN}(\\d+){_CLOSE}")
#: Stencils kept per cache (least recently used dropped first), and the text they may
#: hold together: a message may render to 2 M characters, so the count alone is no bound.
CACHE_SIZE = 256
CACHE_CHARS = 32_000_000


def marker(slot: int) -> str:
    """The placeholder rendered where slot ``slot``'s value goes."""
    return f"{_OPEN}{slot}{_CLOSE}"


def plain_outputs(env: Environment, *sources: str | None) -> frozenset[str] | None:
    """Names that every one of ``sources`` uses only as a bare ``{{ name }}`` output (or
    as a variable of a ``{% trans %}`` block, which inserts it the same way).

    ``None`` when the sources include, import or extend anything (what those read is not
    visible here). A name the sources never read is trivially plain.
    """
    everywhere: dict[str, int] = {}
    bare: dict[str, int] = {}
    for source in sources:
        if source is None:
            continue
        if _OPEN in source or _CLOSE in source:
            return None  # its own text would read as a slot
        tree = env.parse(source)
        if any(True for _ in tree.find_all((nodes.Include, nodes.Import, nodes.FromImport,
                                            nodes.Extends))):
            return None
        for node in tree.find_all(nodes.Name):
            # Assigned, a loop target or a macro parameter counts against it as well.
            everywhere[node.name] = everywhere.get(node.name, 0) + 1
        for output in tree.find_all(nodes.Output):
            for child in output.nodes:
                for name in _inserted(child):
                    bare[name] = bare.get(name, 0) + 1
    return frozenset(name for name, count in bare.items() if everywhere.get(name) == count)


#: The i18n extension's calls whose keyword values are inserted as they are (``ngettext``
#: is not: its count picks the plural form).
_GETTEXT = frozenset({"gettext", "_", "pgettext"})


def _inserted(node: nodes.Node) -> list[str]:
    """Names an output node inserts unchanged: ``{{ name }}``, or a variable of a
    ``{% trans %}`` block (newstyle gettext: ``gettext("...%(name)s...", name=name)``)."""
    if isinstance(node, nodes.Name):
        return [node.name] if node.ctx == "load" else []
    if (isinstance(node, nodes.Call) and isinstance(node.node, nodes.Name)
            and node.node.name in _GETTEXT and node.dyn_args is None
            and node.dyn_kwargs is None and all(isinstance(a, nodes.Const) for a in node.args)):
        return [k.value.name for k in node.kwargs
                if isinstance(k.value, nodes.Name) and k.value.ctx == "load"
                and k.key == k.value.name]
    return []


def fillable(value: object) -> bool:
    """True for a value whose rendering, escaping and text reading keep it intact."""
    return (type(value) is str and value != "" and value.isprintable()
            and " ".join(value.split()) == value)


@dataclass(frozen=True)
class Stencil:
    """Parts cut at the markers: even items are text, odd items are slot numbers."""

    parts: tuple[tuple[str | int, ...], ...]
    #: Per part, whether a value is HTML-escaped when it is filled in.
    escaped: tuple[bool, ...]

    @classmethod
    def cut(cls, rendered: Iterable[str], escaped: Iterable[bool]) -> Stencil | None:
        """Cut rendered parts at their markers; ``None`` if a stray marker character
        (from the template or the fixed data) makes the cut ambiguous."""
        parts: list[tuple[str | int, ...]] = []
        for text in rendered:
            pieces = _MARK.split(text)
            cut: list[str | int] = []
            for i, piece in enumerate(pieces):
                if i % 2:
                    cut.append(int(piece))
                elif _OPEN in piece or _CLOSE in piece:
                    return None
                else:
                    cut.append(piece)
            parts.append(tuple(cut))
        return cls(tuple(parts), tuple(escaped))

    def fill(self, values: tuple[str, ...]) -> list[str]:
        """Each part with the values in place."""
        html = tuple(str(escape(v)) for v in values) if any(self.escaped) else values
        return ["".join((html if escaped else values)[p] if isinstance(p, int) else p
                        for p in part)
                for part, escaped in zip(self.parts, self.escaped, strict=True)]


def split_values(data: Mapping[str, Any], plain: frozenset[str], read: frozenset[str]
                 ) -> tuple[tuple[str, ...], dict[str, Any]]:
    """Of the variables the template reads, those filled per message (sorted names) and
    the fixed ones by name."""
    slots = tuple(sorted(k for k in read if k in data and k in plain and fillable(data[k])))
    fixed = {k: data[k] for k in read if k in data and k not in slots}
    return slots, fixed


def fixed_key(fixed: Mapping[str, Any]) -> str | None:
    """A stable text for the fixed values, or ``None`` if they are not plain JSON data or
    hold a marker character (rendered, it would read as a slot)."""
    try:
        text = json.dumps(fixed, sort_keys=True, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError):
        return None
    return None if _OPEN in text or _CLOSE in text else text


class StencilCache:
    """Stencils by key, least recently used dropped first; safe across worker threads."""

    def __init__(self, size: int = CACHE_SIZE, chars: int = CACHE_CHARS) -> None:
        self.size = size
        self.chars = chars
        self._lock = threading.Lock()
        self._items: OrderedDict[Hashable, Stencil | None] = OrderedDict()
        self._held = 0
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable, build: Callable[[], Stencil | None]) -> Stencil | None:
        """The stencil under ``key``, built (outside the lock) on first use."""
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                self.hits += 1
                return self._items[key]
            self.misses += 1
        stencil = build()
        with self._lock:
            if key not in self._items:
                self._items[key] = stencil
                self._held += _chars(stencil)
            self._items.move_to_end(key)
            while len(self._items) > self.size or (self._held > self.chars
                                                   and len(self._items) > 1):
                _, dropped = self._items.popitem(last=False)
                self._held -= _chars(dropped)
        return stencil

    @property
    def held_chars(self) -> int:
        """Characters of text the cached stencils hold now."""
        return self._held


def _chars(stencil: Stencil | None) -> int:
    if stencil is None:
        return 0
    return sum(len(piece) for part in stencil.parts for piece in part if isinstance(piece, str))
