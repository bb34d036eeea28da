"""The Jinja environment chat templates run in: transformers' own, with bounds on time and size.

A chat template comes from the model file, so it is untrusted code (CVE-2024-34359). Jinja's
``ImmutableSandboxedEnvironment`` stops it from reaching Python internals, but it bounds neither
time nor memory: ``{{ 'x' * 10**9 }}`` allocates a gigabyte, and two nested loops over
``range(100000)`` run for hours without printing anything.

What this module mirrors, from transformers 5.24 (``utils/chat_template_utils.py``, the renderer
Hugging Face users trust): ``trim_blocks`` and ``lstrip_blocks``, the ``loopcontrols`` extension,
the ``{% generation %}`` tag (renders its body), ``tojson`` as plain ``json.dumps`` (no HTML
escaping, ``ensure_ascii=False``), ``raise_exception``, ``strftime_now``, a ``dict`` and a
``namespace`` that refuse underscore names. Nothing here changes what a template renders; the
bounds only stop a template that runs past them:

* time: every call, attribute or item access, operator, filter, loop iteration and output chunk
  checks the render's deadline (a loop that prints nothing still iterates);
* size: products and sums of strings and lists, joins, replacements, padding widths and
  formatting widths are checked *before* they run; every output chunk and ``~`` concatenation
  after; all against the render's character allowance;
* nothing runs at load: the optimizer (constant folding) is off and the size-checked operators
  are intercepted, so ``{{ 'x' * 10**9 }}`` is refused when rendered, not computed when compiled.
"""

from __future__ import annotations

import inspect
import itertools
import json
import math
import re
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache, wraps
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.visitor import NodeTransformer

_MAX_INT_BITS = 1 << 16
"""Integer results wider than this are refused: no chat template needs 20,000-digit numbers, and
computing ``10**10**10`` would hold the interpreter for hours in one C call."""

_WIDTH = re.compile(r"\d+")


class TemplateLimitError(Exception):
    """A template ran past its time or size allowance (deliberately not a ``TemplateError``: a
    template cannot catch it, and a retry would only run past the limit again)."""


@dataclass(frozen=True)
class _Budget:
    max_chars: int
    deadline: float
    seconds: float

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise TemplateLimitError(f"it ran longer than {self.seconds:.1f} s")

    def size(self, chars: int) -> None:
        if chars > self.max_chars:
            raise TemplateLimitError(f"it would produce more than {self.max_chars:,} characters")

    def number(self, bits: int) -> None:
        if bits > _MAX_INT_BITS:
            raise TemplateLimitError(f"it computes a number wider than {_MAX_INT_BITS} bits")


_budget_var: ContextVar[_Budget | None] = ContextVar("template_budget", default=None)

# Outside a render (while compiling) no deadline applies, only a generous size bound.
_UNBOUNDED = _Budget(max_chars=1 << 24, deadline=math.inf, seconds=math.inf)


def _current() -> _Budget:
    return _budget_var.get() or _UNBOUNDED


@contextmanager
def bounded(max_chars: int, seconds: float) -> Iterator[_Budget]:
    """Apply a time and size allowance to the renders made inside the ``with`` block."""
    budget = _Budget(max_chars, time.monotonic() + seconds, seconds)
    token = _budget_var.set(budget)
    try:
        yield budget
    finally:
        _budget_var.reset(token)


def render(
    template: jinja2.Template, context: dict[str, Any], max_chars: int, seconds: float
) -> str:
    """Render ``template`` within ``max_chars`` characters and ``seconds`` seconds, else raise
    ``TemplateLimitError``. Output is gathered chunk by chunk so that a loop that prints forever
    stops at the limit instead of filling memory."""
    with bounded(max_chars, seconds) as budget:
        chunks: list[str] = []
        total = 0
        for chunk in template.generate(**context):
            total += len(chunk)
            budget.size(total)
            budget.tick()
            chunks.append(chunk)
        return "".join(chunks)


# ------------------------------------------------------------------ size estimates
def _text_size(value: Any, limit: int) -> int:
    """Roughly how many characters ``str(value)`` or ``tojson`` gives, counted only up to just
    past ``limit`` (a list of a thousand references to one long string is small in memory and
    huge when printed)."""
    total = 0
    stack = [value]
    while stack and total <= limit:
        item = stack.pop()
        if isinstance(item, str):
            total += len(item) + 2
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
            total += 2 * len(item) + 2
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
            total += 2 * len(item) + 2
        else:
            total += 8
    return total


def _check_widths(budget: _Budget, fmt: str, args: Iterable[Any]) -> None:
    """Padding widths in a format string (``'%1000000000s'``, ``'{:>1000000000}'``) or passed
    as arguments (``'%*s'``) would allocate that many characters."""
    for match in _WIDTH.finditer(fmt):
        if len(match.group()) > 12:
            budget.size(budget.max_chars + 1)
        budget.size(int(match.group()))
    for arg in args:
        if isinstance(arg, int):
            budget.size(arg)


