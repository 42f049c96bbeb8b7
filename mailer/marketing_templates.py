"""Marketing templates stored through the API, checked on save and rendered within bounds.

File templates are written by developers and reviewed like code; these come from anyone
holding a ``marketing`` key, so they are treated as untrusted input (SPEC 7: "rendered in
a sandbox"). Three layers:

1. On save, the template's syntax tree is checked against allow-lists (statements,
   filters, functions, methods). Anything that is a known road to Python internals
   (``__class__``, ``mro``, ``|attr``, ``str.format``, ...) or to unbounded work
   (``**``, ``recursive`` loops, macros, ``{% set %}`` accumulators) is refused with a 422.
2. Rendering runs in jinja2's ``ImmutableSandboxedEnvironment`` (autoescaped HTML,
   ``StrictUndefined``), with the allowed filters only, so the runtime agrees with (1).
3. Every render has a budget: loop iterations, characters produced by ``*``, characters of
   output and wall-clock time. A template that exceeds it fails that one message.
"""

from __future__ import annotations

import re
import threading
import time
import tomllib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from jinja2 import Environment, StrictUndefined, meta, nodes
from jinja2 import Template as JinjaTemplate
from jinja2 import TemplateError as JinjaError
from jinja2.exceptions import SecurityError
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment
from sqlalchemy import Connection, Engine, Row, insert, select, update

from mailer.errors import TemplateError, ValidationFailed
from mailer.htmltext import html_to_text
from mailer.runtime import Runtime
from mailer.schema import marketing_templates
from mailer.templates import Catalogue, Rendered, Template
from suppression.policy import Category

#: Largest template source accepted per part (subject, HTML, text).
MAX_SOURCE_CHARS = {"subject": 998, "html": 256_000, "text": 128_000}
#: Per render: loop iterations, characters built by ``*`` and characters of output
#: (Gmail clips a message at about 102 kB, so a marketing mail never needs more).
MAX_ITERATIONS = 100_000
MAX_MULTIPLIED_CHARS = 200_000
MAX_OUTPUT_CHARS = 1_000_000
#: Wall-clock limit of one render (all parts).
MAX_RENDER_SECONDS = 1.0
#: Loops nest at most this deep, so iterations cannot multiply beyond the budget's reach.
MAX_LOOP_DEPTH = 2
#: Variable references per template: bounds how often large data can be repeated.
MAX_REFERENCES = 2_000
#: How long a worker trusts its cached copy before asking the database for a newer one.
CACHE_SECONDS = 2.0
#: Profile fields a campaign supplies for each recipient (SPEC 7).
PROFILE_VARIABLES = frozenset({"name", "email", "attributes"})

_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,99}$")

#: Filters that only transform values. Left out on purpose: ``attr`` (attribute access by
#: string), ``format`` (string formatting), ``center``, ``indent``, ``wordwrap``,
#: ``replace``, ``slice`` (an argument scales the work or output), ``pprint`` and
#: ``random``.
ALLOWED_FILTERS = frozenset({
    "abs", "batch", "capitalize", "count", "d", "default", "dictsort", "e", "escape",
    "filesizeformat", "first", "float", "forceescape", "groupby", "int", "items", "join",
    "last", "length", "list", "lower", "map", "max", "min", "reject", "rejectattr",
    "reverse", "round", "safe", "select", "selectattr", "sort", "string", "striptags",
    "sum", "title", "tojson", "trim", "truncate", "unique", "upper", "urlencode", "urlize",
    "wordcount", "xmlattr",
})
#: Filters whose arguments name another filter, a test or an attribute.
_DISPATCHING_FILTERS = frozenset({"map", "select", "reject", "selectattr", "rejectattr"})
#: Functions a template may call by name.
ALLOWED_FUNCTIONS = frozenset({"range", "dict", "cycler", "joiner"})
#: Methods a template may call: string and mapping readers, and the loop helpers.
ALLOWED_METHODS = frozenset({
    "upper", "lower", "title", "capitalize", "strip", "lstrip", "rstrip", "startswith",
    "endswith", "split", "splitlines", "isdigit", "isalpha", "isalnum", "isspace", "get",
    "items", "keys", "values", "cycle", "changed", "next", "reset",
})
#: Names never readable: the template's own reference and the generator of filler text.
FORBIDDEN_NAMES = frozenset({"self", "lipsum", "namespace", "caller", "varargs", "kwargs"})
#: Attribute names used by every published jinja2 sandbox escape, refused even without
#: leading underscores (``mro``, ``format``) so that the refusal does not rest on the
#: runtime's attribute check alone.
FORBIDDEN_ATTRIBUTES = frozenset({
    "mro", "format", "format_map", "func_globals", "f_globals", "f_locals", "f_back",
    "f_builtins", "gi_frame", "gi_code", "cr_frame", "ag_frame", "tb_frame", "co_code",
    "environment", "globals", "blocks", "module", "subclasses",
})
_ALLOWED_NODES: tuple[type[nodes.Node], ...] = (
    nodes.Template, nodes.Output, nodes.TemplateData, nodes.For, nodes.If, nodes.With,
    nodes.Block, nodes.FilterBlock, nodes.Name, nodes.Const, nodes.List, nodes.Tuple,
    nodes.Dict, nodes.Pair, nodes.Keyword, nodes.CondExpr, nodes.And, nodes.Or, nodes.Not,
    nodes.Neg, nodes.Pos, nodes.Compare, nodes.Operand, nodes.Concat, nodes.Add, nodes.Sub,
    nodes.Mul, nodes.Div, nodes.FloorDiv, nodes.Getattr, nodes.Getitem, nodes.Slice,
    nodes.Filter, nodes.Test, nodes.Call,
)
_GUARD_FILTER = "_bounded_iteration"


