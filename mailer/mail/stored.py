"""Marketing templates stored through the API, checked on save and rendered within bounds.

File templates are written by developers and reviewed like code; these come from anyone
holding a ``marketing`` key, so they are treated as untrusted input (SPEC 7: "rendered in
a sandbox"). Four layers:

1. Before jinja2 parses anything, the token stream is held to static bounds: tokens per
   template and per tag, bracket and block nesting, filters per tag, and how often the
   operators and names that build large values (``~``, ``+``, ``*``, ``batch``, ``join``,
   ``range``) appear. jinja2's parser recurses per nesting level and its code generator
   is super-linear in the depth of an expression, so this check is what keeps compiling
   an accepted template well under a second, and a refused one costs microseconds.
2. The syntax tree is checked against allow-lists (statements, filters, functions,
   methods) and size bounds. Anything that is a known road to Python internals
   (``__class__``, ``mro``, ``|attr``, ``str.format``, ...) or to unbounded work
   (``**``, ``recursive`` loops, macros, ``{% set %}`` accumulators) is refused with a 422.
3. Rendering runs in the sandbox of :mod:`mailer.mail.sandbox`, with the allowed filters only
   and a budget per render (iterations, the size of every value built, output and time).
   A template that exceeds it fails that one message.
"""

from __future__ import annotations

import re
import threading
import time
import tomllib
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from jinja2 import Environment, meta, nodes
from jinja2 import Template as JinjaTemplate
from jinja2 import TemplateError as JinjaError
from jinja2.exceptions import SecurityError
from sqlalchemy import Connection, Engine, Row, insert, select, update

from mailer.errors import TemplateError, ValidationFailed
from mailer.mail.headers import check_header_value
from mailer.mail.sandbox import (
    ALLOWED_FILTERS,
    HTML,
    TEXT,
    guard_loops,
    render_part,
    start_render,
)
from mailer.mail.templates import Catalogue, Rendered, Template
from mailer.mail.text import html_to_text
from mailer.runtime import Runtime
from mailer.store.schema import marketing_templates
from suppression.policy import Category

#: Largest template source accepted per part (subject, HTML, text).
MAX_SOURCE_CHARS = {"subject": 998, "html": 256_000, "text": 128_000}
#: Static bounds of one template (all parts together unless "per tag"), checked on the
#: token stream before jinja2 parses it, then on the syntax tree before it compiles.
MAX_TOKENS = 10_000
MAX_TAG_TOKENS = 200
MAX_BRACKET_DEPTH = 6
MAX_BLOCK_DEPTH = 8
MAX_FILTER_CHAIN = 10
MAX_EXPRESSION_DEPTH = 20
MAX_NODES = 5_000
#: Operators and names that build values larger than their inputs, counted per template.
MAX_USES = {"~": 100, "+": 100, "*": 20, "batch": 5, "join": 20, "range": 10}
#: Loops nest at most this deep, so iterations cannot multiply beyond the budget's reach.
MAX_LOOP_DEPTH = 2
#: Variable references per template: bounds how often large data can be repeated.
MAX_REFERENCES = 2_000
#: How long a worker trusts its cached copy before asking the database for a newer one.
CACHE_SECONDS = 2.0
#: Profile fields a campaign supplies for each recipient (SPEC 7).
PROFILE_VARIABLES = frozenset({"name", "email", "attributes"})

_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,99}$")

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


class UnsafeTemplate(ValidationFailed):
    """Raised when a stored template reaches for Python internals or unbounded work."""

    code = "unsafe_template"


@dataclass
class _Tally:
    """What the parts of one template have used so far, against the static bounds."""

    tokens: int = 0
    nodes: int = 0
    references: int = 0
    uses: Counter[str] = field(default_factory=Counter)


#: Block tags that open a level jinja2's parser recurses into (``set`` without ``=``).
_OPENERS = frozenset({"for", "if", "with", "filter", "block", "macro", "call", "autoescape",
                      "trans", "set"})
_OPERATOR_TOKENS = {"tilde": "~", "add": "+", "mul": "*"}
_BRACKETS = {"lparen": 1, "lbracket": 1, "lbrace": 1, "rparen": -1, "rbracket": -1,
             "rbrace": -1}


def _lexical_problem(env: Environment, source: str, tally: _Tally) -> str | None:
    """The first static bound the token stream of ``source`` exceeds, if any.

    Reading stops there, so a refused template costs a few microseconds per token read.
    """
    blocks = tag_tokens = brackets = pipes = 0
    opener: str | None = None
    assigns = False
    for token in env.lexer.tokenize(source):
        kind = token.type
        if kind in ("block_begin", "variable_begin"):
            tag_tokens = brackets = pipes = 0
            opener, assigns = ("" if kind == "block_begin" else None), False
            continue
        if kind in ("block_end", "variable_end"):
            if opener in _OPENERS and not (opener == "set" and assigns):
                blocks += 1
                if blocks > MAX_BLOCK_DEPTH:
                    return f"blocks nest deeper than {MAX_BLOCK_DEPTH} (line {token.lineno})"
            elif opener and opener.startswith("end"):
                blocks -= 1
            continue
        if kind == "data":
            continue
        tally.tokens += 1
        tag_tokens += 1
        if tally.tokens > MAX_TOKENS:
            return f"more than {MAX_TOKENS} tokens inside tags"
        if tag_tokens > MAX_TAG_TOKENS:
            return f"a tag of more than {MAX_TAG_TOKENS} tokens (line {token.lineno})"
        if kind == "name":
            if opener == "":
                opener = token.value
            if token.value in MAX_USES:
                tally.uses[token.value] += 1
        elif kind in _OPERATOR_TOKENS:
            tally.uses[_OPERATOR_TOKENS[kind]] += 1
        elif kind == "assign":
            assigns = True
        elif kind == "pipe":
            pipes += 1
            if pipes > MAX_FILTER_CHAIN:
                return f"more than {MAX_FILTER_CHAIN} filters in one tag (line {token.lineno})"
        elif kind in _BRACKETS:
            brackets += _BRACKETS[kind]
            if brackets > MAX_BRACKET_DEPTH:
                return f"brackets nest deeper than {MAX_BRACKET_DEPTH} (line {token.lineno})"
    for what, count in tally.uses.items():
        if count > MAX_USES[what]:
            return f"{what!r} is used more than {MAX_USES[what]} times"
    return None


