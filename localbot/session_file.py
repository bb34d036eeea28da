"""One session file on disk: read it (checking everything), and encode the bytes to write.

Format: a JSON list of ``messages_to_dict`` entries, exactly what LangChain's
``FileChatMessageHistory`` reads and writes, so either can open the other's files. We write
UTF-8 with ``ensure_ascii=False``, one message per line, so the files stay readable in an editor.

Reading never trusts the file: it may be a FIFO (opened without blocking, then refused), huge
(refused above :data:`MAX_SESSION_BYTES`), not JSON, JSON nested 100k deep, or entries that make
LangChain's own loader raise whatever it raises. Every such case is one :class:`SessionError`
naming the file. What does load is what the rest of localbot can use: a lone UTF-16 surrogate
(``"\\ud800"`` is valid JSON; LangChain writes such escapes; ``json`` even accepts its raw bytes)
becomes U+FFFD, since it has no UTF-8 form and would fail every later encode. Writing applies the
same repair, so a file we write is always one we can read back.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from langchain_core.messages import BaseMessage, messages_from_dict

from localbot.atomic import FileTypeError, read_file
from localbot.errors import SessionError

__all__ = [
    "MAX_SESSION_BYTES",
    "encode_appended",
    "encode_exactly",
    "read_session",
    "repair_surrogates",
    "unusable",
]

MAX_SESSION_BYTES = 512 * 1024**2
"""Larger files are refused: reading one costs several times its size in memory."""

_FIX = "move it aside or pick another session"
# A surrogate escaped (LangChain's ensure_ascii files) or raw (``json.loads`` decodes bytes with
# "surrogatepass", so it accepts the 3-byte form UTF-8 forbids).
_SURROGATE_BYTES = re.compile(rb"\\u[dD][89a-fA-F]|\xed[\xa0-\xbf]")
_SURROGATE = re.compile("[\ud800-\udfff]")
_UTF8 = ("utf-8", "utf-8-sig")


def read_session(path: Path) -> tuple[list[dict[str, Any]], list[BaseMessage]]:
    """The raw entries and the messages in ``path`` (both empty if it does not exist).

    The file is read every time (another process may have written it); decoding it is skipped
    when its bytes equal those last decoded or written here (see :func:`remember`)."""
    try:
        data = read_file(path, max_bytes=MAX_SESSION_BYTES)
    except FileNotFoundError:
        return [], []
    except FileTypeError as err:
        raise unusable(path, str(err.strerror)) from None
    except OSError as err:
        raise unusable(path, f"cannot be read ({err.strerror or err})") from None
    known = _decoded.get(str(path))
    if known is not None and known.data == data:
        return list(known.entries), list(known.messages)
    entries = _parse(path, data)
    try:
        messages = messages_from_dict(entries)
    except Exception as err:  # LangChain's loader on foreign data raises anything (AttributeError…)
        reason = f"holds a message LangChain cannot load ({_first_line(err)})"
        raise unusable(path, reason) from None
    remember(path, data, entries, messages)
    return list(entries), list(messages)


@dataclass(frozen=True)
class _Decoded:
    data: bytes
    entries: list[dict[str, Any]]
    messages: list[BaseMessage]
    ours: bool
    """Whether ``data`` is what :func:`encode_exactly` gives for ``entries``."""


_decoded: dict[str, _Decoded] = {}
_MAX_DECODED = 16
_END = b"\n]\n"  # how a file encode_exactly wrote ends, when it holds a message


def remember(
    path: Path,
    data: bytes,
    entries: list[dict[str, Any]],
    messages: list[BaseMessage],
    *,
    ours: bool = False,
) -> None:
    """Record that ``data`` (the exact bytes of ``path``) decodes to ``entries`` and ``messages``:
    a long session is then not parsed again on every turn (~1 ms per read at 40 messages).
    ``ours``: the bytes are :func:`encode_exactly`'s for ``entries`` (so an append can extend
    them, see :func:`encode_appended`)."""
    if len(_decoded) >= _MAX_DECODED:
        _decoded.pop(next(iter(_decoded), ""), None)
    _decoded[str(path)] = _Decoded(data, list(entries), list(messages), ours)


def encode_exactly(entries: list[dict[str, Any]]) -> tuple[bytes, bool]:
    """The file's bytes for ``entries``: UTF-8 JSON, characters unescaped and one message per
    line, so it reads well in an editor; and whether they hold ``entries`` exactly (False when
    surrogates had to be repaired: reading them back gives other strings).

    Not ``indent=``: that switches ``json`` to its pure-Python encoder, ~10x slower per append.
    """
    if not entries:
        return b"[]\n", True
    lines, exact = _encode_lines(entries)
    return b"[\n" + lines + _END, exact


def encode_appended(
    path: Path, entries: list[dict[str, Any]], new: list[dict[str, Any]]
) -> tuple[bytes, bool]:
    """:func:`encode_exactly` of ``entries + new``, where ``entries`` were just read from
    ``path`` (under the session's lock). When the file's bytes are ones this module encoded, the
    result is those bytes with ``new`` spliced in before the closing bracket: the same bytes,
    without encoding every old message again on every append."""
    known = _decoded.get(str(path))
    if (
        new
        and entries
        and known is not None
        and known.ours
        and len(known.entries) == len(entries)
        and known.data.endswith(_END)
    ):
        lines, exact = _encode_lines(new)
        if exact:
            return known.data[: -len(_END)] + b",\n" + lines + _END, True
    return encode_exactly(entries + new)


def _encode_lines(entries: list[dict[str, Any]]) -> tuple[bytes, bool]:
    """One JSON line per entry, joined by ``,\\n``; whether they hold ``entries`` exactly."""
    text = ",\n".join(json.dumps(entry, ensure_ascii=False) for entry in entries)
    try:
        return text.encode("utf-8"), True
    except UnicodeEncodeError:
        # Surrogates in the text (half an emoji split mid-stream) have no UTF-8 form: pair them
        # up where they pair, and write U+FFFD for the lone ones.
        return repair_surrogates(text).encode("utf-8"), False


def unusable(path: Path, reason: str) -> SessionError:
    return SessionError(f"Session file {path} {reason}; {_FIX}.")


def _parse(path: Path, data: bytes) -> list[dict[str, Any]]:
    """Decode ``data`` and check that it is a list of ``{"type": ..., "data": {...}}`` entries."""
    if not data or data.isspace():
        raise unusable(path, f"is empty ({len(data)} bytes)")
    try:
        entries = json.loads(data)  # from bytes: UTF-8, a BOM allowed
    except (ValueError, RecursionError) as err:
        raise unusable(path, f"is not valid JSON ({_first_line(err)})") from None
    if not isinstance(entries, list):
        raise unusable(path, f"holds a JSON {type(entries).__name__}, not a list of messages")
    for index, entry in enumerate(entries):
        if not _looks_like_message(entry):
            raise unusable(path, f"entry {index} is not a {{'type', 'data'}} chat message")
    if json.detect_encoding(data) not in _UTF8 or _SURROGATE_BYTES.search(data):
        _repair_tree(entries)  # rare: only then walk every string
    return entries


def _looks_like_message(entry: object) -> bool:
    return (
        isinstance(entry, dict)
        and isinstance(entry.get("type"), str)
        and isinstance(entry.get("data"), dict)
    )


def repair_surrogates(text: str) -> str:
    """``text`` with surrogate pairs joined and lone surrogates replaced by U+FFFD."""
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def _repair_tree(root: list[Any]) -> None:
    """Repair every string (keys too) in decoded JSON, in place. A loop, not recursion: the
    nesting is as deep as ``json`` allowed, close to the recursion limit already."""
    stack: list[Any] = [root]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for key in [k for k in node if _SURROGATE.search(k)]:
                node[repair_surrogates(key)] = node.pop(key)
            items: Any = list(node.items())
        elif isinstance(node, list):
            items = enumerate(node)
        else:
            continue
        for key, value in items:
            if isinstance(value, str):
                if _SURROGATE.search(value):
                    node[key] = repair_surrogates(value)
            elif isinstance(value, dict | list):
                stack.append(value)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:160] if text else type(err).__name__