class UnsafeTemplate(ValidationFailed):
    """Raised when a stored template reaches for Python internals or unbounded work."""

    code = "unsafe_template"


class _Budget(threading.local):
    """What the render on this thread may still spend."""

    def __init__(self) -> None:
        self.reset(0.0)

    def reset(self, deadline: float) -> None:
        self.deadline = deadline
        self.iterations = 0
        self.multiplied = 0


_budget = _Budget()


def _bounded(iterable: Iterable[Any]) -> Iterator[Any]:
    """Every ``{% for %}`` iterates through this: it counts and watches the clock."""
    for item in iterable:
        _budget.iterations += 1
        if _budget.iterations > MAX_ITERATIONS:
            raise SecurityError("the template loops too many times")
        if _budget.iterations % 256 == 0 and time.monotonic() > _budget.deadline:
            raise SecurityError("the template took too long to render")
        yield item


def _bounded_range(*args: int) -> range:
    """``range`` for templates, never longer than the iteration budget."""
    result = range(*args)
    if len(result) > MAX_ITERATIONS:
        raise SecurityError("range too large")
    return result


class _Sandbox(ImmutableSandboxedEnvironment):
    """The sandbox with sized ``*``, no ``**``, no ``%`` formatting and fewer filters."""

    # Intercepted operators are also never constant-folded at compile time.
    intercepted_binops = frozenset({"*", "**", "%"})

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        """Check the size of what ``*`` would build; refuse ``**`` and ``%`` on text."""
        if operator == "**":
            raise SecurityError("the ** operator is not allowed")
        if operator == "%" and isinstance(left, str):
            raise SecurityError("%-formatting is not allowed")
        if operator == "*":
            for seq, times in ((left, right), (right, left)):
                if isinstance(seq, str | list | tuple) and isinstance(times, int):
                    _budget.multiplied += len(seq) * max(times, 0)
                    if _budget.multiplied > MAX_MULTIPLIED_CHARS:
                        raise SecurityError("the template builds too large a value")
        return super().call_binop(context, operator, left, right)


def _sandbox(autoescape: bool) -> _Sandbox:
    env = _Sandbox(autoescape=autoescape, undefined=StrictUndefined, keep_trailing_newline=True)
    env.filters = {k: v for k, v in env.filters.items() if k in ALLOWED_FILTERS}
    env.filters[_GUARD_FILTER] = _bounded
    env.globals = {"range": _bounded_range, "dict": dict,
                   "cycler": env.globals["cycler"], "joiner": env.globals["joiner"]}
    return env


_HTML = _sandbox(autoescape=True)
_TEXT = _sandbox(autoescape=False)


