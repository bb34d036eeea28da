"""The command line: ``python scripts/bench.py [--quick] [--restart] [--model X.gguf] ...``."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from bench import REPO
from bench.settings import DEFAULTS, QUICK, Settings, default_model


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, Settings]:
    p = argparse.ArgumentParser(
        prog="bench.py",
        description="Benchmark localbot's chatbot against raw llama-cpp-python "
        "(see scripts/bench/__init__.py for what is measured).",
    )
    p.add_argument("--model", type=Path, help="GGUF file (default: the Gemma 3 270M test model)")
    p.add_argument("--turns", type=int, help="conversation turns (default 40)")
    p.add_argument("--user-tokens", type=int, help="tokens per user message (default 100)")
    p.add_argument("--max-tokens", type=int, help="reply cap in tokens (default 48)")
    p.add_argument("--ctx", type=int, help="context window n_ctx (default 2048)")
    p.add_argument("--watermark", type=float, help="localbot trim watermark (default 0.6)")
    p.add_argument("--gpu-layers", type=int, help="layers to offload (default: localbot's)")
    p.add_argument("--threads", type=int, help="llama.cpp threads (default: llama.cpp's)")
    p.add_argument("--seed", type=int, default=1234, help="seed for messages and sampling")
    p.add_argument("--out", type=Path, default=REPO / "bench-out", help="output directory")
    p.add_argument("--restart", action="store_true", help="run the restart scenario instead")
    p.add_argument(
        "--session-tokens", type=int, help="--restart: session size in tokens (default 1500)"
    )
    p.add_argument("--repeats", type=int, help="--restart: repetitions (default 3)")
    p.add_argument("--quick", action="store_true", help="smoke run: 8 turns, n_ctx 512")
    p.add_argument(
        "--think",
        type=float,
        default=0.0,
        metavar="S",
        help="seconds the user pauses between a reply and the next message, during which "
        "localbot works in the background (default 0; realistic: 5-10)",
    )
    p.add_argument(
        "--no-prepare",
        action="store_true",
        help="localbot does no background work between turns (to compare replies)",
    )
    p.add_argument(
        "--context-shift",
        action="store_true",
        help="localbot shifts the KV cache at a cut instead of re-reading (approximate)",
    )
    p.add_argument("--_child", metavar="SPEC", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    chosen = {**DEFAULTS, **(QUICK if args.quick else {})}
    for name in chosen:
        if getattr(args, name) is not None:
            chosen[name] = getattr(args, name)
    settings = Settings(
        model=(args.model or default_model()).resolve(),
        gpu_layers=args.gpu_layers,
        threads=args.threads,
        seed=args.seed,
        out=args.out,
        think=args.think,
        prepare=not args.no_prepare,
        context_shift=args.context_shift,
        **chosen,
    )
    return args, settings


def main(argv: Sequence[str] | None = None) -> int:
    args, settings = parse_args(argv)
    # The scenarios import llama.cpp and localbot: only once the arguments are good.
    from bench import conversation, restart

    if args._child:
        restart.child_main(args._child)
    elif args.restart:
        restart.run_restart(settings)
    else:
        conversation.run_conversation(settings)
    return 0
