"""Chat templates: from messages to the prompt text the model reads.

Three rules shape this module:

* Render exactly what transformers' ``apply_chat_template(messages, tokenize=False,
  add_generation_prompt=True)`` renders for the same template, BOS/EOS and messages: the text a
  model was trained on. The Jinja environment mirrors transformers' own
  (``localbot.template_sandbox``), and message text reaches the template unchanged, so templates
  that trim content or strip ``<think>`` sections from past replies work as their authors meant.
* Content stays content. Control-token text a user types (``<end_of_turn>``) is wrapped in two
  Unicode noncharacters before rendering (transformers' own ``sanitize_control_tokens`` does the
  same with private-use ones), so the rendered prompt splits into *pieces*: text to tokenize with
  special tokens parsed, and typed control-token text to tokenize as plain text. Only the
  template can start or end a turn.
* Nothing is dropped and nothing crashes a turn that can be rendered another way. A template
  without a system role gets the system text merged into the first user turn (llama.cpp's own
  Gemma handling does the same); a template that insists on alternating user/assistant turns
  gets consecutive same-role messages merged; an empty message list is never rendered (most
  templates read ``messages[0]``); rendering is bounded in time and size.

Which template a model gets (its own, a built-in, ``chat_format``) is ``localbot.template_choice``;
the built-ins are in ``localbot.builtin_templates``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from localbot.builtin_templates import BUILTIN_TEMPLATES, NO_SYSTEM_ROLE
from localbot.errors import ConfigError, TemplateError
from localbot.template_sandbox import TemplateLimitError, compile_template, render

log = logging.getLogger(__name__)

MARK_START = "\ufdd0"
MARK_END = "\ufdd1"
"""Around control-token text typed in a message. Noncharacters: Unicode reserves them for a
program's internal use, so no text a user means to send contains them (they are removed from
message text, as transformers removes its own markers)."""

DEFAULT_MAX_CHARS = 1 << 20
"""Characters a render may produce beyond four times its messages' text: plenty for any real
template's markup. Pass ``max_chars_for_context(n_ctx)`` to tie it to the context window."""

DEFAULT_SECONDS = 2.0
"""Wall-clock allowance of one render of a short history: real templates take milliseconds."""

_PROBE = "localbot system prompt probe 7f3a"


def max_chars_for_context(n_ctx: int) -> int:
    """A render allowance for a context of ``n_ctx`` tokens: eight contexts' worth at ~4
    characters a token (the messages' own text is allowed on top, see ``ChatTemplate``)."""
    return 32 * max(n_ctx, 1)


@dataclass(frozen=True)
class Piece:
    """A run of the rendered prompt. ``plain=False``: template markup and message text, to be
    tokenized the way llama.cpp tokenizes a whole prompt (special tokens parsed).
    ``plain=True``: control-token text typed in a message, to be tokenized as plain text."""

    text: str
    plain: bool = False


