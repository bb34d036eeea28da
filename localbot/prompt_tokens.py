"""From rendered prompt pieces to the token ids llama.cpp evaluates.

The goal is the ids llama.cpp's own server gets for a rendered prompt, ``tokenize(prompt,
special=True)`` on the whole string (what a model saw in training), with one exception: control
tokens typed in a message stay plain text (``localbot.templates`` marks them as ``plain``
pieces).

llama.cpp tokenizes a prompt in two steps: it first cuts the text at every occurrence of a
special token's text (control, user-defined and unknown tokens, longest first), then tokenizes
each stretch between the cuts on its own. Cutting at the same places here gives the same ids and
lets each stretch be cached: a turn's markup and its old messages repeat every turn. Two details
of llama.cpp's cutting are mirrored: tokens with the ``lstrip``/``rstrip`` attribute (Phi-3's)
eat the whitespace beside them, and with SentencePiece vocabularies that add a space prefix, the
prefix goes at the start of every stretch, which a separate tokenize call of each stretch does.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from localbot.llama_cache import vocab_handle
from localbot.templates import Piece

# llama.cpp's llama_token_attr bits (llama.h).
_UNKNOWN = 1 << 0
_CONTROL = 1 << 3
_USER_DEFINED = 1 << 4
_LSTRIP = 1 << 7
_RSTRIP = 1 << 8

_C_SPACE = " \t\n\v\f\r"  # what llama.cpp's isspace() strips
_LONGEST = 256  # longer special-token texts are not cut at here (llama.cpp still parses them)


@dataclass(frozen=True)
class SpecialTokens:
    """A vocabulary's special tokens, as llama.cpp's tokenizer treats them."""

    cut: re.Pattern[str] | None
    """Every text llama.cpp cuts a prompt at: control, user-defined and unknown tokens."""
    control: frozenset[str]
    """The ones it reads as tokens only when parsing special tokens (control, unknown): typed in a
    message, these must stay text."""
    lstrip: frozenset[str]
    rstrip: frozenset[str]

    def controls_in(self, texts: Iterable[str]) -> frozenset[str]:
        """The control-token texts that occur in ``texts``."""
        if self.cut is None or not self.control:
            return frozenset()
        found = {m.group() for t in texts for m in self.cut.finditer(t)}
        return frozenset(found & self.control)


_cache: dict[tuple[str, int, int], SpecialTokens] = {}
_cache_lock = threading.Lock()


def special_tokens(tokenizer: Any, path: str) -> SpecialTokens:
    """The special tokens of the vocabulary of the model file at ``path`` (``tokenizer``: a
    ``llama_cpp.Llama`` of it, vocab-only is enough). Read once per file and process: a scan of
    the whole vocabulary (~0.1 s for Gemma's 262k tokens)."""
    try:
        st = os.stat(path)
        key = (str(path), st.st_size, st.st_mtime_ns)
    except OSError:
        key = (str(path), -1, -1)
    with _cache_lock:
        found = _cache.get(key)
    if found is None:
        found = _scan(tokenizer)
        with _cache_lock:
            if len(_cache) >= 8:
                _cache.pop(next(iter(_cache)))
            _cache[key] = found
    return found


def _scan(tokenizer: Any) -> SpecialTokens:
    import llama_cpp

    vocab = vocab_handle(tokenizer)
    get_attr = llama_cpp.llama_vocab_get_attr
    cut: list[str] = []
    control: list[str] = []
    lstrip: set[str] = set()
    rstrip: set[str] = set()
    for token in range(llama_cpp.llama_vocab_n_tokens(vocab)):
        attr = get_attr(vocab, token)
        if not attr & (_CONTROL | _UNKNOWN | _USER_DEFINED):
            continue
        try:
            text = llama_cpp.llama_vocab_get_text(vocab, token).decode("utf-8")
        except UnicodeDecodeError:
            continue  # cannot occur in a str prompt as the same bytes
        if not text or len(text) > _LONGEST:
            continue
        cut.append(text)
        if attr & (_CONTROL | _UNKNOWN):
            control.append(text)
        if attr & _LSTRIP:
            lstrip.add(text)
        if attr & _RSTRIP:
            rstrip.add(text)
    return SpecialTokens(
        _trie_pattern(cut), frozenset(control), frozenset(lstrip), frozenset(rstrip)
    )


def _trie_pattern(words: Iterable[str]) -> re.Pattern[str] | None:
    """A regex matching any of ``words``, longest match first, built as a trie: a plain
    alternation of Gemma's 6,000 control tokens would try each at every ``<`` of a prompt."""
    trie: dict[str, dict] = {}
    for word in words:
        node = trie
        for char in word:
            node = node.setdefault(char, {})
        node[""] = {}
    if not trie:
        return None

    def build(node: dict[str, dict]) -> str:
        branches = [re.escape(char) + build(child) for char, child in sorted(node.items()) if char]
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        # At a word's end, go on to a longer word if one matches (greedy), else stop here.
        return f"(?:{body})?" if "" in node else body

    return re.compile(build(trie))


def encode(
    pieces: Sequence[Piece],
    specials: SpecialTokens,
    tokenize: Callable[[str, bool], Sequence[int]],
) -> list[int]:
    """Token ids of ``pieces``. ``tokenize(text, special)`` is llama.cpp's tokenizer without
    BOS (cached by the caller).

    The text is cut where llama.cpp cuts it, at special-token text, except inside ``plain``
    pieces (control-token text typed in a message). A stretch between two cuts that holds a
    plain piece is tokenized with special tokens off, as one stretch: the typed text becomes
    the ordinary tokens it would be anywhere, with no break and no extra SentencePiece space
    around it.
    """
    ids: list[int] = []
    stretch = _Stretch(ids, tokenize)
    for piece in pieces:
        if piece.plain:
            stretch.add(piece.text, plain=True)
            continue
        if specials.cut is None:
            stretch.add(piece.text)
            continue
        pos = 0
        for match in specials.cut.finditer(piece.text):
            token = match.group()
            if stretch.eats(token, piece.text[pos : match.start()]):
                continue  # whitespace an rstrip token removes before llama.cpp would cut it
            stretch.add(piece.text[pos : match.start()])
            stretch.close(strip_end=token in specials.lstrip)
            ids.extend(tokenize(token, True))
            stretch.strip_after = len(token.encode()) if token in specials.rstrip else 0
            pos = match.end()
        stretch.add(piece.text[pos:])
    stretch.close(strip_end=False)
    return ids


class _Stretch:
    """The text between two special tokens, gathered across pieces, tokenized when it closes."""

    def __init__(self, ids: list[int], tokenize: Callable[[str, bool], Sequence[int]]) -> None:
        self.ids, self.tokenize = ids, tokenize
        self.parts: list[str] = []
        self.plain = False
        # Byte length of the special token before it when that token eats the whitespace after
        # it (rstrip), else 0.
        self.strip_after = 0

    def eats(self, token: str, before: str) -> bool:
        """Whether ``token``, a whitespace special token at the start of this stretch, is eaten
        by the rstrip token before it: llama.cpp cuts at longer tokens first, so whitespace
        tokens shorter than the rstrip token are still plain whitespace when it strips."""
        return (
            self.strip_after > len(token.encode())
            and not token.strip(_C_SPACE)
            and not ("".join(self.parts) + before).strip(_C_SPACE)
        )

    def add(self, text: str, plain: bool = False) -> None:
        self.parts.append(text)
        self.plain = self.plain or plain

    def close(self, strip_end: bool) -> None:
        text = "".join(self.parts)
        if self.strip_after:
            text = text.lstrip(_C_SPACE)
        if strip_end:  # the special token after it eats whitespace (lstrip)
            text = text.rstrip(_C_SPACE)
        if text:
            self.ids.extend(self.tokenize(text, not self.plain))
        self.parts, self.plain, self.strip_after = [], False, 0
