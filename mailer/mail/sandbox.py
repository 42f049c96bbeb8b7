"""The jinja2 sandbox that stored marketing templates render in, and its render budget.

Stored templates come from anyone holding a ``marketing`` key (SPEC 7: "rendered in a
sandbox"); :mod:`mailer.mail.stored` checks them on save, and this module bounds
what an accepted one may do while it renders:

- jinja2's ``ImmutableSandboxedEnvironment`` (autoescaped HTML, ``StrictUndefined``) with
  the allowed filters only, and nothing evaluated at compile time: jinja2 would otherwise
  run filters on constants while compiling, where no budget is in force.
- A budget per render, kept per thread: loop iterations, the size of every value that
  ``~``, ``+``, ``*``, ``join`` and ``batch`` build (checked before it is built), the size
  of what any filter, function or method takes and returns, characters of output and
  wall-clock time. Going over it raises jinja2's ``SecurityError``.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from itertools import islice
from typing import Any

from jinja2 import StrictUndefined, nodes, pass_context, pass_eval_context
from jinja2 import Template as JinjaTemplate
from jinja2.compiler import CodeGenerator, Frame
from jinja2.exceptions import SecurityError
from jinja2.filters import FILTERS, make_attrgetter
from jinja2.nodes import EvalContext
from jinja2.runtime import Context, markup_join
from jinja2.sandbox import ImmutableSandboxedEnvironment
from markupsafe import soft_str

#: Per render: loop iterations, characters built by ``*`` and characters of output
#: (Gmail clips a message at about 102 kB, so a marketing mail never needs more).
MAX_ITERATIONS = 100_000
MAX_MULTIPLIED_CHARS = 200_000
MAX_OUTPUT_CHARS = 1_000_000
#: Per render: the largest value (characters, or items of a collection) that any
#: operation may take or build, and the characters that ``~``, ``+``, ``*``, ``join`` and
#: ``batch`` may build in all. Each is checked before the value exists, so a render never
#: holds much more than this however large its data or however the template repeats it.
MAX_VALUE_CHARS = MAX_OUTPUT_CHARS
MAX_VALUE_ITEMS = MAX_ITERATIONS
MAX_BUILT_CHARS = 4 * MAX_OUTPUT_CHARS
#: Wall-clock limit of one render (all parts); half a second leaves room for the last
#: operation before the clock is next looked at.
MAX_RENDER_SECONDS = 0.5
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
#: The filter every ``{% for %}`` iterable is routed through (see ``guard_loops``).
GUARD_FILTER = "_bounded_iteration"


class _Budget(threading.local):
    """What the render on this thread may still spend."""

    def __init__(self) -> None:
        self.reset(0.0)

    def reset(self, deadline: float) -> None:
        self.deadline = deadline
        self.iterations = 0
        self.multiplied = 0
        self.built = 0


_budget = _Budget()


def _check_clock() -> None:
    if time.monotonic() > _budget.deadline:
        raise SecurityError("the template took too long to render")


def _check_size(value: Any) -> None:
    """Refuse a string or collection larger than any one value of a render may be."""
    if isinstance(value, str):
        if len(value) > MAX_VALUE_CHARS:
            raise SecurityError("the template handles too large a value")
    elif isinstance(value, list | tuple | dict | set | frozenset) and len(value) > MAX_VALUE_ITEMS:
        raise SecurityError("the template handles too large a collection")


def _spend(size: int) -> None:
    """Charge a value of ``size`` characters to the render, before it is built."""
    _budget.built += size
    if size > MAX_VALUE_CHARS or _budget.built > MAX_BUILT_CHARS:
        raise SecurityError("the template builds too large a value")
    _check_clock()


def _bounded(iterable: Iterable[Any]) -> Iterator[Any]:
    """Every ``{% for %}`` iterates through this: it counts and watches the clock."""
    for item in iterable:
        _budget.iterations += 1
        if _budget.iterations > MAX_ITERATIONS:
            raise SecurityError("the template loops too many times")
        if _budget.iterations % 256 == 0:
            _check_clock()
        yield item


def _bounded_range(*args: int) -> range:
    """``range`` for templates, never longer than the iteration budget."""
    result = range(*args)
    if len(result) > MAX_ITERATIONS:
        raise SecurityError("range too large")
    return result


def _guarded(func: Callable[..., Any]) -> Callable[..., Any]:
    """``func`` (a filter) with its input and output held to the size and time bounds."""
    # jinja2 marks filters that take the context, eval context or environment first
    # (pass_context and friends); the value filtered comes after it.
    first = 0 if getattr(func, "jinja_pass_arg", None) is None else 1

    @functools.wraps(func)  # keeps the pass_* mark, so jinja2 calls it the same way
    def guarded(*args: Any, **kwargs: Any) -> Any:
        _check_clock()
        if len(args) > first:
            _check_size(args[first])
        result = func(*args, **kwargs)
        _check_size(result)
        return result

    return guarded


def _items(value: Iterable[Any]) -> list[Any]:
    items = list(islice(value, MAX_VALUE_ITEMS + 1))
    _check_size(items)
    return items


@pass_eval_context
def _bounded_join(eval_ctx: EvalContext, value: Iterable[Any], d: str = "",
                  attribute: str | int | None = None) -> str:
    """``join`` that knows the size of what it would build before building it."""
    items = _items(value)
    if attribute is not None:
        items = list(map(make_attrgetter(eval_ctx.environment, attribute), items))
    pieces = [soft_str(item) for item in items]
    _spend(sum(map(len, pieces)) + len(soft_str(d)) * max(len(pieces) - 1, 0))
    joined: str = _JOIN(eval_ctx, pieces, d)
    return joined


def _bounded_batch(value: Iterable[Any], linecount: int,
                   fill_with: Any = None) -> Iterator[list[Any]]:
    """``batch`` whose batches (padding included) stay within the collection bound."""
    if not isinstance(linecount, int) or linecount > MAX_VALUE_ITEMS:
        raise SecurityError("batch size too large")
    batches: Iterator[list[Any]] = _BATCH(value, linecount, fill_with)
    return batches


_JOIN = FILTERS["join"]
_BATCH = FILTERS["batch"]


@pass_context
def _finalize(context: Context, value: Any) -> Any:
    """Every ``{{ ... }}`` passes through here: a value too large is refused unescaped."""
    _check_size(value)
    return value


class _CodeGenerator(CodeGenerator):
    """jinja2's code generator, with ``~`` sent through the sandbox's size check."""

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        """Write ``environment.bounded_concat(context, (a, b, ...))``, not a bare join."""
        self.write("environment.bounded_concat(context, (")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


#: Every attribute a ``dict`` instance has (its class's and ``object``'s).
_DICT_ATTRIBUTES = frozenset(dir(dict))


class DictSandbox(ImmutableSandboxedEnvironment):
    """jinja2's immutable sandbox, with a shorter path to a key of a plain ``dict``."""

    def getattr(self, obj: Any, attribute: str) -> Any:
        """``{{ item.date }}`` on JSON data: what the sandbox returns, found sooner.

        jinja2 tries the attribute first and takes the key when that raises
        AttributeError. A plain ``dict`` has no instance attributes, so for a name its
        class lacks that is always the key; raising and catching the AttributeError was
        a tenth of a render's CPU in templates that loop over list data.
        """
        if type(obj) is dict and attribute not in _DICT_ATTRIBUTES:
            try:
                return obj[attribute]
            except KeyError:
                pass
        return super().getattr(obj, attribute)


