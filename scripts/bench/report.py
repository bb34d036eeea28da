"""Summaries, the tables and targets printed, and the files written (CSV, plot)."""

from __future__ import annotations

import csv
import hashlib
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.localbot_chat import STEP_COLUMNS

CSV_COLUMNS = [
    "turn",
    "system",
    "dropped",
    "prompt_tokens",
    "reused_tokens",
    "evaluated_tokens",
    "llama_p_eval",
    "ttft_s",
    "first_token_s",
    "model_ttft_s",
    "gen_tokens",
    "gen_s",
    "gen_tps",
    "caller_ms_per_token",
    "model_s",
    "turn_s",
    "overhead_s",
    "overhead_pct",
    "stats_cached_tokens",
    "stats_ttft_s",
    "stats_gen_tps",
    "stats_finish_reason",
    *STEP_COLUMNS,
    "own_s",
    "chatbot_total_s",
    "kv_restored",
    "bg_evaluated",
    "bg_s",
    "bg_stop_wait_s",
    "kv_save_s",
    "kv_bytes",
    "state_bytes",
    "session_bytes",
    "reply_chars",
]
RESTART_COLUMNS = [
    "repeat",
    "mode",
    "ttft_s",
    "model_ttft_s",
    "prompt_tokens",
    "reused_tokens",
    "evaluated_tokens",
    "llama_p_eval",
    "kv_restored",
    "load_s",
    "gen_tps",
    "turn_s",
    "overhead_s",
    *STEP_COLUMNS,
    "own_s",
]
_STEP_LABELS = {
    "trim_s": "trim (plan)",
    "session_read_s": "session read",
    "prompt_s": "prompt messages (system prompt, variables)",
    "session_write_s": "session writes (the reply; the message's, past the prompt read)",
    "kv_restore_s": "KV-state restore check",
    "adapter_s": "chat model around generate (template, tokens)",
    "between_s": "between steps (starting the background work)",
    "other_s": "other (input checks, chain callbacks)",
    "overhead_s": "total overhead",
    "own_s": "localbot's own time in the turn (outside the model call)",
    "bg_stop_wait_s": "waiting for background work to stop (in TTFT)",
    "bg_s": "background: reading the next prompt (between turns)",
    "kv_save_s": "background: KV-state saves (between turns, when due)",
}


# ------------------------------------------------------------------------------- numbers


def median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (nearest rank) of ``values``."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def ratio(a: Any, b: Any) -> str:
    return f"{a / b:.2f}" if isinstance(a, int | float) and isinstance(b, int | float) and b else ""


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("HOLDS" if ok else "MISSED")


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians before/after trimming starts, and totals, for one system's rows."""
    trim_turn = next((r["turn"] for r in rows if r["dropped"] > 0), None)
    before = [r for r in rows if trim_turn is None or r["turn"] < trim_turn]
    after = [r for r in rows if trim_turn is not None and r["turn"] >= trim_turn]
    ttft_before = median([r["ttft_s"] for r in before])
    ttft_after = median([r["ttft_s"] for r in after])
    return {
        "trim_turn": trim_turn,
        "turns_before": len(before),
        "turns_after": len(after),
        "ttft_before": ttft_before,
        "ttft_after": ttft_after,
        "ttft_ratio": ttft_after / ttft_before if ttft_after and ttft_before else None,
        "ttft_max_after": max((r["ttft_s"] for r in after), default=None),
        "ttft_p90_after": percentile([r["ttft_s"] for r in after], 90),
        "ttft_worst_vs_before": (
            max(r["ttft_s"] for r in after) / ttft_before if after and ttft_before else None
        ),
        "prompt_total": sum(r["prompt_tokens"] for r in rows),
        "evaluated_total": sum(r["evaluated_tokens"] for r in rows),
        "background_total": sum(r.get("bg_evaluated", 0) for r in rows),
        "reused_total": sum(r["reused_tokens"] for r in rows),
        "llama_p_eval_total": sum(r["llama_p_eval"] for r in rows),
        "gen_tps": median([r["gen_tps"] for r in rows]),
        "caller_ms": median([r["caller_ms_per_token"] for r in rows]),
        "overhead_s": median([r["overhead_s"] for r in rows]),
        "overhead_pct": median([r["overhead_pct"] for r in rows]),
        "overhead_pct_max": max(r["overhead_pct"] for r in rows),
        "wall_total": sum(r["turn_s"] for r in rows),
    }


# ------------------------------------------------------------------------------- tables


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in rows)])