def _problems(tree: nodes.Template) -> list[str]:
    """Everything in ``tree`` that the allow-lists refuse, as readable sentences."""
    found: list[str] = []
    references = 0

    def visit(node: nodes.Node, depth: int) -> None:
        nonlocal references
        if not isinstance(node, _ALLOWED_NODES):
            found.append(f"{type(node).__name__} is not allowed (line {node.lineno})")
            return
        if isinstance(node, nodes.For):
            if node.recursive:
                found.append(f"recursive loops are not allowed (line {node.lineno})")
            depth += 1
            if depth > MAX_LOOP_DEPTH:
                found.append(f"loops nest deeper than {MAX_LOOP_DEPTH} (line {node.lineno})")
        elif isinstance(node, nodes.Name):
            references += 1
            if node.name.startswith("_") or node.name in FORBIDDEN_NAMES:
                found.append(f"the name {node.name!r} is not allowed")
        elif isinstance(node, nodes.Getattr):
            if node.attr.startswith("_") or node.attr in FORBIDDEN_ATTRIBUTES:
                found.append(f"the attribute {node.attr!r} is not allowed")
        elif isinstance(node, nodes.Const) and isinstance(node.value, str):
            if node.value.startswith("_") or "__" in node.value:
                found.append("strings that name private attributes are not allowed")
        elif isinstance(node, nodes.Filter):
            if node.name not in ALLOWED_FILTERS:
                found.append(f"the filter {node.name!r} is not allowed")
            elif node.name in _DISPATCHING_FILTERS:
                # map('attr', ...) would reach a refused filter by name: names must be
                # literal, and map's must be an allowed filter.
                if not all(isinstance(a, nodes.Const) for a in node.args):
                    found.append(f"{node.name} takes literal names only")
                elif node.name == "map" and node.args and \
                        node.args[0].value not in ALLOWED_FILTERS:  # type: ignore[attr-defined]
                    found.append("map may only apply an allowed filter")
            if node.name == "tojson" and (node.args or node.kwargs):
                found.append("tojson takes no arguments here")
            if node.dyn_args is not None or node.dyn_kwargs is not None:
                found.append("*args and **kwargs are not allowed")
        elif isinstance(node, nodes.Call):
            if node.dyn_args is not None or node.dyn_kwargs is not None:
                found.append("*args and **kwargs are not allowed")
            target = node.node
            if isinstance(target, nodes.Name):
                if target.name not in ALLOWED_FUNCTIONS:
                    found.append(f"calling {target.name!r} is not allowed")
            elif isinstance(target, nodes.Getattr):
                if target.attr not in ALLOWED_METHODS:
                    found.append(f"the method {target.attr!r} is not allowed")
            else:
                found.append(f"only named functions and methods may be called "
                             f"(line {node.lineno})")
        for child in node.iter_child_nodes():
            visit(child, depth)

    visit(tree, 0)
    if references > MAX_REFERENCES:
        found.append(f"more than {MAX_REFERENCES} variable references")
    return sorted(set(found))


def _guard_loops(tree: nodes.Template) -> nodes.Template:
    """Route every loop's iterable through the budget filter."""
    for loop in tree.find_all(nodes.For):
        loop.iter = nodes.Filter(loop.iter, _GUARD_FILTER, [], [], None, None,
                                 lineno=loop.lineno)
    return tree


@dataclass(frozen=True)
class Checked:
    """A template part that passed the checks: its compiled form and the names it reads."""

    template: JinjaTemplate
    variables: frozenset[str]


def check_part(part: str, source: str) -> Checked:
    """Parse, check and compile one part; raise 422 :class:`UnsafeTemplate` or a syntax error."""
    limit = MAX_SOURCE_CHARS[part]
    if len(source) > limit:
        raise ValidationFailed(f"the {part} is longer than {limit} characters")
    env = _HTML if part == "html" else _TEXT
    try:
        tree = env.parse(source)
    except JinjaError as exc:
        raise TemplateError(f"the {part} does not compile: {exc}") from None
    problems = _problems(tree)
    if problems:
        raise UnsafeTemplate(f"the {part} uses what stored templates may not",
                             details={"part": part, "problems": problems})
    variables = frozenset(meta.find_undeclared_variables(tree))
    try:
        compiled = env.from_string(_guard_loops(tree))
    except JinjaError as exc:
        raise TemplateError(f"the {part} does not compile: {exc}") from None
    return Checked(compiled, variables)


def _render(template: JinjaTemplate, data: Mapping[str, Any], spent: int) -> tuple[str, int]:
    """Render streaming, stopping as soon as the output or the clock runs over."""
    pieces: list[str] = []
    for piece in template.generate(data):
        spent += len(piece)
        if spent > MAX_OUTPUT_CHARS:
            raise SecurityError("the template renders too large a message")
        if time.monotonic() > _budget.deadline:
            raise SecurityError("the template took too long to render")
        pieces.append(piece)
    return "".join(pieces), spent


