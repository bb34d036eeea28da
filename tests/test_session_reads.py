"""A session file is read on every access (another process may have written it), but bytes this
process already decoded, or wrote itself, are not decoded again: a long session costs ~1 ms less
per read. A changed file is always decoded afresh."""

from __future__ import annotations

import json
from pathlib import Path

from langchain_core.messages import AIMessage, HumanMessage

from localbot import session_file
from localbot.sessions import SessionStore


def test_a_file_changed_by_another_program_is_decoded_again(tmp_path: Path) -> None:
    history = SessionStore(tmp_path).get("s")
    history.add_messages([HumanMessage("mine")])
    assert [m.text for m in history.messages] == ["mine"]
    path = tmp_path / "s.json"
    entries = json.loads(path.read_text())
    entries[0]["data"]["content"] = "edited"
    path.write_text(json.dumps(entries))
    assert [m.text for m in history.messages] == ["edited"]


def test_bytes_already_decoded_are_not_decoded_again(tmp_path: Path, monkeypatch) -> None:
    history = SessionStore(tmp_path).get("s")
    history.add_messages([HumanMessage("a"), AIMessage("b")])  # written, so known
    decoded: list[bytes] = []
    parse = session_file._parse
    monkeypatch.setattr(
        session_file, "_parse", lambda p, data: decoded.append(data) or parse(p, data)
    )
    assert [m.text for m in history.messages] == ["a", "b"]
    assert decoded == []


def test_reads_give_equal_but_separate_lists(tmp_path: Path) -> None:
    history = SessionStore(tmp_path).get("s")
    history.add_messages([HumanMessage("a"), AIMessage("b")])
    first, second = history.messages, history.messages
    assert first == second
    assert first is not second
    first.append(HumanMessage("not saved"))
    assert len(history.messages) == 2


def test_a_repaired_write_is_decoded_from_the_file(tmp_path: Path) -> None:
    """Text the file cannot hold as given (a lone surrogate) reads back as what was written."""
    history = SessionStore(tmp_path).get("s")
    history.add_messages([AIMessage("half an emoji \ud83d")])
    assert history.messages[0].text == "half an emoji \ufffd"