def conversation_table(raw: dict[str, Any], lb: dict[str, Any]) -> str:
    rows_spec = [
        ("trimming starts at turn", "trim_turn", 0),
        ("turns before / from then on", None, 0),
        ("median TTFT before trimming (s)", "ttft_before", 3),
        ("median TTFT after trimming starts (s)", "ttft_after", 3),
        ("  ratio after/before", "ttft_ratio", 2),
        ("  90th percentile TTFT after trimming starts (s)", "ttft_p90_after", 3),
        ("  worst TTFT after trimming starts (s)", "ttft_max_after", 3),
        ("  worst after / median before", "ttft_worst_vs_before", 2),
        ("total prompt tokens", "prompt_total", 0),
        ("total prompt tokens evaluated in turns", "evaluated_total", 0),
        ("  + evaluated in the background, between turns", "background_total", 0),
        ("total prompt tokens reused from cache", "reused_total", 0),
        ("  llama.cpp batch-decoded prompt tokens", "llama_p_eval_total", 0),
        ("median generation tokens/s", "gen_tps", 1),
        ("  median ms per token spent outside generate", "caller_ms", 3),
        ("median per-turn overhead (s)", "overhead_s", 4),
        ("median per-turn overhead (% of turn)", "overhead_pct", 2),
        ("  worst per-turn overhead (% of turn)", "overhead_pct_max", 2),
        ("total turn wall time (s)", "wall_total", 1),
    ]
    rows = []
    for label, key, digits in rows_spec:
        if key is None:
            cells = [f"{s['turns_before']} / {s['turns_after']}" for s in (raw, lb)]
            rows.append([label, *cells, ""])
            continue
        a, b = raw[key], lb[key]
        versus = ratio(b, a) if key != "trim_turn" else ""
        rows.append([label, fmt(a, digits), fmt(b, digits), versus])
    return markdown_table(["metric", "raw", "localbot", "localbot/raw"], rows)


def localbot_breakdown(rows: list[dict[str, Any]]) -> str:
    """Median and worst milliseconds per turn of localbot's own steps (its ``TurnTimings``)."""
    body = []
    for key, label in _STEP_LABELS.items():
        values = [r[key] for r in rows if r.get(key) is not None]
        if not values:
            body.append([label, "n/a", "n/a"])
            continue
        body.append([label, f"{1000 * median(values):.1f}", f"{1000 * max(values):.1f}"])
    return markdown_table(["localbot step", "median ms", "max ms"], body)


def disk_summary(rows: list[dict[str, Any]], exit_bytes: int) -> dict[str, Any]:
    """What localbot wrote to disk over the conversation: KV states (when due, and at exit)
    against saving after every turn (the state's size after each turn), and session files."""
    kv = sum(r["kv_bytes"] for r in rows) + exit_bytes
    every_turn = sum(r["state_bytes"] for r in rows)
    turns = len(rows)
    saves = sum(1 for r in rows if r["kv_bytes"]) + bool(exit_bytes)
    return {
        "kv_bytes": kv,
        "kv_saves": saves,
        "exit_bytes": exit_bytes,
        "every_turn_bytes": every_turn,
        "kv_ratio": kv / every_turn if every_turn else None,
        "session_bytes": sum(r["session_bytes"] for r in rows),
        "turns": turns,
        "own_ms": 1000 * (median([r["own_s"] for r in rows]) or 0.0),
        "bg_evaluated": sum(r["bg_evaluated"] for r in rows),
    }


