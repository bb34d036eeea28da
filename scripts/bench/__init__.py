"""Benchmark: localbot's chatbot against a straightforward llama-cpp-python chatbot.

    python scripts/bench.py                 # 40-turn conversation on the test model
    python scripts/bench.py --quick         # 8 turns, n_ctx 512: a smoke run (at n_ctx 512
                                            # a turn adds about one trim step, so localbot
                                            # re-reads often: the targets are for the defaults)
    python scripts/bench.py --restart       # first turn of a resumed session in a new process
    python scripts/bench.py --model X.gguf  # any GGUF

Nothing in localbot is wrapped or patched. localbot's step timings are the ones it records itself
(``Chatbot.last_turn``, a ``TurnTimings``; ``ChatLlamaCpp.last_stats``; the background KV save's
``SessionKvCache.last_save``). The one thing timed from outside is ``Llama.generate``, wrapped on
each ``Llama`` instance identically for both systems (``bench.timing``), so the model's share of
a turn is measured the same way for raw llama-cpp-python and for localbot.

The conversation scenario (``bench.conversation``)
--------------------------------------------------
One scripted conversation (default: 40 turns of ~100-token user messages built from a seeded word
list, replies capped at 48 tokens, n_ctx 2048, greedy decoding) is played through two chatbots in
this process, turn by turn and interleaved, so that a busy machine disturbs both alike. Each has
its own ``llama_cpp.Llama`` (same model file, n_ctx, n_batch, threads, GPU layers, seed and
``swa_full=True``, localbot's default, given to raw too for fairness):

* **raw** (``bench.raw``): ``Llama.create_chat_completion(stream=True)``, with the history trimmed
  to the newest user/assistant pairs whose rendered prompt fits (``prompt + max_tokens <= n_ctx``),
  counted with the same chat formatter and tokenizer the call uses. This is what a
  straightforward chatbot does.
* **localbot** (``bench.localbot_chat``): ``build_chatbot(ChatLlamaCpp(...), SessionStore(<temp
  dir>), None, kv_cache=True)`` streamed with ``bot.stream``; its history lives on disk.

Both get identical user messages. Their replies are identical while their prompts are; once
trimming starts the two histories differ (different trimming rules), and so do later replies.

Per turn and system (``turns.csv``):

* ``ttft_s``: time to first token, from the start of the turn (before trimming) to the first
  reply text the caller receives: what the user waits for.
* ``prompt_tokens``, ``reused_tokens``, ``evaluated_tokens``: the prompt given to
  ``Llama.generate`` and how much of it llama-cpp-python keeps from the KV cache
  (``localbot.llama_cache.reusable_tokens``, its own rule, computed when ``generate`` starts).
  ``llama_p_eval`` is llama.cpp's own count of prompt tokens decoded in batches (its perf
  counters), as a cross-check.
* ``gen_tps``: (tokens sampled - 1) / (time of the last token - time of the first), timed around
  ``Llama.generate`` identically for both systems.
* ``overhead_s`` / ``overhead_pct``: the turn's wall time minus the time spent inside
  ``Llama.generate`` (prompt evaluation + generation): everything the chatbot itself does. For
  localbot it is broken down with its own ``TurnTimings``: session read, trim plan, prompt
  messages, session writes, the KV-state restore check, the chat model's work around
  ``generate`` (template, tokenizing, callbacks), and the rest.
* localbot's own ``TurnStats`` (``stats_*``) are recorded too.

localbot saves the KV state in a background thread after each turn; the benchmark waits for it
between turns (as a user reading the reply would give it time) and reports its duration and size
(``kv_save_s``, ``kv_save_bytes``, from ``SessionKvCache.last_save``), outside the turn's time.

"Trimming starts" is, per system, the first turn whose prompt dropped any history. The table
gives medians before and from that turn on, totals, and the ratio localbot/raw. ``ttft.png``
plots TTFT per turn for both with a dashed line where each starts trimming, and the prompt
tokens each evaluated per turn below it.

The restart scenario (``--restart``, ``bench.restart``)
-------------------------------------------------------
localbot builds a session of ~1,500 prompt tokens in this process, then the same new ~100-token
question is asked of a copy of that session by: this warm process (localbot, the reference), and
new processes: localbot restoring a saved KV state, localbot with ``kv_cache=False``, and raw
llama-cpp-python (the last two re-read the whole history). localbot trusts a state file only if
it is the very file it wrote (a copy is another inode), so this process writes each resumed
copy's state itself, right after building the session. TTFT is measured after the model is
loaded (load time is shown apart). Repeated ``--repeats`` times with different questions; medians
are shown.

Timings depend on the machine's load: the output says how much CPU other processes used during the
run (``bench.machine``). Rerun on a quiet machine before trusting small differences.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # this checkout's localbot, not another installed copy
