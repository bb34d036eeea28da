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

import itertools
import json
from collections.abc import Callable, Iterator
from datetime import datetime
from functools import lru_cache, wraps
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.visitor import NodeTransformer

from localbot.template_limits import (
    TemplateLimitError,
    bounded,
    bounded_filter,
    check_str_method,
    check_widths,
    current,
    text_size,
)

# TemplateLimitError: what a render past its allowance raises, for the callers of render().
__all__ = ["TemplateLimitError", "compile_template", "environment", "render"]


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
        current().tick()
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
        budget = current()
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
    budget = current()
    budget.tick()
    if isinstance(value, str):
        budget.size(len(value))
    return value


def _finalize(value: Any) -> Any:
    # Every {{ expression }} passes here before it becomes text: bound what str() will make.
    budget = current()
    budget.tick()
    if not isinstance(value, str):
        budget.size(text_size(value, budget.max_chars))
    return value


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"+", "*", "**", "%"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        budget = current()
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
            check_widths(budget, left, right if isinstance(right, tuple) else (right,))
        return super().call_binop(context, operator, left, right)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        budget = current()
        budget.tick()
        owner = getattr(__obj, "__self__", None)
        if isinstance(owner, str):
            args = check_str_method(budget, owner, getattr(__obj, "__name__", ""), args, kwargs)
        return super().call(__context, __obj, *args, **kwargs)

    def getattr(self, obj: Any, attribute: str) -> Any:
        current().tick()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        current().tick()
        return super().getitem(obj, argument)

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        wrapper = super().wrap_str_format(value)
        if wrapper is None:
            return None
        fmt: str = value.__self__

        @wraps(wrapper)
        def checked(*args: Any, **kwargs: Any) -> str:
            budget = current()
            check_widths(budget, fmt, itertools.chain(args, kwargs.values()))
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
    env.filters = {name: bounded_filter(name, f) for name, f in env.filters.items()}
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