def _check_joined(budget: _Budget, separator: str, items: list[Any]) -> None:
    budget.size(len(separator) * max(len(items) - 1, 0) + _text_size(items, budget.max_chars))


def _check_replaced(budget: _Budget, text: str, old: Any, new: Any) -> None:
    if not (isinstance(text, str) and isinstance(old, str) and isinstance(new, str)):
        return
    count = len(text) + 1 if not old else text.count(old)
    budget.size(len(text) + count * max(len(new) - len(old), 0))


def _check_ints(budget: _Budget, values: Iterable[Any]) -> None:
    # An integer argument above the allowance is a width or count that would allocate that
    # much (center, ljust, zfill, indent, batch, slice, tojson(indent=...)).
    for value in values:
        if isinstance(value, int) and not isinstance(value, bool):
            budget.size(value)


def _check_str_method(budget: _Budget, owner: str, name: str, args: tuple, kwargs: dict) -> tuple:
    """Check a call of a ``str`` method before it runs; returns the arguments to call it with
    (an iterable given to ``join`` is read into a list once, to be measured)."""
    _check_ints(budget, itertools.chain(args, kwargs.values()))
    if name == "join" and len(args) == 1 and isinstance(args[0], Iterable):
        items = args[0] if isinstance(args[0], (list, tuple, str)) else list(args[0])
        _check_joined(budget, owner, list(items))
        return (items,)
    if name == "replace" and len(args) >= 2:
        _check_replaced(budget, owner, args[0], args[1])
    elif name == "expandtabs":
        tab = args[0] if args else kwargs.get("tabsize", 8)
        if isinstance(tab, int):
            budget.size(len(owner) * max(tab, 1))
    return args


# ------------------------------------------------------------------ the environment
class _GenerationTag(Extension):
    """``{% generation %}…{% endgeneration %}``: transformers marks assistant text for training
    masks with it; for rendering it is transparent."""

    tags = {"generation"}  # noqa: RUF012 (Jinja's own class attribute)

    def parse(self, parser: jinja2.parser.Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller: Callable[[], str]) -> str:
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """transformers' namespace: no underscore-prefixed attributes (no way into CPython
    internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check_name(name)
        _current().tick()
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot store underscore-prefixed attributes on a namespace: "
                f"{name!r}"
            )


class _TemplateDict:
    """transformers' ``dict``: a call and ``fromkeys``, nothing to reach the type through."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _BoundedIterable:
    """What a ``{% for %}`` loop iterates: the same items, with a deadline check per item.
    ``len`` passes through so that ``loop.length`` and ``loop.last`` behave as before."""

    def __init__(self, iterable: Any) -> None:
        self._iterable = iterable

    def __iter__(self) -> Iterator[Any]:
        budget = _current()
        for item in self._iterable:
            budget.tick()
            yield item

    def __len__(self) -> int:
        return len(self._iterable)


class _BoundLoops(NodeTransformer):
    """Route every loop's iterable and every ``~`` concatenation through a checking filter."""

    def visit_For(self, node: nodes.For) -> nodes.Node:
        self.generic_visit(node)
        node.iter = nodes.Filter(node.iter, _LOOP_FILTER, [], [], None, None, lineno=node.lineno)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        self.generic_visit(node)
        return nodes.Filter(node, _SIZED_FILTER, [], [], None, None, lineno=node.lineno)


_LOOP_FILTER = "localbot_bounded_loop"
_SIZED_FILTER = "localbot_sized_text"


def _sized(value: Any) -> Any:
    budget = _current()
    budget.tick()
    if isinstance(value, str):
        budget.size(len(value))
    return value


def _size_of_join(budget: _Budget, args: inspect.BoundArguments) -> None:
    value = args.arguments.get("value")
    if not isinstance(value, (str, list, tuple)):
        # A generator (``map``, ``select``) can only be measured by reading it: read it once and
        # hand the filter the list.
        value = args.arguments["value"] = list(value) if isinstance(value, Iterable) else []
    _check_joined(budget, str(args.arguments.get("d", "")), list(value))


def _size_of_replace(budget: _Budget, args: inspect.BoundArguments) -> None:
    a = args.arguments
    _check_replaced(budget, a.get("s"), a.get("old"), a.get("new"))


def _size_of_indent(budget: _Budget, args: inspect.BoundArguments) -> None:
    text, width = args.arguments.get("s"), args.arguments.get("width", 4)
    per_line = len(width) if isinstance(width, str) else width if isinstance(width, int) else 0
    if isinstance(text, str):
        budget.size(len(text) + (text.count("\n") + 1) * per_line)