def disk_table(disk: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    turns = max(1, disk["turns"])
    mb = 1e6
    body = [
        [
            "KV states written (MB), when due + at exit",
            f"{disk['kv_bytes'] / mb:.1f}",
            f"{disk['kv_bytes'] / turns / mb:.2f}",
            f"{disk['kv_saves']} saves",
        ],
        [
            "  saving after every turn would write (MB)",
            f"{disk['every_turn_bytes'] / mb:.1f}",
            f"{disk['every_turn_bytes'] / turns / mb:.2f}",
            f"{turns} saves",
        ],
        [
            "session file writes (MB; rewritten whole, twice a turn)",
            f"{disk['session_bytes'] / mb:.2f}",
            f"{disk['session_bytes'] / turns / mb:.3f}",
            "",
        ],
        [
            "prompt tokens read in the background, between turns",
            str(disk["bg_evaluated"]),
            f"{disk['bg_evaluated'] / turns:.0f}",
            f"{sum(1 for r in rows if r['bg_evaluated'])} turns",
        ],
    ]
    return markdown_table(["localbot between turns", "total", "per turn", ""], body)


def conversation_targets(
    raw: dict[str, Any], lb: dict[str, Any], disk: dict[str, Any]
) -> list[str]:
    tt = lb["ttft_ratio"]
    worst = lb["ttft_worst_vs_before"]
    ev = lb["evaluated_total"] / raw["evaluated_total"] if raw["evaluated_total"] else None
    gen = lb["gen_tps"] / raw["gen_tps"] if lb["gen_tps"] and raw["gen_tps"] else None
    ov = lb["overhead_pct"]
    kv = disk["kv_ratio"]
    own = disk["own_ms"]
    return [
        f"- localbot worst TTFT after trimming <= 2x the median before (with --think 5): "
        f"{fmt(worst)}x -> {verdict(None if worst is None else worst <= 2)}",
        f"- localbot median TTFT after/before trimming <= 1.5: {fmt(tt)} -> "
        f"{verdict(None if tt is None else tt <= 1.5)}",
        f"- localbot evaluated prompt tokens <= 1/3 of raw's: {fmt(ev, 3)} of raw's -> "
        f"{verdict(None if ev is None else ev <= 1 / 3)}",
        f"- generation tokens/s within 5% of raw: localbot/raw {fmt(gen, 3)} -> "
        f"{verdict(None if gen is None else gen >= 0.95)}",
        f"- localbot per-turn overhead < 5% of the turn: median {fmt(ov)}% "
        f"(worst {fmt(lb['overhead_pct_max'])}%) -> {verdict(ov < 5)}",
        f"- KV-state bytes written <= 1/4 of saving after every turn: {fmt(kv, 3)} -> "
        f"{verdict(None if kv is None else kv <= 0.25)}",
        f"- localbot's own time per turn <= 5 ms median: {own:.1f} ms -> {verdict(own <= 5)}",
    ]


def replies_digest(rows: list[dict[str, Any]]) -> str:
    """A short hash of every reply in order: equal digests, identical conversations."""
    digest = hashlib.sha256("\x00".join(r["reply"] for r in rows).encode()).hexdigest()
    return digest[:16]


def first_divergence(raw_rows: list[dict[str, Any]], lb_rows: list[dict[str, Any]]) -> str:
    for r, b in zip(raw_rows, lb_rows, strict=True):
        if r["reply"] != b["reply"]:
            return f"replies identical through turn {r['turn'] - 1}, differ from turn {r['turn']}"
    return "replies identical on every turn"


def restart_table(labels: dict[str, str], by_mode: dict[str, list[dict[str, Any]]]) -> str:
    """One row per way of answering the resumed session's first question (medians)."""
    warm = median([r["ttft_s"] for r in by_mode["warm"]])
    rows = []
    for mode, label in labels.items():
        rs = by_mode[mode]
        ttft = median([r["ttft_s"] for r in rs])
        rows.append(
            [
                label,
                fmt(ttft, 3),
                fmt(median([r["prompt_tokens"] for r in rs]), 0),
                fmt(median([r["reused_tokens"] for r in rs]), 0),
                fmt(median([r["evaluated_tokens"] for r in rs]), 0),
                fmt(median([r.get("kv_restore_s") for r in rs]), 3),
                fmt(median([r.get("load_s") for r in rs]), 2),
                ratio(ttft, warm),
            ]
        )
    header = ["first turn of the session", "TTFT s", "prompt", "reused", "evaluated"]
    return markdown_table([*header, "KV restore s", "model load s", "TTFT/warm"], rows)


# ------------------------------------------------------------------------------- files


def write_csv(path: Path, rows: list[dict[str, Any]], columns: Sequence[str]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {k: (f"{v:.5f}" if isinstance(v, float) else v) for k, v in row.items()}
            )


def plot_ttft(path: Path, by_system: dict[str, list[dict[str, Any]]], title: str) -> bool:
    """TTFT per turn (top) and prompt tokens evaluated per turn (below); False without
    matplotlib (an optional extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is missing (pip install matplotlib, or the [bench] extra): no plot")
        return False
    colors = {"raw": "tab:red", "localbot": "tab:blue"}
    styles = {"raw": "--", "localbot": ":"}
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7), sharex=True, height_ratios=[2, 1])
    for system, rows in by_system.items():
        turns = [r["turn"] for r in rows]
        color = colors.get(system)
        top.plot(turns, [r["ttft_s"] for r in rows], "o-", ms=3, color=color, label=system)
        bottom.plot(turns, [r["evaluated_tokens"] for r in rows], "o-", ms=3, color=color)
        if any(r.get("bg_evaluated") for r in rows):
            bottom.bar(
                turns,
                [r.get("bg_evaluated", 0) for r in rows],
                width=0.6,
                color="tab:green",
                alpha=0.4,
                label=f"{system}: read in the background before the turn",
            )
            bottom.legend(loc="upper left", fontsize=8)
        trim_turn = summarize(rows)["trim_turn"]
        if trim_turn is not None:
            style = {"color": color, "ls": styles.get(system, "--"), "lw": 1.2}
            top.axvline(trim_turn, label=f"{system} starts trimming (turn {trim_turn})", **style)
            bottom.axvline(trim_turn, **style)
    top.set_ylabel("time to first token (s)")
    top.set_title(title, fontsize=9)
    top.legend(loc="upper left")
    top.grid(alpha=0.3)
    bottom.set_ylabel("prompt tokens evaluated")
    bottom.set_xlabel("turn")
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
