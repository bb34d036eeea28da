"""A fresh OS process that resumes a session: restore its saved KV state, then answer one turn.

    kv_resume.py SPEC_JSON

SPEC_JSON is a file holding ``{"model_path", "n_ctx", "max_tokens", "threads", "state",
"messages"}`` (``threads``: ``n_threads`` and ``n_threads_batch``, optional)
(``messages`` as ``messages_to_dict`` entries; ``state`` null to skip the restore and read the
whole prompt, for timing comparisons). Prints one JSON line: the reply, how many tokens were
restored and read from the cache, and the timings (restore, time to first token, model load).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from langchain_core.messages import messages_from_dict

from localbot import ChatLlamaCpp
from localbot.kv_state import restore_state


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    model = ChatLlamaCpp(
        model_path=spec["model_path"],
        n_ctx=spec["n_ctx"],
        temperature=0,
        max_tokens=spec["max_tokens"],
        n_threads=spec.get("threads", {}).get("n_threads"),
        model_kwargs={k: v for k, v in spec.get("threads", {}).items() if k != "n_threads"},
    )
    messages = messages_from_dict(spec["messages"])
    start = time.perf_counter()
    model.load()
    loaded = time.perf_counter()
    restored = 0
    if spec.get("state"):
        restored = restore_state(model, Path(spec["state"]), model.prompt_ids(messages))
    restore_s = time.perf_counter() - loaded
    reply = model.invoke(messages)
    usage = reply.usage_metadata or {}
    print(
        json.dumps(
            {
                "reply": reply.content,
                "restored": restored,
                "cache_read": usage.get("input_token_details", {}).get("cache_read"),
                "input_tokens": usage.get("input_tokens"),
                "load_s": loaded - start,
                "restore_s": restore_s,
                "ttft_s": reply.response_metadata["timings"]["time_to_first_token_s"],
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main(sys.argv[1])