def _problems(tree: nodes.Template, tally: _Tally) -> list[str]:
    """Everything in ``tree`` that the allow-lists and bounds refuse, as readable sentences."""
    found: list[str] = []

    def visit(node: nodes.Node, loops: int, depth: int, buffered: bool) -> None:
        tally.nodes += 1
        if not isinstance(node, _ALLOWED_NODES):
            found.append(f"{type(node).__name__} is not allowed (line {node.lineno})")
            return
        # Depth of an expression: statements start again from zero.
        depth = 0 if isinstance(node, nodes.Stmt | nodes.Template) else depth + 1
        if depth > MAX_EXPRESSION_DEPTH:
            found.append(f"an expression nests deeper than {MAX_EXPRESSION_DEPTH} "
                         f"(line {node.lineno})")
            return
        if isinstance(node, nodes.FilterBlock):
            buffered = True
        elif isinstance(node, nodes.For):
            if node.recursive:
                found.append(f"recursive loops are not allowed (line {node.lineno})")
            if buffered:
                # A filter block holds its whole body in memory before filtering it.
                found.append(f"loops inside filter blocks are not allowed (line {node.lineno})")
            loops += 1
            if loops > MAX_LOOP_DEPTH:
                found.append(f"loops nest deeper than {MAX_LOOP_DEPTH} (line {node.lineno})")
        elif isinstance(node, nodes.Name):
            tally.references += 1
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
            visit(child, loops, depth, buffered)

    visit(tree, 0, 0, False)
    if tally.references > MAX_REFERENCES:
        found.append(f"more than {MAX_REFERENCES} variable references")
    if tally.nodes > MAX_NODES:
        found.append(f"more than {MAX_NODES} syntax nodes")
    return sorted(set(found))


def _variables(env: Environment, tree: nodes.Template) -> frozenset[str]:
    """The names ``tree`` reads from its data (jinja2.meta, without constant folding)."""
    tracker = meta.TrackingCodeGenerator(env)
    tracker.optimizer = None  # folding would run filters on constants outside any budget
    tracker.visit(tree)
    return frozenset(tracker.undeclared_identifiers)


@dataclass(frozen=True)
class Checked:
    """A template part that passed the checks: its compiled form and the names it reads."""

    template: JinjaTemplate
    variables: frozenset[str]


def check_part(part: str, source: str, tally: _Tally | None = None) -> Checked:
    """Check and compile one part; 422 :class:`UnsafeTemplate`, ``template_error`` or
    ``invalid_header`` when it may not be stored.

    ``tally`` carries the static bounds across the parts of one template.
    """
    tally = tally if tally is not None else _Tally()
    limit = MAX_SOURCE_CHARS[part]
    if len(source) > limit:
        raise ValidationFailed(f"the {part} is longer than {limit} characters")
    if part == "subject":
        # Its literal text goes into the Subject header of every mail: a control character
        # or an encoded-word hiding one would be refused at every send, so refuse it now.
        check_header_value("subject", source)
    env = HTML if part == "html" else TEXT
    try:
        problem = _lexical_problem(env, source, tally)
        if problem is not None:
            raise UnsafeTemplate(f"the {part} exceeds what stored templates may hold",
                                 details={"part": part, "problems": [problem]})
        tree = env.parse(source)
        problems = _problems(tree, tally)
        if problems:
            raise UnsafeTemplate(f"the {part} uses what stored templates may not",
                                 details={"part": part, "problems": problems})
        variables = _variables(env, tree)
        compiled = env.from_string(guard_loops(tree))
    except JinjaError as exc:
        raise TemplateError(f"the {part} does not compile: {exc}") from None
    except (RecursionError, SyntaxError):
        # Not expected within the bounds above; kept so that a gap in them is a 422 too.
        raise UnsafeTemplate(f"the {part} is too complex to compile",
                             details={"part": part, "problems": ["too complex"]}) from None
    return Checked(compiled, variables)


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
        tally = _Tally()
        self._parts = (check_part("subject", subject, tally), check_part("html", html, tally),
                       check_part("text", text, tally) if text is not None else None)
        self.variables = frozenset().union(*(p.variables for p in self._parts if p))

    def render(self, data: Mapping[str, Any], *, derive_text: bool = True) -> Rendered:
        """Render all parts within the budget; :class:`TemplateError` when it is exceeded."""
        subject_part, html_part, text_part = self._parts
        start_render()
        try:
            subject, spent = render_part(subject_part.template, data, 0)
            html, spent = render_part(html_part.template, data, spent)
            if text_part is not None:
                text, spent = render_part(text_part.template, data, spent)
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

