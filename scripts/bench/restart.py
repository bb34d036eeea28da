"""The restart scenario: the first turn of a resumed session, answered by this warm process and by
new processes (localbot restoring its saved KV state, localbot without it, raw llama-cpp-python);
see the package docstring."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from langchain_core.messages import HumanMessage

from bench import REPO, report
from bench.localbot_chat import LocalbotChat, load_localbot_model, make_localbot
from bench.machine import CpuMeter, describe_setup
from bench.raw import RawBot, load_raw
from bench.settings import SESSION_ID, Settings, make_user_messages, token_counter
from bench.timing import GenerateProbe
from localbot.chat_model import ChatLlamaCpp
from localbot.kv_files import remove_state
from localbot.kv_state import save_state
from localbot.sessions import SessionStore

RESTART_MODES = {
    "localbot-kv": "resumed: new process, localbot restoring its saved KV state",
    "localbot-nokv": "baseline: new process, localbot kv_cache=False (re-reads all)",
    "raw": "baseline: new process, raw llama-cpp-python (re-reads all)",
}
LABELS = {"warm": "warm: same process, localbot (reference)", **RESTART_MODES}


def build_session(
    s: Settings,
    model: ChatLlamaCpp,
    probe: GenerateProbe,
    sessions: Path,
    texts: Iterator[str],
    question: str,
    move_cut: bool,
) -> int:
    """Chat with localbot until the session's history is ``s.session_tokens`` long (``move_cut``
    False: ``question`` then keeps the history's cut) or until ``question`` would move the cut
    (``move_cut``). Built without background work: the saved state is the last turn's, as when
    the user quits right after a reply."""
    bot = make_localbot(model, sessions, replace(s, prepare=False))
    chat = LocalbotChat(bot, probe, SESSION_ID)
    history = bot.store.get(SESSION_ID)
    while True:
        messages = history.messages
        if move_cut and messages:
            if bot.plan({}, [*messages, HumanMessage(question)]).start != bot.last_turn.trim_start:
                break
        elif not move_cut and model.get_num_tokens_from_messages(messages) >= s.session_tokens:
            break
        row = chat.turn(next(texts))
        if row["dropped"] and not move_cut:
            raise SystemExit("the session was trimmed while being built: raise --ctx")
    bot.wait_for_saves()
    return model.get_num_tokens_from_messages(history.messages)


def copy_session(base: Path, dest: Path, state_from: ChatLlamaCpp | None = None) -> Path:
    """A copy of the session's messages, without its KV state; with ``state_from``, plus the state
    that model holds now, written by this process. (localbot trusts only the very state file it
    wrote: a copied one is another inode, and is rightly refused.)"""
    shutil.copytree(base, dest)
    path = SessionStore(dest).kv_state_path(SESSION_ID)
    remove_state(path)
    if state_from is not None and save_state(state_from, path) is None:
        raise SystemExit(f"could not save the KV state to {path}")
    return dest


def run_child(mode: str, s: Settings, sessions: Path, question: str) -> dict[str, Any]:
    spec = {"mode": mode, "settings": s.to_json(), "sessions": str(sessions), "question": question}
    spec_path = sessions.with_name(sessions.name + ".spec.json")  # not inside the store
    spec_path.write_text(json.dumps(spec))
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench.py"), "--_child", str(spec_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"the {mode} child process failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def child_main(spec_path: str) -> None:
    """A new process: load the model, open the session, answer one question, print JSON."""
    spec = json.loads(Path(spec_path).read_text())
    s = Settings.from_json(spec["settings"])
    sessions, mode, question = Path(spec["sessions"]), spec["mode"], spec["question"]
    started = time.perf_counter()
    if mode == "raw":
        # localbot's model object only picks the template (from a vocabulary-only load).
        llama, formatter, _ = load_raw(s, load_localbot_model(s, load=False))
        loaded = time.perf_counter()
        bot = RawBot(llama, formatter, s)
        # Reading the history file is part of the raw turn, as it is of localbot's.
        start = time.perf_counter()
        bot.load_history(SessionStore(sessions).get(SESSION_ID).messages)
        read_s = time.perf_counter() - start
        row = bot.turn(question)
        row["ttft_s"] += read_s
        row["turn_s"] += read_s
    else:
        model = load_localbot_model(s)
        loaded = time.perf_counter()
        lb = make_localbot(model, sessions, s, kv_cache=mode == "localbot-kv")
        chat = LocalbotChat(lb, GenerateProbe(model.load()), SESSION_ID)
        if mode == "localbot-kv":
            lb.prepare(SESSION_ID)  # what the REPL does when it opens the session
            chat.pause(s.think)  # the user types their question
        row = chat.turn(question)
    row.update(mode=mode, load_s=loaded - started)
    row.pop("reply", None)
    print(json.dumps(row), flush=True)


VARIANTS = {
    "same-cut": "the question keeps the history's cut (no trimming yet)",
    "moved-cut": "the question moves the history's cut (the kept history is new)",
}


def run_restart(s: Settings) -> None:
    meter = CpuMeter()
    model = load_localbot_model(s)
    header = describe_setup(s, model, None)
    header.append(
        f"scenario: restart; sessions built with localbot (~{s.user_tokens}-token messages, "
        f"replies <= {s.max_tokens} tokens), then one more ~{s.user_tokens}-token question "
        f"after a {s.think:g} s pause (the user typing); {s.repeats} repeats with different "
        "questions; two sessions: " + "; ".join(f"{k}: {v}" for k, v in VARIANTS.items())
    )
    print("\n".join(header), flush=True)
    probe = GenerateProbe(model.load())
    n_build = 2 * s.ctx // s.user_tokens + 10
    texts = make_user_messages(
        n_build + s.repeats, s.user_tokens, token_counter(model.load()), s.seed
    )
    questions = texts[n_build:]
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="localbot-bench-restart-") as tmp:
        for variant in VARIANTS:
            base = Path(tmp) / variant / "base"
            base.parent.mkdir()
            tokens = build_session(
                s, model, probe, base, iter(texts[:n_build]), questions[0], variant == "moved-cut"
            )
            state = SessionStore(base).kv_state_path(SESSION_ID)
            state_mb = state.stat().st_size / 1e6 if state.exists() else 0.0
            print(
                f"{variant}: session built, {tokens} prompt tokens, KV state {state_mb:.1f} MB",
                flush=True,
            )
            results += _resume(s, model, probe, base, questions, variant)
    report_restart(s, results, meter)


def _resume(
    s: Settings,
    model: ChatLlamaCpp,
    probe: GenerateProbe,
    base: Path,
    questions: list[str],
    variant: str,
) -> list[dict[str, Any]]:
    """Ask each question of a copy of the session, in new processes and in this warm one."""
    folder = base.parent
    # Each resumed copy's state is written now, while the model holds the built session.
    resumed = [
        copy_session(base, folder / f"localbot-kv-{rep}", state_from=model)
        for rep in range(1, s.repeats + 1)
    ]
    results: list[dict[str, Any]] = []
    for rep, question in enumerate(questions, 1):
        for mode in RESTART_MODES:
            copy = resumed[rep - 1] if mode == "localbot-kv" else None
            copy = copy or copy_session(base, folder / f"{mode}-{rep}")
            row = run_child(mode, s, copy, question)
            results.append({"variant": variant, "repeat": rep, **row})
        copy = copy_session(base, folder / f"warm-{rep}")
        warm_bot = make_localbot(model, copy, s)
        chat = LocalbotChat(warm_bot, probe, SESSION_ID)
        warm_bot.prepare(SESSION_ID)  # as after the warm process's own last turn
        chat.pause(s.think)
        row = chat.turn(question)
        warm_bot.wait_for_saves()
        row.update(mode="warm", load_s=None)
        row.pop("reply", None)
        results.append({"variant": variant, "repeat": rep, **row})
        done = ", ".join(f"{r['mode']} {r['ttft_s']:.2f} s" for r in results[-4:])
        print(f"{variant} repeat {rep}/{s.repeats}: {done}", file=sys.stderr, flush=True)
    return results


def report_restart(s: Settings, results: list[dict[str, Any]], meter: CpuMeter) -> None:
    lines = []
    for variant, label in VARIANTS.items():
        rows = [r for r in results if r["variant"] == variant]
        by_mode = {m: [r for r in rows if r["mode"] == m] for m in LABELS}
        print()
        print(f"{variant}: {label}")
        print(report.restart_table(LABELS, by_mode))
        warm = report.median([r["ttft_s"] for r in by_mode["warm"]])
        resumed = report.median([r["ttft_s"] for r in by_mode["localbot-kv"]])
        ok = resumed is not None and warm is not None and resumed <= 1.5 * warm
        lines.append(
            f"- {variant}: resumed TTFT <= 1.5x a warm turn's: {report.ratio(resumed, warm)}x "
            f"-> {report.verdict(ok)}"
        )
    print()
    print(f"Targets (with a {s.think:g} s pause before the question; the issue's: 5 s):")
    print("\n".join(lines))
    print()
    print(
        f"Notes: medians of {s.repeats} repeats. TTFT runs from the question (after the model is"
        " loaded and"
    )
    print(
        "  the pause) to the first reply text: reading the session, the KV-state restore if the"
        " pause"
    )
    print(
        "  did not do it, and the prompt not yet read. The resumed process opens the session as the"
    )
    print(
        "  REPL does (Chatbot.prepare: restore the saved state, read the next prompt's start in the"
    )
    print("  background); the warm one had the same pause.")
    print(meter.disturbance())
    s.out.mkdir(parents=True, exist_ok=True)
    path = s.out / "restart.csv"
    report.write_csv(path, results, ["variant", *report.RESTART_COLUMNS])
    print()
    print(f"per-run data: {path}")
