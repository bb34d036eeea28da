"""The download command: fetch a GGUF from the Hugging Face Hub into ``models/``, verify it,
record it; list the catalogue; re-hash what is recorded.

    python -m localbot.download NAME            # a catalogue model (see --list)
    python -m localbot.download REPO FILE       # any GGUF file on the Hub
    python -m localbot.download --list          # the catalogue, and what is downloaded
    python -m localbot.download --verify        # re-hash everything in manifest.json

The work is ``localbot.fetch`` (download, resume, verify, record) over ``localbot.hub`` (what the
Hub says about a file); this module parses the command line and prints.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from localbot.catalogue import CATALOGUE
from localbot.cli import OneLineParser
from localbot.errors import ConfigError, DownloadError, LocalbotError, ManifestError
from localbot.fetch import fetch, human_size, short_hash
from localbot.hub import brief, parse_spec
from localbot.manifest_file import (
    MANIFEST_NAME,
    ModelEntry,
    default_models_dir,
    load_manifest,
    verify_models,
)

__all__ = ["main", "render_list", "verify"]


def verify(models_dir: Path) -> int:
    """Re-hash every file in the manifest and print ok / changed / missing for each."""
    manifest = load_manifest(models_dir)
    if not manifest.path.is_file():
        raise ManifestError(
            f"No {MANIFEST_NAME} in {models_dir}, so nothing to verify: copy models/ together "
            "with its manifest.json, or download with python -m localbot.download NAME"
        )
    if not manifest.models:
        print(f"No models recorded in {manifest.path}")
        return 0
    bad = []
    for entry, status in verify_models(manifest):
        print(f"{status:<8} {entry.name:<20} {manifest.path_of(entry)}", flush=True)
        if status != "ok":
            bad.append(f"{entry.name} {status}")
    if bad:
        raise ManifestError(
            f"{len(bad)} of {len(manifest.models)} models failed verification ({', '.join(bad)}): "
            "download them again with python -m localbot.download NAME --force"
        )
    print(f"All {len(manifest.models)} models match {manifest.path}")
    return 0


def render_list(models_dir: Path) -> str:
    """The catalogue and any other recorded downloads, marking what is in ``models_dir``."""
    manifest = load_manifest(models_dir)
    by_file = {(e.repo, e.file): e for e in manifest.models.values()}

    def state(entry: ModelEntry | None) -> str:
        if entry is None:
            return ""
        return "downloaded" if manifest.path_of(entry).is_file() else "missing"

    rows = [("NAME", "SIZE", "STATUS", "LICENCE", "REPO FILE")]
    for c in CATALOGUE:
        recorded = by_file.get((c.repo, c.file))
        rows.append(
            (c.name, f"~{human_size(c.size)}", state(recorded), c.licence, f"{c.repo} {c.file}")
        )
    catalogued = {(c.repo, c.file) for c in CATALOGUE}
    for e in sorted(manifest.models.values(), key=lambda e: e.name):
        if (e.repo, e.file) not in catalogued:
            rows.append(
                (e.name, human_size(e.size), state(e), "see model card", f"{e.repo} {e.file}")
            )
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [
        "  ".join([*(cell.ljust(w) for cell, w in zip(row, widths, strict=False)), row[4]])
        for row in rows
    ]
    lines += [
        "",
        f"Models directory: {models_dir}",
        "Download one with: python -m localbot.download NAME  (or REPO FILE for any GGUF)",
    ]
    return "\n".join(line.rstrip() for line in lines)


EXIT_CODES = f"""exit codes:
  0    success (--verify: every model matches)
  1    other error (a file that cannot be written)
  {ConfigError.exit_code}    bad usage: unknown flag or model name, bad repo id or file name
  {ManifestError.exit_code}    models/manifest.json is corrupt, or --verify found a changed or
       missing model
  {DownloadError.exit_code}    the download failed: the Hub is unreachable or refuses, or the bytes
       do not match its hash
  130  interrupted (run the same command again to resume)
"""


def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="python -m localbot.download",
        description="Download a GGUF model from the Hugging Face Hub into models/, verify its "
        "sha256 against the Hub's, and record it in models/manifest.json.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "model",
        nargs="*",
        metavar="NAME | REPO FILE",
        help="a catalogue name (see --list), or a Hub repo id and a .gguf file in it",
    )
    p.add_argument(
        "--revision",
        help="branch, tag or commit (default: main); the commit it resolves to is recorded",
    )
    p.add_argument(
        "--dir",
        help="models directory (default: $LOCALBOT_MODELS_DIR, else models/ in a source "
        "checkout, else models/ in $LOCALBOT_HOME or the user data directory)",
    )
    p.add_argument(
        "--name", help="record it under this name (default: the catalogue name or file name)"
    )
    p.add_argument("--force", action="store_true", help="download again even if recorded")
    p.add_argument(
        "--default",
        action="store_true",
        dest="make_default",
        help="make it the model used when --model is not given",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--list", action="store_true", help="show the catalogue and the downloads")
    mode.add_argument(
        "--verify", action="store_true", help="re-hash every recorded model: ok/changed/missing"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # huggingface_hub 2.4 otherwise adds telemetry to its user agent and fetches
    # {HF_ENDPOINT}/api/agent-harnesses once a day; a local, offline chatbot has no use for it.
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    models_dir = Path(args.dir).expanduser() if args.dir else default_models_dir()
    try:
        if args.list or args.verify:
            if args.model:
                raise ConfigError("--list and --verify take no model")
            if args.list:
                print(render_list(models_dir))
                return 0
            return verify(models_dir)
        spec = parse_spec(args.model, name=args.name, revision=args.revision)
        entry, outcome = fetch(spec, models_dir, force=args.force)
        path = models_dir / entry.file
        if outcome == "present":
            print(f"{entry.name} is already downloaded: {path} (no network used)")
        else:
            verb = "Found" if outcome == "adopted" else "Downloaded"
            print(
                f"{verb} {entry.name}: {path} ({entry.size:,} bytes, sha256 "
                f"{short_hash(entry.sha256)} matches {entry.repo}@{entry.revision[:12]})"
            )
        if args.make_default:
            manifest = load_manifest(models_dir)
            manifest.default = entry.name
            manifest.save()
            print(f"{entry.name} is now the default model")
        return 0
    except LocalbotError as e:
        print(f"localbot: error: {brief(e)}", file=sys.stderr)
        return e.exit_code
    except OSError as e:  # a file that cannot be written after all (a full or read-only disk)
        where = f"{e.filename}: " if e.filename else ""
        print(f"localbot: error: {brief(f'{where}{e.strerror or e}')}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nlocalbot: interrupted: run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
