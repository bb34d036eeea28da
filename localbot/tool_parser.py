"""Reading a reply that may hold tool calls, whole or as it streams (see ``localbot.tool_format``).

The grammar has already made sure a reply is either text that does not begin the way calls begin,
or calls in the format; the parser only has to find the name, the id and the argument JSON of each
call. It works on any cut of the text (one character at a time gives the same calls), holds back
what might still turn out to be a call, and reports arguments as they arrive, so streaming can
yield ``tool_call_chunks``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from localbot.tool_format import ARGS, ID, NAME, SLOTS, CallFormat, new_call_id

__all__ = ["CallParser", "Event", "ParsedCall", "parse_reply"]


@dataclass
class ParsedCall:
    name: str = ""
    args: str = ""
    id: str = ""
    complete: bool = False
    announced: bool = False


@dataclass(frozen=True)
class Event:
    """What :class:`CallParser` found: "text" (reply text), "call" (call ``index`` has its
    name and id), "args" (more argument JSON of call ``index``)."""

    kind: str
    text: str = ""
    index: int = 0
    call: ParsedCall | None = None


@dataclass
class CallParser:
    """Reads a reply as it streams: plain text, or calls in ``fmt``. The grammar guarantees the
    shape; ``mode`` ends "text" or "done", or "broken" when the reply was cut off (max_tokens)."""

    fmt: CallFormat
    mode: str = "undecided"  # then "text", "calls", "done" or "broken"
    calls: list[ParsedCall] = field(default_factory=list)
    _buffer: str = ""
    _part: int = 0
    _depth: int = 0
    _in_string: bool = False
    _escape: bool = False

    def feed(self, text: str) -> list[Event]:
        if self.mode == "text":
            return [Event("text", text)] if text else []
        self._buffer += text
        if self.mode == "undecided":
            if self._buffer.startswith(self.fmt.start):
                self.mode = "calls"
                self._buffer = self._buffer[len(self.fmt.start) :]
                self.calls.append(ParsedCall())
            elif self.fmt.start.startswith(self._buffer):
                return []
            else:
                self.mode = "text"
                out, self._buffer = self._buffer, ""
                return [Event("text", out)]
        events: list[Event] = []
        if self.mode == "calls":
            self._advance(events, final=False)
        return events

    def finish(self) -> list[Event]:
        """The reply ended: flush what was held back."""
        events: list[Event] = []
        if self.mode == "undecided":
            self.mode = "text"
            if self._buffer:
                events.append(Event("text", self._buffer))
        elif self.mode == "calls":
            self._advance(events, final=True)
            if self.mode != "done":
                self.mode = "broken"
        self._buffer = ""
        return events

    def _advance(self, events: list[Event], final: bool) -> None:
        unit = self.fmt.unit
        while self.mode == "calls":
            call = self.calls[-1]
            if self._part == len(unit):
                if not self._next_call(final):
                    return
                continue
            part = unit[self._part]
            if part == ARGS:
                done = self._read_args(call, events)
            elif part in (NAME, ID):
                done = self._read_value(part, call)
            else:
                done = self._read_literal(part)
            if not done:
                return
            self._part += 1
            self._announce(call, events)

    def _read_literal(self, literal: str) -> bool:
        if self._buffer.startswith(literal):
            self._buffer = self._buffer[len(literal) :]
            return True
        if not literal.startswith(self._buffer):
            self.mode = "broken"
        return False

    def _read_value(self, slot: str, call: ParsedCall) -> bool:
        unit = self.fmt.unit
        following = unit[self._part + 1] if self._part + 1 < len(unit) else None
        if slot == ID and (following is None or following in SLOTS):
            cut = 9 if len(self._buffer) >= 9 else -1  # ids are nine letters and digits
        elif following is None or following in SLOTS:
            self.mode = "broken"  # not a format learn_format produces
            return False
        else:
            cut = self._buffer.find(following)
        if cut < 0:
            return False
        value, self._buffer = self._buffer[:cut], self._buffer[cut:]
        if slot == NAME:
            call.name = value
        else:
            call.id = value
        return True

    def _announce(self, call: ParsedCall, events: list[Event]) -> None:
        """Announce a call once its name (and id, if the format has one) are known."""
        unit = self.fmt.unit
        if call.announced or any(unit.index(p) >= self._part for p in (NAME, ID) if p in unit):
            return
        call.id = call.id or new_call_id()
        call.announced = True
        events.append(Event("call", index=len(self.calls) - 1, call=call))
        if call.args:
            events.append(Event("args", call.args, index=len(self.calls) - 1))

    def _read_args(self, call: ParsedCall, events: list[Event]) -> bool:
        """Consume argument JSON up to the end of the object; True when it is complete."""
        taken, done = 0, False
        if not call.args:
            stripped = self._buffer.lstrip()
            self._buffer = stripped
        for i, ch in enumerate(self._buffer):
            taken = i + 1
            if self._in_string:
                self._string_char(ch)
            elif ch == '"':
                self._in_string = True
            elif ch in "{[":
                self._depth += 1
            elif ch in "}]":
                self._depth -= 1
                if self._depth == 0:
                    done = True
                    break
        piece, self._buffer = self._buffer[:taken], self._buffer[taken:]
        if piece:
            call.args += piece
            if call.announced:
                events.append(Event("args", piece, index=len(self.calls) - 1))
        return done

    def _string_char(self, ch: str) -> None:
        """One character inside a JSON string: only an unescaped quote ends it."""
        if self._escape:
            self._escape = False
        elif ch == "\\":
            self._escape = True
        elif ch == '"':
            self._in_string = False

    def _next_call(self, final: bool) -> bool:
        """After a call: another one, or the end. True when another call begins."""
        self.calls[-1].complete = True
        fmt = self.fmt
        again = fmt.between if fmt.between is not None else fmt.end + fmt.start
        if self._buffer.startswith(again):
            self._buffer = self._buffer[len(again) :]
            self._part = 0
            self.calls.append(ParsedCall())
            return True
        if final:
            self.mode = "done" if self._buffer.strip() == fmt.end.strip() else "broken"
        elif not (again.startswith(self._buffer) or fmt.end.startswith(self._buffer)
                  or self._buffer.startswith(fmt.end)):  # fmt: skip
            self.mode = "broken"
        return False


def parse_reply(fmt: CallFormat, text: str) -> tuple[str, CallParser]:
    """Parse a whole reply: (its text part, the parser with the calls)."""
    parser = CallParser(fmt)
    events = parser.feed(text) + parser.finish()
    return "".join(e.text for e in events if e.kind == "text"), parser
