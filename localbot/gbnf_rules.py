"""GBNF building blocks the JSON-schema grammar needs and llama-cpp-python's converter lacks.

* :func:`json_safe_pattern`: a JSON Schema ``pattern`` rewritten into the regex subset the
  converter reads, producing only characters a JSON string may hold raw (never a quote, a
  backslash or a control character, which would end or break the string), with ``\\d \\w \\s``
  and unanchored patterns (JSON Schema patterns match anywhere).
* :func:`integer_rule` and :func:`number_rule`: bounds (``minimum``, ``exclusiveMaximum``...) as
  digit-range rules, written the way JSON writes numbers (no leading zeros; bounded numbers
  without an exponent; number bounds must be whole numbers).
* :func:`gbnf_literal`: a correctly escaped GBNF string literal.

Anything these cannot express raises :func:`unenforceable` (a ConfigError naming the place).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from localbot.errors import ConfigError

__all__ = [
    "gbnf_literal",
    "gbnf_not_char",
    "integer_rule",
    "json_safe_pattern",
    "number_rule",
    "unenforceable",
]

_MAX_DIGITS = 16  # like the stock integer rule: enough for any int64, and no endless numbers


def unenforceable(path: str, what: str) -> ConfigError:
    where = path or "the top level"
    return ConfigError(
        f"this JSON schema cannot be enforced by a llama.cpp grammar: {what} at {where}; "
        "simplify the schema (or validate that part yourself after parsing)"
    )


# ---------------------------------------------------------------------------- patterns
# Characters a JSON string may hold raw: no quote, no backslash, no control character. Patterns
# produce only these, so the text between the quotes is the string's value exactly.
_JSON_CHAR_CLASS_EXCLUDED = '"\\\\\\x00-\\x1F\\x7F'
_SAFE_DOT = f"[^{_JSON_CHAR_CLASS_EXCLUDED}]"
_CLASS_ESCAPES = {"d": "0-9", "w": "a-zA-Z0-9_", "s": " \\t"}
_UNSAFE_CODEPOINTS = [(0, 0x1F), (0x22, 0x22), (0x5C, 0x5C), (0x7F, 0x7F)]


def json_safe_pattern(pattern: Any, path: str) -> str:
    """Rewrite a JSON Schema regex into the subset the converter reads, producing only characters
    a JSON string can hold raw. Anchored ``^...$`` as the converter requires."""
    if not isinstance(pattern, str):
        raise unenforceable(path, "a pattern that is not a string")
    body = pattern
    start = body.startswith("^")
    end = body.endswith("$") and not body.endswith("\\$")
    body = body[1 if start else 0 : -1 if end else None]
    out = "".join(_pattern_tokens(body, path))
    if not start:
        out = f"({_SAFE_DOT})*({out})" if "|" in out else f"({_SAFE_DOT})*{out}"
    elif "|" in out:
        out = f"({out})"
    if not end:
        out = f"{out}({_SAFE_DOT})*"
    return f"^{out}$"


def _pattern_tokens(body: str, path: str) -> Iterator[str]:
    i = 0
    while i < len(body):
        token, i = _pattern_token(body, i, path)
        yield token


def _pattern_token(body: str, i: int, path: str) -> tuple[str, int]:
    """The GBNF for the pattern element at ``body[i]``, and where the next one starts."""
    c = body[i]
    if c == "\\":
        return _escape_outside_class(body[i + 1 : i + 2], path), i + 2
    if c == "[":
        j = _class_end(body, i, path)
        return _safe_class(body[i + 1 : j], path), j + 1
    if c == "(":
        if body.startswith("(?:", i):
            return "(", i + 3
        if body.startswith("(?", i):
            raise unenforceable(path, "lookaround or named groups in a pattern")
        return "(", i + 1
    if c in "*+?}" and body[i + 1 : i + 2] == "?":
        return c, i + 2  # a lazy quantifier matches the same strings as the greedy one
    if c in "^$":
        raise unenforceable(path, f"an anchor {c!r} inside a pattern")
    if c == '"':
        raise unenforceable(path, "a quote character in a pattern")
    return (_SAFE_DOT if c == "." else c), i + 1


def _class_end(body: str, i: int, path: str) -> int:
    """The index of the ``]`` closing the character class that opens at ``body[i]``."""
    j = i + 1
    if body[j : j + 1] == "^":
        j += 1
    if body[j : j + 1] == "]":
        j += 1
    while j < len(body) and body[j] != "]":
        j += 2 if body[j] == "\\" else 1
    if j >= len(body):
        raise unenforceable(path, "an unclosed [ in a pattern")
    return j


def _escape_outside_class(e: str, path: str) -> str:
    if e in _CLASS_ESCAPES:
        return f"[{_CLASS_ESCAPES[e]}]"
    if e in "tnr":
        raise unenforceable(path, "a control character (\\t, \\n, \\r) in a pattern")
    if e and not e.isalnum() and e not in '"\\':
        return _literal_class(e)
    raise unenforceable(path, f"the escape \\{e} in a pattern")


def _literal_class(char: str) -> str:
    if char in "]^-\\":
        return f"[\\{char}]" if char in "]\\" else ("[-]" if char == "-" else "[\\x5E]")
    return f"[{char}]"


def _safe_class(inner: str, path: str) -> str:
    """A regex character class as a GBNF class without unsafe characters."""
    negated = inner.startswith("^")
    items = _class_items(inner[1:] if negated else inner, path)
    if negated:
        return (
            "[^"
            + "".join(_class_text(lo, hi) for lo, hi in items)
            + _JSON_CHAR_CLASS_EXCLUDED
            + "]"
        )
    safe: list[tuple[int, int]] = []
    for lo, hi in items:
        safe.extend(_subtract(lo, hi))
    if not safe:
        raise unenforceable(
            path, "a character class of only quotes, backslashes or control characters"
        )
    return "[" + "".join(_class_text(lo, hi) for lo, hi in safe) + "]"


def _class_items(inner: str, path: str) -> list[tuple[int, int]]:
    chars: list[int | str] = []  # code points, or "-" as the range operator
    i = 0
    while i < len(inner):
        c = inner[i]
        if c == "\\":
            e = inner[i + 1 : i + 2]
            i += 2
            if e in _CLASS_ESCAPES:
                for lo, hi in _class_items_plain(_CLASS_ESCAPES[e]):
                    chars.extend([lo, "-", hi] if lo != hi else [lo])
                continue
            if not e or e.isalnum():
                raise unenforceable(path, f"the escape \\{e} in a character class")
            chars.append(ord(e))
        elif c == "-" and chars and i + 1 < len(inner):
            chars.append("-")
            i += 1
        else:
            chars.append(ord(c))
            i += 1
    items: list[tuple[int, int]] = []
    k = 0
    while k < len(chars):
        if k + 2 < len(chars) and chars[k + 1] == "-" and isinstance(chars[k + 2], int):
            lo, hi = chars[k], chars[k + 2]
            assert isinstance(lo, int)
            items.append((lo, hi))
            k += 3
        else:
            c = chars[k]
            items.append((ord("-"), ord("-")) if c == "-" else (c, c))  # type: ignore[arg-type]
            k += 1
    return items


def _class_items_plain(text: str) -> list[tuple[int, int]]:
    text = text.replace("\\t", "\t")
    out, i = [], 0
    while i < len(text):
        if i + 2 < len(text) and text[i + 1] == "-":
            out.append((ord(text[i]), ord(text[i + 2])))
            i += 3
        else:
            out.append((ord(text[i]), ord(text[i])))
            i += 1
    return out


def _subtract(lo: int, hi: int) -> list[tuple[int, int]]:
    ranges = [(lo, hi)]
    for a, b in _UNSAFE_CODEPOINTS:
        ranges = [
            part
            for x, y in ranges
            for part in ((x, min(y, a - 1)), (max(x, b + 1), y))
            if part[0] <= part[1]
        ]
    return ranges


def _class_char(cp: int) -> str:
    if cp < 0x20 or cp == 0x7F or chr(cp) in "]\\-^[":
        return f"\\x{cp:02X}" if cp < 0x100 else f"\\u{cp:04X}"
    return chr(cp)


def _class_text(lo: int, hi: int) -> str:
    return _class_char(lo) if lo == hi else f"{_class_char(lo)}-{_class_char(hi)}"


# ---------------------------------------------------------------------------- numbers
def _digits_between(lo: str, hi: str) -> str:
    """GBNF for the digit strings of one length from ``lo`` to ``hi`` (same length)."""
    if not lo:
        return ""
    if lo == hi:
        return f'"{lo}"'
    if lo[0] == hi[0]:
        return f'"{lo[0]}" ({_digits_between(lo[1:], hi[1:])})'
    rest = len(lo) - 1
    any_rest = f" [0-9]{{{rest}}}" if rest > 1 else (" [0-9]" if rest == 1 else "")
    if lo[1:] == "0" * rest and hi[1:] == "9" * rest:
        return f"[{lo[0]}-{hi[0]}]{any_rest}"
    parts = []
    if rest:
        parts.append(f'"{lo[0]}" ({_digits_between(lo[1:], "9" * rest)})')
    low_mid, high_mid = int(lo[0]) + 1, int(hi[0]) - 1
    if low_mid <= high_mid:
        parts.append(f"[{low_mid}-{high_mid}]{any_rest}")
    if rest:
        parts.append(f'"{hi[0]}" ({_digits_between("0" * rest, hi[1:])})')
    return " | ".join(parts)


def _uint_between(lo: int, hi: int | None) -> str:
    """GBNF for canonical non-negative integers in [lo, hi] (hi None: up to 16 digits)."""
    top = hi if hi is not None else 10**_MAX_DIGITS - 1
    parts = []
    for length in range(len(str(lo)), len(str(top)) + 1):
        a = max(lo, 10 ** (length - 1) if length > 1 else 0)
        b = min(top, 10**length - 1)
        if a <= b:
            parts.append(f"({_digits_between(str(a), str(b))})")
    if not parts:
        raise ConfigError("empty integer range")
    return "(" + " | ".join(parts) + ")"


def integer_rule(lo: int | None, hi: int | None) -> str:
    """GBNF for the integers in [lo, hi] (either may be None), written as JSON writes them."""
    if lo is not None and hi is not None and lo > hi:
        raise ConfigError(f"no integer lies between {lo} and {hi}")
    parts = []
    if hi is None or hi >= 0:
        parts.append(_uint_between(max(lo, 0) if lo is not None else 0, hi))
    if lo is None or lo < 0:
        parts.append('"-" ' + _uint_between(max(-hi, 1) if hi is not None else 1,
                                            -lo if lo is not None else None))  # fmt: skip
    return "(" + " | ".join(parts) + ")"


_FRACTION = '("." [0-9]{1,15})'
_NONZERO_FRACTION = '("." "0"{0,14} [1-9] [0-9]{0,14})'
_ZERO_FRACTION = '("." "0"{1,15})'


def _magnitude_rule(a: int, a_open: bool, b: int | None, b_open: bool) -> str | None:
    """GBNF for decimal numbers m (no sign, no exponent) with a < m < b, ends open or closed."""
    if b is not None and (a > b or (a == b and (a_open or b_open))):
        return None
    if b is not None and a == b:
        return f'"{a}" {_ZERO_FRACTION}?'
    parts = [f'"{a}" {_NONZERO_FRACTION}' if a_open else f'"{a}" {_FRACTION}?']
    if b is None or a + 1 <= b - 1:
        parts.append(f"{_uint_between(a + 1, None if b is None else b - 1)} {_FRACTION}?")
    if b is not None and not b_open:
        parts.append(f'"{b}" {_ZERO_FRACTION}?')
    return "(" + " | ".join(parts) + ")"


def number_rule(lo: float | None, lo_open: bool, hi: float | None, hi_open: bool) -> str:
    """GBNF for JSON numbers between whole-number bounds (None: unbounded)."""
    low = int(lo) if lo is not None else None
    high = int(hi) if hi is not None else None
    parts = []
    if high is None or high > 0 or (high == 0 and not hi_open):
        a, a_open = (low, lo_open) if low is not None and low >= 0 else (0, False)
        positive = _magnitude_rule(a, a_open, high, hi_open)
        if positive:
            parts.append(positive)
    if low is None or low < 0:
        a, a_open = (-high, hi_open) if high is not None and high < 0 else (0, True)
        negative = _magnitude_rule(a, a_open, -low if low is not None else None, lo_open)
        if negative:
            parts.append(f'"-" {negative}')
    if not parts:
        raise ConfigError(f"no number lies between {lo} and {hi}")
    return "(" + " | ".join(parts) + ")"


def gbnf_literal(text: str) -> str:
    """A GBNF literal for ``text`` (every character escaped as GBNF needs)."""
    return f'"{_gbnf_escape(text)}"'


def gbnf_not_char(char: str) -> str:
    """A GBNF class of every character except ``char`` (and NUL)."""
    return f"[^{_class_char(ord(char))}\\x00]"


def _gbnf_escape(text: str) -> str:
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\x{ord(ch):02X}")
        else:
            out.append(ch)
    return "".join(out)