class _Sandbox(DictSandbox):
    """The sandbox with sized ``~``, ``+`` and ``*``, no ``**``, no ``%`` formatting."""

    code_generator_class = _CodeGenerator
    # Intercepted operators are also never constant-folded at compile time.
    intercepted_binops = frozenset({"+", "*", "**", "%"})

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        """Check the size of what ``+`` or ``*`` would build; refuse ``**`` and ``%`` on text."""
        if operator == "**":
            raise SecurityError("the ** operator is not allowed")
        if operator == "%" and isinstance(left, str):
            raise SecurityError("%-formatting is not allowed")
        if operator == "+" and isinstance(left, str | list | tuple) \
                and isinstance(right, str | list | tuple):
            _spend(len(left) + len(right))
        if operator == "*":
            for seq, times in ((left, right), (right, left)):
                if isinstance(seq, str | list | tuple) and isinstance(times, int):
                    size = len(seq) * max(times, 0)
                    _budget.multiplied += size
                    if _budget.multiplied > MAX_MULTIPLIED_CHARS:
                        raise SecurityError("the template builds too large a value")
                    _spend(size)
        return super().call_binop(context, operator, left, right)

    def bounded_concat(self, context: Context, values: tuple[Any, ...]) -> str:
        """``a ~ b ~ c``: the pieces are measured, then joined as jinja2 would join them."""
        pieces = [soft_str(value) for value in values]
        _spend(sum(map(len, pieces)))
        return markup_join(pieces) if context.eval_ctx.autoescape else "".join(pieces)

    def call(self, context: Context, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        """Call a function or method, watching the clock and the size of its result."""
        _check_clock()
        result = super().call(context, obj, *args, **kwargs)
        _check_size(result)
        return result


def _sandbox(autoescape: bool) -> _Sandbox:
    # optimized=False and a context-taking finalize stop jinja2 from running filters on
    # constants while it compiles, where no render budget is in force.
    env = _Sandbox(autoescape=autoescape, undefined=StrictUndefined, keep_trailing_newline=True,
                   optimized=False, finalize=_finalize)
    filters = {k: v for k, v in env.filters.items() if k in ALLOWED_FILTERS}
    filters.update(join=_bounded_join, batch=_bounded_batch)
    env.filters = {k: _guarded(v) for k, v in filters.items()}
    env.filters[GUARD_FILTER] = _bounded
    env.globals = {"range": _bounded_range, "dict": dict,
                   "cycler": env.globals["cycler"], "joiner": env.globals["joiner"]}
    return env


#: The environments of the HTML part (autoescaped) and of the subject and text parts.
HTML = _sandbox(autoescape=True)
TEXT = _sandbox(autoescape=False)


def start_render() -> None:
    """Give the render about to start on this thread a fresh budget."""
    _budget.reset(time.monotonic() + MAX_RENDER_SECONDS)


def guard_loops(tree: nodes.Template) -> nodes.Template:
    """Route every loop's iterable through the budget filter."""
    for loop in tree.find_all(nodes.For):
        loop.iter = nodes.Filter(loop.iter, GUARD_FILTER, [], [], None, None,
                                 lineno=loop.lineno)
    return tree


def render_part(template: JinjaTemplate, data: Mapping[str, Any], spent: int) -> tuple[str, int]:
    """Render one part streaming, stopping as soon as the output or the clock runs over.

    ``spent`` is the output of the parts before it; returns the text and the new total.
    """
    pieces: list[str] = []
    for piece in template.generate(data):
        spent += len(piece)
        if spent > MAX_OUTPUT_CHARS:
            raise SecurityError("the template renders too large a message")
        if time.monotonic() > _budget.deadline:
            raise SecurityError("the template took too long to render")
        pieces.append(piece)
    return "".join(pieces), spent
