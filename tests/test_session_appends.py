"""An append to a session file this process wrote splices the new messages into its bytes
instead of encoding the whole history again; the bytes are exactly what a full encode gives,
and a file written by anything else is re-encoded whole."""

from __future__ import annotations

import json
from pathlib import Path

from langchain_core.messages import AIMessage, HumanMessage, messages_to_dict
from test_sessions import file_chat_message_history

from localbot import session_file
from localbot.session_file import encode_exactly
from localbot.sessions import SessionStore

TURNS = [
    HumanMessage("hi, I'm Todd"),
    AIMessage("Hello Todd! ✨", response_metadata={"finish_reason": "stop"}),
    HumanMessage('quotes " and \\ backslashes, a tab\tand\nnewlines'),
    AIMessage(
        "日本語も大丈夫", usage_metadata={"input_tokens": 3, "output_tokens": 4, "total_tokens": 7}
    ),
]


def _full_encode(messages: list) -> bytes:
    return encode_exactly(messages_to_dict(messages))[0]


def test_appended_bytes_equal_a_full_encode(tmp_path: Path, monkeypatch) -> None:
    expected = [_full_encode(TURNS[: n + 1]) for n in range(len(TURNS))]
    history = SessionStore(tmp_path).get("s")
    encoded: list[int] = []
    lines = session_file._encode_lines
    monkeypatch.setattr(session_file, "_encode_lines", lambda e: encoded.append(len(e)) or lines(e))
    written = []
    for message in TURNS:
        history.add_messages([message])
        written.append((tmp_path / "s.json").read_bytes())
    assert written == expected
    assert encoded == [1, 1, 1, 1]  # each write encoded its one new message, never the history


def test_a_file_written_by_langchain_is_re_encoded_whole(tmp_path: Path) -> None:
    file_chat_message_history(tmp_path / "s.json").add_messages(TURNS[:2])  # one JSON line
    history = SessionStore(tmp_path).get("s")
    assert len(history.messages) == 2  # read and decoded, but not ours: no splice into them
    history.add_messages(TURNS[2:])
    assert (tmp_path / "s.json").read_bytes() == _full_encode(TURNS)


def test_a_file_edited_after_our_write_is_re_encoded_whole(tmp_path: Path) -> None:
    history = SessionStore(tmp_path).get("s")
    history.add_messages(TURNS[:2])
    path = tmp_path / "s.json"
    entries = json.loads(path.read_bytes())
    entries[0]["data"]["content"] = "edited"
    path.write_text(json.dumps(entries))  # another program, another layout
    history.add_messages(TURNS[2:])
    assert [m.text for m in history.messages] == ["edited", *(m.text for m in TURNS[1:])]
    assert path.read_bytes() == _full_encode([HumanMessage("edited"), *TURNS[1:]])


def test_text_that_needs_repair_is_encoded_whole_and_read_back(tmp_path: Path) -> None:
    history = SessionStore(tmp_path).get("s")
    history.add_messages(TURNS[:2])
    history.add_messages([AIMessage("half an emoji \ud83d")])
    history.add_messages([HumanMessage("next")])
    assert [m.text for m in history.messages][-2:] == ["half an emoji \ufffd", "next"]
    assert json.loads((tmp_path / "s.json").read_bytes())[-1]["data"]["content"] == "next"


def test_a_reply_goes_right_after_its_question_when_another_writer_came_between(
    tmp_path: Path,
) -> None:
    mine = SessionStore(tmp_path).get("s")
    theirs = SessionStore(tmp_path).get("s")  # another process on the same session
    question = HumanMessage("mine?", id="q-1")
    mine.add_messages([question])
    theirs.add_messages([HumanMessage("theirs?")])
    mine.add_messages_after([AIMessage("my answer")], after_id="q-1")
    assert [m.text for m in theirs.messages] == ["mine?", "my answer", "theirs?"]
    assert (tmp_path / "s.json").read_bytes() == _full_encode(mine.messages)


def test_a_reply_whose_question_is_last_or_gone_is_appended(tmp_path: Path) -> None:
    history = SessionStore(tmp_path).get("s")
    history.add_messages([HumanMessage("q", id="q-1")])
    history.add_messages_after([AIMessage("a")], after_id="q-1")
    history.add_messages_after([AIMessage("b")], after_id="not there")
    history.add_messages_after([AIMessage("c")], after_id=None)
    assert [m.text for m in history.messages] == ["q", "a", "b", "c"]
    assert (tmp_path / "s.json").read_bytes() == _full_encode(history.messages)
