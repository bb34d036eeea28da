"""``python -m localbot`` and the ``localbot`` command: ``serve`` starts the server
(``localbot.server.command``), anything else is the chat (``localbot.cli``)."""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if args[:1] == ["serve"]:
        from localbot.server.command import main as serve

        return serve(args[1:])
    from localbot.cli import main as chat

    return chat(args)


if __name__ == "__main__":
    raise SystemExit(main())
