"""How a streamed reply reaches the terminal: as plain text, or as Markdown rendered by ``rich``.

Re-rendering the whole reply on every token (what a naive ``rich.live.Live`` does) gets slower as
the reply grows and, once the reply is taller than the screen, leaves copies of it in the
scrollback. Here only the block being written (the current paragraph, list or code block) is live;
each finished block is printed once, above it, and never redrawn. A code block taller than the
screen is closed and reopened (same language) rather than letting the live area outgrow it.
"""

from __future__ import annotations

import re
from typing import Protocol, TextIO

_FENCE = re.compile(r"^\s{0,3}(`{3,}|~{3,})(.*)$")


class ReplyView(Protocol):
    def write(self, text: str) -> None: ...

    def finish(self, note: str = "") -> None:
        """The reply is over; ``note`` (e.g. " [interrupted]") goes after it."""


class PlainView:
    """The reply's text as it comes, unchanged (pipes, ``--plain``, dumb terminals)."""

    def __init__(self, out: TextIO) -> None:
        self.out = out

    def write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def finish(self, note: str = "") -> None:
        self.out.write(note + "\n")
        self.out.flush()


def fence_marker(fence_line: str) -> str:
    """The run of backticks or tildes that opens (and so closes) a code fence."""
    match = _FENCE.match(fence_line)
    return match.group(1) if match else "```"


def split_finished(text: str) -> tuple[str, str, str]:
    """Split Markdown into (finished blocks, the block still being written, the fence that the
    unfinished part is inside, or "").

    A block is finished at a blank line outside a code fence, or at the line closing a fence.
    """
    fence = ""
    cut = 0
    pos = 0
    for line in text.splitlines(keepends=True):
        pos += len(line)
        if not line.endswith("\n"):
            break  # the last line is still being written
        match = _FENCE.match(line.rstrip("\n"))
        if fence:
            closes = match and match.group(1).startswith(fence_marker(fence))
            if closes and not match.group(2).strip():
                fence, cut = "", pos
        elif match:
            fence = line.rstrip("\n")
        elif not line.strip():
            cut = pos
    return text[:cut], text[cut:], fence


class MarkdownView:
    """Renders the reply as Markdown while it streams (code highlighted)."""

    def __init__(self, console) -> None:
        from rich.live import Live

        self.console = console
        self.pending = ""
        self.live = Live(
            console=console,
            auto_refresh=True,
            refresh_per_second=12,
            transient=True,
            vertical_overflow="crop",
        )
        self.live.start()

    def _markdown(self, text: str):
        from rich.markdown import Markdown

        return Markdown(text, code_theme="monokai")

    def write(self, text: str) -> None:
        self.pending += text
        done, self.pending, fence = split_finished(self.pending)
        if not done and self.pending.count("\n") > max(4, self.console.height - 4):
            # Taller than the screen: close it here and carry on in a fresh block.
            done, self.pending = self.pending, ""
            if fence:
                done += fence_marker(fence) + "\n"
                self.pending = fence.lstrip() + "\n"
        if done.strip():
            self.console.print(self._markdown(done))
        self.live.update(self._markdown(self.pending))

    def finish(self, note: str = "") -> None:
        self.live.update("")
        self.live.stop()
        if self.pending.strip():
            self.console.print(self._markdown(self.pending))
        self.pending = ""
        if note:
            from rich.text import Text

            self.console.print(Text(note.strip(), style="dim"))


def make_view(out: TextIO, markdown: bool) -> ReplyView:
    """A Markdown view when asked for and ``out`` is a terminal, else plain text."""
    if markdown and out.isatty():
        try:
            from rich.console import Console
        except ImportError:  # pragma: no cover - rich is a dependency
            return PlainView(out)
        console = Console(file=out, highlight=False, soft_wrap=False)
        if console.is_terminal and not console.is_dumb_terminal:
            return MarkdownView(console)
    return PlainView(out)
