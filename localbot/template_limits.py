"""The time and size allowance of one chat-template render, and the checks that hold a template
to it (``localbot.template_sandbox`` wires them into the Jinja environment).

An allowance is set for the renders inside :func:`bounded` and found again through
:func:`current` (a context variable, so concurrent renders on other threads keep their own).
Sizes are checked *before* the work that would allocate them: a product or sum of strings, a
join, a replacement, a padding or formatting width, an integer argument that is a width or a
count; after, every string a filter returns.
"""

from __future__ import annotations

import inspect
import itertools
import math
import re
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from functools import wraps
from typing import Any

__all__ = [
    "Budget",
    "TemplateLimitError",
    "bounded",
    "bounded_filter",
    "check_str_method",
    "check_widths",
    "current",
    "text_size",
]

_MAX_INT_BITS = 1 << 16
"""Integer results wider than this are refused: no chat template needs 20,000-digit numbers, and
computing ``10**10**10`` would hold the interpreter for hours in one C call."""

_WIDTH = re.compile(r"\d+")


class TemplateLimitError(Exception):
    """A template ran past its time or size allowance (deliberately not a ``TemplateError``: a
    template cannot catch it, and a retry would only run past the limit again)."""


@dataclass(frozen=True)
class Budget:
    """One render's allowance: characters it may produce, and when it must have finished."""

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


_budget_var: ContextVar[Budget | None] = ContextVar("template_budget", default=None)

# Outside a render (while compiling) no deadline applies, only a generous size bound.
_UNBOUNDED = Budget(max_chars=1 << 24, deadline=math.inf, seconds=math.inf)


def current() -> Budget:
    """The allowance of the render in progress (outside one: only a generous size bound)."""
    return _budget_var.get() or _UNBOUNDED


@contextmanager
def bounded(max_chars: int, seconds: float) -> Iterator[Budget]:
    """Apply a time and size allowance to the renders made inside the ``with`` block."""
    budget = Budget(max_chars, time.monotonic() + seconds, seconds)
    token = _budget_var.set(budget)
    try:
        yield budget
    finally:
        _budget_var.reset(token)


# ------------------------------------------------------------------ size checks
def text_size(value: Any, limit: int) -> int:
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


def check_widths(budget: Budget, fmt: str, args: Iterable[Any]) -> None:
    """Padding widths in a format string (``'%1000000000s'``, ``'{:>1000000000}'``) or passed
    as arguments (``'%*s'``) would allocate that many characters."""
    for match in _WIDTH.finditer(fmt):
        if len(match.group()) > 12:
            budget.size(budget.max_chars + 1)
        budget.size(int(match.group()))
    for arg in args:
        if isinstance(arg, int):
            budget.size(arg)


def _check_joined(budget: Budget, separator: str, items: list[Any]) -> None:
    budget.size(len(separator) * max(len(items) - 1, 0) + text_size(items, budget.max_chars))


def _check_replaced(budget: Budget, text: str, old: Any, new: Any) -> None:
    if not (isinstance(text, str) and isinstance(old, str) and isinstance(new, str)):
        return
    count = len(text) + 1 if not old else text.count(old)
    budget.size(len(text) + count * max(len(new) - len(old), 0))


def _check_ints(budget: Budget, values: Iterable[Any]) -> None:
    # An integer argument above the allowance is a width or count that would allocate that
    # much (center, ljust, zfill, indent, batch, slice, tojson(indent=...)).
    for value in values:
        if isinstance(value, int) and not isinstance(value, bool):
            budget.size(value)


def check_str_method(budget: Budget, owner: str, name: str, args: tuple, kwargs: dict) -> tuple:
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


# ------------------------------------------------------------------ filters
def _size_of_join(budget: Budget, args: inspect.BoundArguments) -> None:
    value = args.arguments.get("value")
    if not isinstance(value, (str, list, tuple)):
        # A generator (``map``, ``select``) can only be measured by reading it: read it once and
        # hand the filter the list.
        value = args.arguments["value"] = list(value) if isinstance(value, Iterable) else []
    _check_joined(budget, str(args.arguments.get("d", "")), list(value))


def _size_of_replace(budget: Budget, args: inspect.BoundArguments) -> None:
    a = args.arguments
    _check_replaced(budget, a.get("s"), a.get("old"), a.get("new"))


def _size_of_indent(budget: Budget, args: inspect.BoundArguments) -> None:
    text, width = args.arguments.get("s"), args.arguments.get("width", 4)
    per_line = len(width) if isinstance(width, str) else width if isinstance(width, int) else 0
    if isinstance(text, str):
        budget.size(len(text) + (text.count("\n") + 1) * per_line)


def _size_of_wordwrap(budget: Budget, args: inspect.BoundArguments) -> None:
    text, width = args.arguments.get("s"), args.arguments.get("width", 79)
    wrap = args.arguments.get("wrapstring") or "\n"
    if isinstance(text, str) and isinstance(width, int) and isinstance(wrap, str):
        lines = len(text) // max(width, 1) + text.count("\n") + 1
        budget.size(len(text) + lines * len(wrap))


def _size_of_format(budget: Budget, args: inspect.BoundArguments) -> None:
    fmt = args.arguments.get("value")
    if isinstance(fmt, str):
        extra = (*args.arguments.get("args", ()), *args.arguments.get("kwargs", {}).values())
        check_widths(budget, fmt, extra)


def _size_of_text(budget: Budget, args: inspect.BoundArguments) -> None:
    first = next(iter(v for k, v in args.arguments.items() if k not in _PASSED), None)
    budget.size(text_size(first, budget.max_chars))


_PASSED = ("context", "eval_ctx", "environment")
_SIZE_CHECKS: dict[str, Callable[[Budget, inspect.BoundArguments], None]] = {
    "join": _size_of_join,
    "replace": _size_of_replace,
    "indent": _size_of_indent,
    "wordwrap": _size_of_wordwrap,
    "format": _size_of_format,
    "tojson": _size_of_text,
    "string": _size_of_text,
    "pprint": _size_of_text,
}


def bounded_filter(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    """The Jinja filter ``func`` (registered as ``name``), checking the deadline on every call,
    its integer arguments and, for the filters that can grow text, its arguments' sizes before it
    runs; the text it returns after."""
    check = _SIZE_CHECKS.get(name)
    signature = inspect.signature(func) if check else None

    @wraps(func)  # keeps jinja_pass_arg: Jinja still passes the context / environment
    def checked(*args: Any, **kwargs: Any) -> Any:
        budget = current()
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
