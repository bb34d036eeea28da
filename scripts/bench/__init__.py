"""Benchmark: localbot's chatbot against a straightforward llama-cpp-python chatbot.

    python scripts/bench.py                 # 40-turn conversation on the test model
    python scripts/bench.py --quick         # 8 turns, n_ctx 512: a smoke run (at n_ctx 512
                                            # a turn adds about one trim step, so localbot
                                            # re-reads often: the targets are for the defaults)
    python scripts/bench.py --restart       # first turn of a resumed session in a new process
    python scripts/bench.py --think 5       # the user pauses 5 s between a reply and the next
                                            # message: localbot's background work runs then
    python scripts/bench.py --no-prepare    # no background work (compare the replies digest)
    python scripts/bench.py --context-shift # localbot shifts the cache at a cut (approximate)
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
  messages, session writes (the reply's, and any wait for the user's message, which is written
  while the prompt is read), the KV-state restore check, the chat model's work around
  ``generate`` (template, tokenizing, callbacks), and the rest. ``own_s`` is the turn's time
  outside the model call; work localbot does on its other thread meanwhile (writing the
  user's message, building the likely prompt) is not in it, waiting for that work is.
* localbot's own ``TurnStats`` (``stats_*``) are recorded too.

Between turns the simulated user reads and types for ``--think`` seconds (default 0). localbot's
background work runs then (``Chatbot.prepare``: evaluating the start of the next prompt; saving
the KV state when due); when the next message arrives the work stops at the end of its current
chunk, and that wait is added to the next turn's TTFT. Raw llama-cpp-python has no background
work: its turns run after localbot's has stopped, so the two never compete for the CPU. Per turn:
``bg_evaluated`` / ``bg_s`` (prompt tokens read in the background before the turn, and the time
it took), ``kv_bytes`` (KV-state bytes written since the previous turn), ``state_bytes`` (the
state's size after the turn: what saving after every turn would write) and ``session_bytes``
(the session file written twice per turn). At the end the session is closed as at exit, which
saves what is not on disk. ``localbot replies sha256`` digests every reply: a ``--no-prepare``
run must print the same one.

"Trimming starts" is, per system, the first turn whose prompt dropped any history. The table
gives medians (and the 90th percentile and worst TTFT) before and from that turn on, totals, and
the ratio localbot/raw. ``ttft.png`` plots TTFT per turn for both with a dashed line where each
starts trimming, and below it the prompt tokens each evaluated per turn, with green bars for the
tokens localbot read in the background before the turn.

The restart scenario (``--restart``, ``bench.restart``)
-------------------------------------------------------
localbot builds two sessions in this process, without background work (so the saved state is the
last turn's, as when the user quits right after a reply): **same-cut**, ~1,500 prompt tokens,
whose next question keeps the history's cut; **moved-cut**, built until the next question moves
the cut (the kept history then starts at a new message, and no saved state covers it). The same
new ~100-token question is then asked of a copy of each, after a ``--think`` pause (the user
typing), by: this warm process (localbot, the reference, prepared the same way), and new
processes: localbot opening the session as the REPL does (``Chatbot.prepare``: restore the saved
KV state, read the next prompt's start in the background), localbot with ``kv_cache=False``, and
raw llama-cpp-python (the last two re-read the whole history). localbot trusts a state file only
if it is the very file it wrote (a copy is another inode), so this process writes each resumed
copy's state itself, right after building the session. TTFT is measured from the question (after
the model is loaded and the pause). Repeated ``--repeats`` times with different questions;
medians are shown.

Timings depend on the machine's load: the output says how much CPU other processes used during the
run (``bench.machine``). Rerun on a quiet machine before trusting small differences.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # this checkout's localbot, not another installed copy