class ChatTemplate:
    """A Jinja chat template, compiled once, that renders message lists into ``Piece`` lists.

    ``origin`` says where the template came from ("from the GGUF", "built-in chatml for
    architecture llama", "--chat-format"): error messages name it, and the front ends show it.
    ``max_chars`` and ``seconds`` bound each render (see ``localbot.template_sandbox``).
    """

    def __init__(
        self,
        source: str,
        name: str,
        bos_token: str = "",
        eos_token: str = "",
        *,
        origin: str = "",
        max_chars: int = DEFAULT_MAX_CHARS,
        seconds: float = DEFAULT_SECONDS,
    ) -> None:
        self.source, self.name, self.origin = source, name, origin
        self.bos_token, self.eos_token = bos_token, eos_token
        self.max_chars, self.seconds = max_chars, seconds
        if MARK_START in source or MARK_END in source:
            raise TemplateError(
                f"{self.label} contains U+FDD0/U+FDD1, characters localbot reserves for marking "
                "message text; use another template (--chat-format)"
            )
        self._template = self._compile()
        self.supports_system = name not in NO_SYSTEM_ROLE and self._probe_system_role()

    @classmethod
    def builtin(
        cls,
        name: str,
        bos_token: str = "",
        eos_token: str = "",
        *,
        origin: str = "",
        max_chars: int = DEFAULT_MAX_CHARS,
        seconds: float = DEFAULT_SECONDS,
    ) -> ChatTemplate:
        if name not in BUILTIN_TEMPLATES:
            known = ", ".join(sorted(BUILTIN_TEMPLATES))
            raise ConfigError(f"unknown chat format {name!r}; choose one of: {known}")
        return cls(
            BUILTIN_TEMPLATES[name],
            name,
            bos_token,
            eos_token,
            origin=origin or f"built-in {name}",
            max_chars=max_chars,
            seconds=seconds,
        )

    @property
    def label(self) -> str:
        """How error messages name this template: ``chat template 'gguf' (from the GGUF)``."""
        return f"chat template {self.name!r}" + (f" ({self.origin})" if self.origin else "")

    def _compile(self):
        try:
            return compile_template(self.source)
        except RecursionError as err:
            raise TemplateError(f"{self.label} does not compile: it nests too deeply") from err
        except Exception as err:  # TemplateSyntaxError, and whatever else Jinja's parser raises
            line = getattr(err, "lineno", None)
            where = f" (line {line})" if line else ""
            raise TemplateError(f"{self.label} does not compile: {_one_line(err)}{where}") from err

    # ----------------------------------------------------------------- rendering
    def render(
        self,
        messages: Sequence[dict[str, str]],
        add_generation_prompt: bool = True,
        *,
        control_tokens: Collection[str] = (),
        **extra: Any,
    ) -> str:
        """The prompt text for ``messages`` ({role, content} dicts): what transformers renders
        (after the merges described in the module docstring, when the template needed them)."""
        pieces = self.pieces(
            messages, add_generation_prompt, control_tokens=control_tokens, **extra
        )
        return "".join(p.text for p in pieces)

    def pieces(
        self,
        messages: Sequence[dict[str, str]],
        add_generation_prompt: bool = True,
        *,
        control_tokens: Collection[str] = (),
        **extra: Any,
    ) -> list[Piece]:
        """Render ``messages`` into pieces. ``control_tokens``: the control-token texts of the
        vocabulary that occur in the messages (``localbot.prompt_tokens`` finds them, in every
        string of :func:`texts_in`); they stay plain text. An empty list renders to no pieces:
        there is nothing to evaluate.

        Keys of a message besides role and content (``tool_calls``, ``tool_call_id``, ``name``)
        reach the template as they are, and ``extra`` are more template variables (``tools``,
        see ``localbot.tools``); control-token text in any of their strings stays text too."""
        if not messages:
            return []
        turns = [dict(m) for m in messages]
        if not self.supports_system:
            turns = merge_system(turns)
        markers = _markers(frozenset(control_tokens))
        marked = [
            {k: v if k == "role" else _mark_all(v, markers.mark) for k, v in m.items()}
            for m in turns
        ]
        variables = {k: _mark_all(v, markers.mark) for k, v in extra.items()}
        text = self._render_with_fallbacks(marked, add_generation_prompt, variables)
        pieces = markers.split_pieces(text)
        if not any(p.text for p in pieces):
            raise TemplateError(
                f"{self.label} rendered nothing for {len(turns)} message(s); "
                "use another template (--chat-format)"
            )
        return pieces

    def _render_with_fallbacks(
        self, turns: list[dict[str, Any]], generation: bool, extra: dict[str, Any]
    ) -> str:
        # The template as it is first; then, if it raised, the history reshaped the way strict
        # templates want it: consecutive same-role turns merged (Mistral, Gemma insist on
        # user/assistant alternation), then system text merged too.
        attempts = [turns]
        alternating = merge_consecutive(turns)
        if alternating != turns:
            attempts.append(alternating)
        if any(m["role"] == "system" for m in turns):
            attempts.append(merge_consecutive(merge_system(turns)))
        first_error: Exception | None = None
        for attempt in attempts:
            try:
                return self._render(attempt, generation, extra)
            except TemplateError:
                raise
            except Exception as err:  # raise_exception(), or a template bug on this history
                first_error = first_error or err
        raise TemplateError(f"{self.label} failed to render: {_one_line(first_error)}") from (
            first_error
        )

    def _render(
        self, turns: list[dict[str, Any]], generation: bool, extra: dict[str, Any] | None = None
    ) -> str:
        # The variables transformers passes: messages, tools, documents, add_generation_prompt
        # and the tokenizer's special tokens (``extra`` gives tools).
        context: dict[str, Any] = {
            "messages": [dict(m) for m in turns],
            "tools": None,
            "documents": None,
            "add_generation_prompt": generation,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            **(extra or {}),
        }
        # Tool calls and tool definitions are text the template may show, as messages are.
        chars = self.max_chars + 4 * sum(len(t) for t in texts_in(turns, extra or {}))
        # Some real templates look back over the history for every message (Gemma 4's: 0.5 s
        # for 600 messages here): the time allowance grows with the square of the history.
        seconds = self.seconds * (1 + (len(turns) / 500) ** 2)
        try:
            return render(self._template, context, chars, seconds)
        except TemplateLimitError as err:
            raise TemplateError(
                f"{self.label} was stopped: {err}; the template is broken or hostile "
                "(use another with --chat-format)"
            ) from err
        except (RecursionError, MemoryError) as err:
            raise TemplateError(f"{self.label} was stopped: it recursed or grew too far") from err

    def _probe_system_role(self) -> bool:
        """Whether system text shows up in the output (templates without a system role raise,
        or silently leave it out)."""
        probe = [{"role": "system", "content": _PROBE}, {"role": "user", "content": "hi"}]
        try:
            return _PROBE in self._render(probe, True)
        except TemplateError:
            raise  # stopped by a bound: the template would fail every turn
        except Exception:  # a template that rejects the system role by raising
            return False


