"""The static checks a stored marketing template passes before it is compiled.

Stored templates come from anyone holding a ``marketing`` key, so they are untrusted
input (SPEC 7: "rendered in a sandbox"). Two checks run on save and on every compile:

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

The render-time budget is :mod:`mailer.mail.sandbox`'s.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from jinja2 import Environment, meta, nodes
from jinja2 import Template as JinjaTemplate
from jinja2 import TemplateError as JinjaError

from mailer.errors import TemplateError, ValidationFailed
from mailer.mail.headers import check_header_value
from mailer.mail.sandbox import ALLOWED_FILTERS, HTML, TEXT, guard_loops

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
class Tally:
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


def _lexical_problem(env: Environment, source: str, tally: Tally) -> str | None:
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


def _problems(tree: nodes.Template, tally: Tally) -> list[str]:
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


def check_part(part: str, source: str, tally: Tally | None = None) -> Checked:
    """Check and compile one part; 422 :class:`UnsafeTemplate`, ``template_error`` or
    ``invalid_header`` when it may not be stored.

    ``tally`` carries the static bounds across the parts of one template.
    """
    tally = tally if tally is not None else Tally()
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