def _size_of_wordwrap(budget: _Budget, args: inspect.BoundArguments) -> None:
    text, width = args.arguments.get("s"), args.arguments.get("width", 79)
    wrap = args.arguments.get("wrapstring") or "\n"
    if isinstance(text, str) and isinstance(width, int) and isinstance(wrap, str):
        lines = len(text) // max(width, 1) + text.count("\n") + 1
        budget.size(len(text) + lines * len(wrap))


def _size_of_format(budget: _Budget, args: inspect.BoundArguments) -> None:
    fmt = args.arguments.get("value")
    if isinstance(fmt, str):
        extra = (*args.arguments.get("args", ()), *args.arguments.get("kwargs", {}).values())
        _check_widths(budget, fmt, extra)


def _size_of_text(budget: _Budget, args: inspect.BoundArguments) -> None:
    first = next(iter(v for k, v in args.arguments.items() if k not in _PASSED), None)
    budget.size(_text_size(first, budget.max_chars))


_PASSED = ("context", "eval_ctx", "environment")
_SIZE_CHECKS: dict[str, Callable[[_Budget, inspect.BoundArguments], None]] = {
    "join": _size_of_join,
    "replace": _size_of_replace,
    "indent": _size_of_indent,
    "wordwrap": _size_of_wordwrap,
    "format": _size_of_format,
    "tojson": _size_of_text,
    "string": _size_of_text,
    "pprint": _size_of_text,
}


def _bounded_filter(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    check = _SIZE_CHECKS.get(name)
    signature = inspect.signature(func) if check else None

    @wraps(func)  # keeps jinja_pass_arg: Jinja still passes the context / environment
    def checked(*args: Any, **kwargs: Any) -> Any:
        budget = _current()
        budget.tick()
        _check_ints(budget, itertools.chain(args, kwargs.values()))
        if check is not None and signature is not None:
            try:
                bound = signature.bind(*args, **kwargs)
            except TypeError:
                pass  # the filter itself says what is wrong with its arguments
            else:
                check(budget, bound)
                args, kwargs = bound.args, bound.kwargs
        result = func(*args, **kwargs)
        if isinstance(result, str):
            budget.size(len(result))
        return result

    return checked


def _finalize(value: Any) -> Any:
    # Every {{ expression }} passes here before it becomes text: bound what str() will make.
    budget = _current()
    budget.tick()
    if not isinstance(value, str):
        budget.size(_text_size(value, budget.max_chars))
    return value


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"+", "*", "**", "%"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        budget = _current()
        budget.tick()
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int):
                    budget.size(len(seq) * n)
            if isinstance(left, int) and isinstance(right, int):
                budget.number(abs(left).bit_length() + abs(right).bit_length())
        elif operator == "+":
            if isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
                budget.size(len(left) + len(right))
        elif operator == "**":
            if isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
                budget.number(abs(left).bit_length() * right)
        elif operator == "%" and isinstance(left, str):
            _check_widths(budget, left, right if isinstance(right, tuple) else (right,))
        return super().call_binop(context, operator, left, right)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        budget = _current()
        budget.tick()
        owner = getattr(__obj, "__self__", None)
        if isinstance(owner, str):
            args = _check_str_method(budget, owner, getattr(__obj, "__name__", ""), args, kwargs)
        return super().call(__context, __obj, *args, **kwargs)

    def getattr(self, obj: Any, attribute: str) -> Any:
        _current().tick()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        _current().tick()
        return super().getitem(obj, argument)

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        wrapper = super().wrap_str_format(value)
        if wrapper is None:
            return None
        fmt: str = value.__self__

        @wraps(wrapper)
        def checked(*args: Any, **kwargs: Any) -> str:
            budget = _current()
            _check_widths(budget, fmt, itertools.chain(args, kwargs.values()))
            result = wrapper(*args, **kwargs)
            budget.size(len(result))
            return result

        return checked


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # transformers' filter: Jinja's own escapes <, >, & and ' for HTML, which chat prompts are not.
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


@lru_cache(maxsize=1)
def environment() -> _BoundedSandbox:
    """The one environment every chat template is compiled in."""
    env = _BoundedSandbox(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationTag, loopcontrols],
        optimized=False,  # no constant folding: nothing a template says runs at load
        finalize=_finalize,
    )
    env.filters["tojson"] = _tojson
    env.filters = {name: _bounded_filter(name, f) for name, f in env.filters.items()}
    env.filters[_LOOP_FILTER] = _BoundedIterable
    env.filters[_SIZED_FILTER] = _sized
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _Namespace
    return env


@lru_cache(maxsize=32)
def compile_template(source: str) -> jinja2.Template:
    """Compile ``source`` with its loops and concatenations bounded. Raises Jinja's
    ``TemplateSyntaxError`` (or ``RecursionError`` for absurd nesting) as they come."""
    env = environment()
    tree = env.parse(source)
    tree = _BoundLoops().visit(tree)
    tree.set_environment(env)
    return env.from_string(tree)
