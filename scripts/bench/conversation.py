"""The conversation scenario: one scripted conversation played through raw llama-cpp-python and
localbot in this process, turn by turn and interleaved (see the package docstring)."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench import report
from bench.localbot_chat import LocalbotChat, load_localbot_model, make_localbot
from bench.machine import CpuMeter, cpu_model, describe_setup
from bench.raw import RawBot, load_raw
from bench.settings import SESSION_ID, Settings, make_user_messages, token_counter
from bench.timing import GenerateProbe, warm_up

Rows = dict[str, list[dict[str, Any]]]


def run_conversation(s: Settings) -> None:
    meter = CpuMeter()
    model = load_localbot_model(s)
    llama, formatter, raw_desc = load_raw(s, model)
    header = describe_setup(s, model, raw_desc)
    header.append(
        f"scenario: {s.turns} turns, user messages ~{s.user_tokens} tokens, replies <= "
        f"{s.max_tokens} tokens, localbot trim watermark {s.watermark}, no system prompt, "
        f"localbot kv_cache on; the user pauses {s.think:g} s between a reply and the next "
        f"message; localbot background work {'on' if s.prepare else 'off'}"
        f"{', context shift ON (approximate)' if s.context_shift else ''}"
    )
    print("\n".join(header), flush=True)
    warm_up(llama)
    warm_up(model.load())
    messages = make_user_messages(s.turns, s.user_tokens, token_counter(llama), s.seed)
    raw = RawBot(llama, formatter, s)
    with tempfile.TemporaryDirectory(prefix="localbot-bench-") as tmp:
        bot = make_localbot(model, Path(tmp), s)
        lb = LocalbotChat(bot, GenerateProbe(model.load()), SESSION_ID)
        rows: Rows = {"raw": [], "localbot": []}
        for turn, text in enumerate(messages, 1):
            if turn > 1:
                lb.pause(s.think)  # the user reads the reply and types the next message
            for system in (raw, lb):
                row = system.turn(text)
                row["turn"] = turn
                row["reply_chars"] = len(row["reply"])
                rows[system.name].append(row)
            progress(turn, s.turns, rows["raw"][-1], rows["localbot"][-1])
        exit_bytes = lb.finish()
    report_conversation(s, rows, meter, exit_bytes)


def progress(turn: int, turns: int, r: dict[str, Any], b: dict[str, Any]) -> None:
    print(
        f"turn {turn:>3}/{turns}: TTFT raw {r['ttft_s']:6.2f} s "
        f"({r['evaluated_tokens']:>4} of {r['prompt_tokens']:>4} evaluated) | "
        f"localbot {b['ttft_s']:6.2f} s ({b['evaluated_tokens']:>4} of "
        f"{b['prompt_tokens']:>4})",
        file=sys.stderr,
        flush=True,
    )


def report_conversation(s: Settings, rows: Rows, meter: CpuMeter, exit_bytes: int) -> None:
    raw, lb = report.summarize(rows["raw"]), report.summarize(rows["localbot"])
    disk = report.disk_summary(rows["localbot"], exit_bytes)
    print()
    print(report.conversation_table(raw, lb))
    print()
    print(report.localbot_breakdown(rows["localbot"]))
    print()
    print(report.disk_table(disk, rows["localbot"]))
    print()
    print("Targets:")
    print("\n".join(report.conversation_targets(raw, lb, disk)))
    print()
    divergence = report.first_divergence(rows["raw"], rows["localbot"])
    print(f"Notes: {divergence} (expected once trimming")
    print("  starts: the two trim differently). TTFT = turn start to first reply text; overhead =")
    print("  turn wall time minus time inside Llama.generate, split by localbot's own step")
    print("  timings. Background work (reading the next turn's prompt, saving the KV state) runs")
    print(f"  in the {s.think:g} s pause after each reply and is not in the turn's time, except")
    print("  the wait for its current chunk to end when the next message arrives.")
    print(f"  localbot replies sha256: {report.replies_digest(rows['localbot'])} (compare with a")
    print("  --no-prepare run: background work must not change a reply)")
    print(meter.disturbance())
    s.out.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = s.out / "turns.csv", s.out / "ttft.png"
    all_rows = sorted(rows["raw"] + rows["localbot"], key=lambda r: (r["turn"], r["system"]))
    report.write_csv(csv_path, all_rows, report.CSV_COLUMNS)
    print()
    print(f"per-turn data: {csv_path}")
    title = (
        f"{s.model.name}, n_ctx {s.ctx}, {s.turns} turns of ~{s.user_tokens} tokens, replies <= "
        f"{s.max_tokens}, watermark {s.watermark}, pause {s.think:g} s"
        f"{', context shift' if s.context_shift else ''}; {cpu_model()}, {os.cpu_count()} cores"
    )
    if report.plot_ttft(png_path, rows, title):
        print(
            f"plot: {png_path} (TTFT per turn, raw red, localbot blue, dashed lines where each "
            "starts trimming; below: prompt tokens evaluated per turn, and in green the tokens "
            "localbot read in the background before the turn)"
        )
