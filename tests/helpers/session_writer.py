"""A separate OS process that writes to a session, for the durability tests.

    session_writer.py append ROOT SESSION TAG COUNT   # wait for "go" on stdin, then append
                                                      # COUNT messages "TAG-0".. one call each
    session_writer.py forker ROOT SESSION SIZE        # on each "fork" line, fork a writer that
                                                      # appends numbered turns until killed and
                                                      # print its pid; on "reap", print how it died

Both print "ready" once their imports are done, so the parent can time what follows. The forker
spares each kill trial the second of importing LangChain: its children start writing at once.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage

from localbot.sessions import SessionStore


def grown_message(index: int, size: int) -> BaseMessage:
    """Message ``index`` of a grown session: even ones from the human, odd from the AI."""
    content = f"{index}:" + "ü✓x" * size
    return HumanMessage(content) if index % 2 == 0 else AIMessage(content)


def append(root: str, session_id: str, tag: str, count: int) -> None:
    history = SessionStore(root).get(session_id)
    print("ready", flush=True)
    sys.stdin.readline()  # "go": both writers start together
    for i in range(count):
        history.add_message(HumanMessage(f"{tag}-{i}"))
    print("done", flush=True)


def grow(root: str, session_id: str, size: int) -> None:
    """Append turns (two messages per ``add_messages`` call) forever, continuing the session."""
    history = SessionStore(root).get(session_id)
    index = len(history.messages)
    while True:
        history.add_messages([grown_message(index, size), grown_message(index + 1, size)])
        index += 2


def forker(root: str, session_id: str, size: int) -> None:
    print("ready", flush=True)
    pid = 0
    for line in sys.stdin:
        if line.strip() == "fork":
            pid = os.fork()
            if pid == 0:  # the writer: never returns to this loop
                try:
                    grow(root, session_id, size)
                finally:
                    os._exit(1)
            print(pid, flush=True)
        elif line.strip() == "reap":
            print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)


if __name__ == "__main__":
    mode, root, session_id, *rest = sys.argv[1:]
    if mode == "append":
        append(root, session_id, rest[0], int(rest[1]))
    else:
        forker(root, session_id, int(rest[0]))