@dataclass(frozen=True)
class _Markers:
    find: re.Pattern[str] | None
    """Control-token text in a message (None: there is none)."""
    split: re.Pattern[str]
    """A marked control token (group 1) or a lone marker, in the rendered text."""

    def mark(self, text: str) -> str:
        text = text.replace(MARK_START, "").replace(MARK_END, "")
        if self.find is None:
            return text
        return self.find.sub(lambda m: f"{MARK_START}{m.group()}{MARK_END}", text)

    def split_pieces(self, text: str) -> list[Piece]:
        """Cut a marked render into pieces; markers vanish. A lone marker (a template cut a
        marked token apart) leaves an empty plain piece: the text around it, up to the template's
        next special token, is tokenized as plain text, so the halves cannot join into a token."""
        pieces: list[Piece] = []
        pos = 0
        for match in self.split.finditer(text):
            if match.start() > pos:
                pieces.append(Piece(text[pos : match.start()]))
            token = match.group(1) if self.find is not None else None
            pieces.append(Piece(token or "", plain=True))
            pos = match.end()
        if pos < len(text):
            pieces.append(Piece(text[pos:]))
        return pieces


@lru_cache(maxsize=64)
def _markers(control_tokens: frozenset[str]) -> _Markers:
    # Longest first, so a token wins over the tokens it contains.
    tokens = sorted((t for t in control_tokens if t), key=len, reverse=True)
    if not tokens:
        return _Markers(None, re.compile(f"[{MARK_START}{MARK_END}]"))
    alternatives = "|".join(map(re.escape, tokens))
    split = re.compile(f"{MARK_START}({alternatives}){MARK_END}|[{MARK_START}{MARK_END}]")
    return _Markers(re.compile(alternatives), split)


def _mark_all(value: Any, mark: Callable[[str], str]) -> Any:
    """``value`` with ``mark`` applied to every string in it (dict keys too)."""
    if isinstance(value, str):
        return mark(value)
    if isinstance(value, dict):
        return {_mark_all(k, mark): _mark_all(v, mark) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_mark_all(v, mark) for v in value]
    return value


def texts_in(messages: Sequence[dict[str, Any]], extra: dict[str, Any]) -> list[str]:
    """Every string a render of ``messages`` with variables ``extra`` may show: message content,
    tool-call names and arguments, tool definitions (give them to ``controls_in``)."""
    found: list[str] = []
    _mark_all([[v for k, v in m.items() if k != "role"] for m in messages], found.append)
    _mark_all(list(extra.values()), found.append)
    return found


def _one_line(err: BaseException | None) -> str:
    message = getattr(err, "message", None) or str(err) or type(err).__name__
    return " ".join(str(message).split())[:300]


def merge_system(messages: Sequence[dict[str, str]]) -> list[dict[str, str]]:
    """Fold system messages into the first user turn (or make them one) for templates without
    a system role. Nothing is dropped."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system" and m["content"])
    rest = [m for m in messages if m["role"] != "system"]
    if not system:
        return rest
    for i, m in enumerate(rest):
        if m["role"] == "user":
            merged = f"{system}\n\n{m['content']}" if m["content"] else system
            return [*rest[:i], {**m, "content": merged}, *rest[i + 1 :]]
    return [{"role": "user", "content": system}, *rest]


def merge_consecutive(messages: Sequence[dict[str, str]]) -> list[dict[str, str]]:
    """Join runs of same-role messages into one (texts separated by a blank line), for templates
    that raise unless user and assistant turns alternate."""
    merged: list[dict[str, str]] = []
    for m in messages:
        if merged and merged[-1]["role"] == m["role"]:
            previous = merged[-1]["content"]
            joined = (
                f"{previous}\n\n{m['content']}"
                if previous and m["content"]
                else (previous or m["content"])
            )
            merged[-1] = {**merged[-1], "content": joined}
        else:
            merged.append(dict(m))
    return merged