class StoredTemplate(Template):
    """A marketing template from the database, compiled in the bounded sandbox."""

    def __init__(self, name: str, topic: str, subject: str, html: str, text: str | None,
                 version: int = 0) -> None:
        # Template.__init__ is not called on purpose: it compiles in the file templates'
        # environment, which has neither the allow-lists nor the render budget.
        self.name = name
        self.category = Category.PROMOTION
        self.topic = topic
        self.required = ()
        self.description = ""
        self.version = version
        self._parts = (check_part("subject", subject), check_part("html", html),
                       check_part("text", text) if text is not None else None)
        self.variables = frozenset().union(*(p.variables for p in self._parts if p))

    def render(self, data: Mapping[str, Any], *, derive_text: bool = True) -> Rendered:
        """Render all parts within the budget; :class:`TemplateError` when it is exceeded."""
        subject_part, html_part, text_part = self._parts
        _budget.reset(time.monotonic() + MAX_RENDER_SECONDS)
        try:
            subject, spent = _render(subject_part.template, data, 0)
            html, spent = _render(html_part.template, data, spent)
            if text_part is not None:
                text, spent = _render(text_part.template, data, spent)
            else:
                text = html_to_text(html) if derive_text else ""
        except SecurityError as exc:
            raise TemplateError(f"template {self.name!r} exceeded its limits: {exc}",
                                code="template_limit") from None
        except JinjaError as exc:
            raise TemplateError(
                f"template {self.name!r} could not be rendered: {exc.message or exc}",
                code="missing_variable" if "undefined" in str(exc) else "template_error",
            ) from None
        return Rendered(subject=subject, html=html, text=text)


def from_row(row: Row[Any]) -> StoredTemplate:
    """The compiled template of a ``marketing_templates`` row."""
    return StoredTemplate(row.name, row.topic, row.subject, row.html, row.text, row.version)


def validate_name(name: str) -> None:
    """Names are lower-case letters, digits, ``-`` and ``_`` (they appear in URLs and logs)."""
    if not _NAME.match(name):
        raise ValidationFailed("template names use a-z, 0-9, - and _ (at most 100)",
                               code="invalid_name")


def load(conn: Connection, name: str) -> Row[Any] | None:
    """The stored row, if any."""
    return conn.execute(select(marketing_templates).where(marketing_templates.c.name == name)
                        ).first()


def save(conn: Connection, name: str, template: StoredTemplate, sources: Mapping[str, Any],
         api_key_id: int | None, now: datetime) -> tuple[Row[Any], bool]:
    """Insert or replace a checked template; return the row and whether it was created."""
    values = {
        "category": Category.PROMOTION.value, "topic": template.topic,
        "subject": sources["subject"], "html": sources["html"], "text": sources.get("text"),
        "variables": sorted(template.variables), "api_key_id": api_key_id, "updated_at": now,
    }
    existing = load(conn, name)
    if existing is None:
        conn.execute(insert(marketing_templates).values(name=name, version=1, created_at=now,
                                                        **values))
    else:
        conn.execute(update(marketing_templates).where(marketing_templates.c.name == name)
                     .values(version=marketing_templates.c.version + 1, **values))
    row = load(conn, name)
    assert row is not None
    return row, existing is None


class StoredTemplates:
    """The catalogue's fallback: stored templates by name, cached for a few seconds."""

    def __init__(self, engine: Engine, ttl: float = CACHE_SECONDS) -> None:
        self.engine = engine
        self.ttl = ttl
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[float, StoredTemplate | None]] = {}

    def __call__(self, name: str) -> Template | None:
        """The compiled template, or None when no such name is stored."""
        now = time.monotonic()
        with self._lock:
            cached = self._cache.get(name)
        if cached is not None and now - cached[0] < self.ttl:
            return cached[1]
        with self.engine.connect() as conn:
            row = load(conn, name)
        found: StoredTemplate | None = None
        if row is not None:
            old = cached[1] if cached is not None else None
            # Recompile only when the stored version changed.
            found = old if old is not None and old.version == row.version else from_row(row)
        with self._lock:
            self._cache[name] = (now, found)
        return found


def install(rt: Runtime) -> None:
    """Let the runtime's catalogue find stored templates (idempotent)."""
    if rt.catalogue.fallback is None:
        rt.catalogue.fallback = StoredTemplates(rt.engine)


@lru_cache(maxsize=256)
def _file_variables(folder: Path, name: str) -> frozenset[str]:
    source = folder / name
    with (source / "template.toml").open("rb") as fh:
        parts = [tomllib.load(fh)["subject"]]
    for body in ("body.html", "body.txt"):
        if (source / body).exists():
            parts.append((source / body).read_text(encoding="utf-8"))
    env = Environment(autoescape=True)
    names: set[str] = set()
    for part in parts:
        names |= meta.find_undeclared_variables(env.parse(part))
    return frozenset(names)


def template_variables(catalogue: Catalogue, template: Template) -> frozenset[str] | None:
    """The variable names a template reads, or None when they cannot be known."""
    if isinstance(template, StoredTemplate):
        return template.variables
    try:
        return _file_variables(catalogue.folder, template.name)
    except (OSError, KeyError, JinjaError, tomllib.TOMLDecodeError):
        return None

