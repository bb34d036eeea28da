"""KV state across restarts: save llama.cpp's evaluated tokens and their KV cache next to a
session, and restore them when the session resumes, so a resumed session reads only its new message.

Files, for a session ``<id>``, in its sidecar folder ``<sessions>/.sidecars/<id>/``
(``SessionStore.kv_state_path``), so renaming or deleting the session takes them along:

* ``kvstate``: llama.cpp's own session file (``llama_state_save_file``: magic, version, token
  list, then the context state with the KV cache). Binary, never decoded by Python: it is only
  handed to ``llama_state_load_file``, and only when it is the very file we wrote (below).
* ``kvstate.meta``: JSON saying what the state belongs to (model file, context settings, chat
  template, the token list) and which file we wrote.

Trust: only our own files. After writing the state we fsync it, rename it into place and record
its size, inode, mtime and ctime (nanoseconds) in the meta; a restore opens the file (no links,
no FIFOs: ``O_NOFOLLOW | O_NONBLOCK``) and requires all four to match. Any write to the file after
ours moves its ctime, which no program can set back (``utime`` sets only atime and mtime), and a
copy or a replacement is another inode, so flipped bits with a "re-signed" meta, a state from
another machine, or a restored backup are all refused (the prompt is re-read once) in O(1),
without hashing: a 10 GB sparse file whose size matches is refused as fast as a 1 KB one.
Chosen over a keyed MAC because the MAC's key would sit, readable, in the same user's files: it
adds a file to manage and protects against nobody the stat check does not. What neither catches
is a same-user program that edits the state and then rewrites the meta with the new stat values;
such a program can edit the session history just as well. Bit rot that the file system does not
report is not detected either (no content hash: that was 55 s per start for 10 GB).

A state is restored only when everything it records matches the running model and the new prompt
shares a prefix with its tokens longer than what the model already holds in memory. Anything else
(a different model file, n_ctx, template or cache setting, another llama-cpp-python version, a
truncated or corrupt file, unreadable meta) is logged at DEBUG on ``localbot.kv_state`` and
ignored: the prompt is simply re-read. Restoring never changes a reply: the restored KV cache holds
bit-for-bit what the saving process had, and ``Llama.generate`` trims it to the common prefix
exactly as it does for a warm process.

Sliding-window attention (Gemma 2/3 and others): with ``swa_full=False`` llama.cpp keeps only the
last ``n_swa + n_ubatch`` positions of the sliding-window layers, and the state file holds only
those. Extending such a state is fine, but trimming it back further than the window reaches would
leave attention reading a window with holes (silently different output; llama.cpp's server
re-reads the whole prompt in that case). ``restore_state`` applies the server's test
(``pos_min <= usable - n_swa``) and refuses a restore that fails it. A warm process has the same
hazard (``Llama.generate`` does not check): ``llama_cache.drop_unsafe_cache`` is the same test
for a model about to generate. With ``swa_full=True`` (the default) every position is kept and any
prefix can be reused; the bit-for-bit claim above is tested there (with ``swa_full=False`` the
restored cells may sit in another order than in the saver's ring buffer, so sums can round
differently).
Recurrent and hybrid models cannot be trimmed at all: their state is restored only when the prompt
extends every saved token.

Disk use is bounded by :func:`prune_states` (least recently written states go first).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import logging
import os
import stat
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from localbot.atomic import (
    TEMP_MARKER,
    FileTypeError,
    forget_temp,
    fsync_directory,
    make_temp,
    read_file,
    write_atomic,
)
from localbot.llama_cache import (
    clear,
    common_prefix,
    context_handle,
    mark_logits_stale,
    reusable_tokens,
    usable,
    window_problem,
)
from localbot.paths import KV_META_FILE, KV_STATE_FILE, SIDECAR_ROOT

if TYPE_CHECKING:
    from localbot.chat_model import ChatLlamaCpp

log = logging.getLogger("localbot.kv_state")

__all__ = [
    "DEFAULT_MAX_TOTAL_BYTES",
    "meta_path",
    "prune_states",
    "remove_state",
    "restore_state",
    "save_state",
]

FORMAT = "localbot-kvstate"
FORMAT_VERSION = 2  # 2: the state file is trusted by its stat stamp, not a sha256
META_SUFFIX = ".meta"
DEFAULT_MAX_TOTAL_BYTES = 2 * 1024**3
"""Default disk budget for all saved states of one session store (see :func:`prune_states`)."""

_MAX_META_BYTES = 64 * 1024**2
_FINGERPRINT_BYTES = 1024**2
_STALE_TEMP_AGE_S = 60.0
_STAMP_KEYS = ("size", "inode", "mtime_ns", "ctime_ns")

# Context settings that change what the KV cache holds or how it is laid out.
_KV_CONTEXT_PARAMS = (
    "swa_full",
    "type_k",
    "type_v",
    "flash_attn_type",
    "rope_scaling_type",
    "rope_freq_base",
    "rope_freq_scale",
    "yarn_ext_factor",
    "yarn_attn_factor",
    "yarn_beta_fast",
    "yarn_beta_slow",
    "yarn_orig_ctx",
)

_fingerprints: dict[tuple[str, int, int, int], str] = {}


class _Rejected(Exception):
    """A saved state that must not be used; the message says why (logged at DEBUG)."""


# --------------------------------------------------------------------------- paths


def meta_path(path: Path | str) -> Path:
    """The metadata file of the state file ``path`` (``kvstate`` -> ``kvstate.meta``)."""
    path = Path(path)
    return path.with_name(path.name + META_SUFFIX)


def _write_target(fd: int, tmp: str) -> bytes:
    """The name llama.cpp should write the state through: the open temp file itself
    (``/proc/self/fd/N``) where the system has that. If the process is interrupted mid-save and
    removes its temp name (``atomic.remove_own_temps``), llama.cpp's ``fopen`` then cannot create
    the name again: it writes into the unlinked file, which goes when the process does."""
    through_fd = f"/proc/self/fd/{fd}"
    return os.fsencode(through_fd if os.path.exists(through_fd) else tmp)


def _stamp(st: os.stat_result) -> dict[str, int]:
    """What identifies the exact file we wrote: any later write moves ctime; a copy is another
    inode (see the module docstring)."""
    return {
        "size": st.st_size,
        "inode": st.st_ino,
        "mtime_ns": st.st_mtime_ns,
        "ctime_ns": st.st_ctime_ns,
    }


# --------------------------------------------------------------------------- identity


def _sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _model_identity(model_path: Path) -> dict[str, Any]:
    """Which model file this is: path, size, mtime and a hash of its first and last MiB."""
    resolved = Path(model_path).resolve()
    st = os.stat(resolved)
    key = (str(resolved), st.st_size, st.st_mtime_ns, st.st_ino)
    fingerprint = _fingerprints.get(key)
    if fingerprint is None:
        digest = hashlib.sha256()
        with open(resolved, "rb") as f:
            digest.update(f.read(_FINGERPRINT_BYTES))
            if st.st_size > _FINGERPRINT_BYTES:
                f.seek(max(_FINGERPRINT_BYTES, st.st_size - _FINGERPRINT_BYTES))
                digest.update(f.read(_FINGERPRINT_BYTES))
        fingerprint = _fingerprints[key] = digest.hexdigest()
    return {
        "path": str(resolved),
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "fingerprint_sha256": fingerprint,
    }


def _plain(value: Any) -> Any:
    """A JSON-safe form of a ctypes field or setting, stable across a JSON round trip."""
    if isinstance(value, bool | int | float | str) or value is None:
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return repr(value)


def _identity(model: ChatLlamaCpp, llama: Any) -> dict[str, Any]:
    """Everything a saved state must match to be valid for ``model`` (JSON-normalised)."""
    import llama_cpp

    params = llama.context_params
    template = model.template
    identity = {
        "llama_cpp_version": llama_cpp.__version__,
        "llama_session_version": int(getattr(llama_cpp, "LLAMA_SESSION_VERSION", 0)),
        "model": _model_identity(Path(model.gguf.path)),
        "n_ctx": int(llama.n_ctx()),
        "context": {name: _plain(getattr(params, name, None)) for name in _KV_CONTEXT_PARAMS},
        "lora": [
            _plain(getattr(llama, "lora_path", None)),
            _plain(getattr(llama, "lora_scale", None)),
        ],
        "kv_overrides_sha256": _sha256_hex(
            json.dumps(getattr(llama, "kv_overrides", None), sort_keys=True, default=repr).encode()
        ),
        "template": {"name": template.name, "sha256": _sha256_hex(template.source.encode())},
    }
    return json.loads(json.dumps(identity))


def _tokens_sha256(tokens: Sequence[int]) -> str:
    return _sha256_hex(json.dumps(list(tokens), separators=(",", ":")).encode())


def save_state(model: ChatLlamaCpp, path: Path | str) -> int | None:
    """Save the loaded model's evaluated tokens and KV cache to ``path`` (``kvstate``) and its
    metadata to ``kvstate.meta`` next to it (the folder is created); return the bytes written, or
    None when there was nothing to save (model not loaded, nothing evaluated) or saving failed
    (logged).

    Both files are replaced atomically (temp file, fsync, rename); a temp file an interrupted
    save leaves is removed by ``localbot.atomic.remove_own_temps`` (at exit, or from a signal
    handler), or by the next save or prune once it is a minute old. Holds the model
    (``model.exclusive()``): do not call it from inside a generation on the same thread.
    """
    import llama_cpp

    path = Path(path)
    start = time.perf_counter()
    tmp: str | None = None
    try:
        with model.exclusive(load=False) as llama:
            if llama is None:
                return None
            _prepare_folder(path)
            n = int(llama.n_tokens)
            if n <= 0:
                return None
            ctx = context_handle(llama)
            memory = llama_cpp.llama_get_memory(ctx)
            if memory is not None:
                pos_max = llama_cpp.llama_memory_seq_pos_max(memory, 0)
                if pos_max != n - 1:
                    log.debug(
                        "not saving %s: the KV cache ends at position %d but %d tokens are "
                        "recorded as evaluated",
                        path,
                        pos_max,
                        n,
                    )
                    return None
            tokens = [int(t) for t in llama.input_ids[:n]]
            identity = _identity(model, llama)
            tmp = make_temp(path)
            fd = os.open(tmp, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
            array = (llama_cpp.llama_token * n)(*tokens)
            if not llama_cpp.llama_state_save_file(ctx, _write_target(fd, tmp), array, n):
                os.close(fd)
                log.warning("llama.cpp could not save the KV state to %s", path)
                return None
        try:
            os.fsync(fd)
            os.replace(tmp, path)
            forget_temp(tmp)
            tmp = None
            stamp = _stamp(os.fstat(fd))  # after the rename: some file systems move ctime then
        finally:
            os.close(fd)
        meta = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "identity": identity,
            "n_tokens": n,
            "tokens_sha256": _tokens_sha256(tokens),
            "tokens": tokens,
            "state": stamp,
            "created": time.time(),
        }
        data = json.dumps(meta, separators=(",", ":")).encode()
        write_atomic(meta_path(path), data)  # fsyncs the directory, covering both renames
    except OSError as err:
        log.warning("could not save the KV state to %s: %s", path, err)
        return None
    finally:
        if tmp is not None:
            forget_temp(tmp, remove=True)
    size = stamp["size"]
    log.debug(
        "saved %d tokens of KV state to %s (%d bytes, %.3f s)",
        n,
        path,
        size,
        time.perf_counter() - start,
    )
    return size + len(data)


def _prepare_folder(path: Path) -> None:
    """Create the state's folder; refuse one that is a link; clear a killed save's old temps."""
    folder = path.parent
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not stat.S_ISDIR(os.lstat(folder).st_mode):
        raise FileTypeError(errno.ELOOP, "is a link, which localbot does not follow", str(folder))
    _remove_temps(folder, (path.name, meta_path(path).name), _STALE_TEMP_AGE_S)


# --------------------------------------------------------------------------- restore


def _read_meta(path: Path) -> dict[str, Any]:
    """The parsed, structurally checked metadata of state ``path``; raises _Rejected."""
    mpath = meta_path(path)
    try:
        data = read_file(mpath, max_bytes=_MAX_META_BYTES, follow_symlinks=False)
    except FileNotFoundError:
        raise _Rejected(f"{mpath} does not exist") from None
    except OSError as err:
        raise _Rejected(f"{mpath} {err.strerror or err}") from None
    try:
        meta = json.loads(data)  # JSON only: parsing it can never run code
    except (ValueError, RecursionError) as err:
        raise _Rejected(f"{mpath} is not valid JSON: {err}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise _Rejected(f"{mpath} is not localbot KV state metadata")
    if meta.get("version") != FORMAT_VERSION:
        raise _Rejected(f"{mpath} has format version {meta.get('version')!r}, not {FORMAT_VERSION}")
    tokens, n = meta.get("tokens"), meta.get("n_tokens")
    if (
        not isinstance(tokens, list)
        or not isinstance(n, int)
        or isinstance(n, bool)
        or n != len(tokens)
        or n <= 0
        or not all(type(t) is int and 0 <= t < 2**31 for t in tokens)
    ):
        raise _Rejected(f"{mpath} has a malformed token list")
    if meta.get("tokens_sha256") != _tokens_sha256(tokens):
        raise _Rejected(f"{mpath}: the token list does not match its sha256")
    state = meta.get("state")
    if (
        not isinstance(state, dict)
        or not all(type(state.get(key)) is int for key in _STAMP_KEYS)
        or not isinstance(meta.get("identity"), dict)
    ):
        raise _Rejected(f"{mpath} lacks the state file's stamp or identity")
    return meta


def _check_identity(saved: dict[str, Any], current: dict[str, Any]) -> None:
    for key in sorted(set(saved) | set(current)):
        if saved.get(key) != current.get(key):
            raise _Rejected(
                f"it was saved for {key}={saved.get(key)!r}, this model has {current.get(key)!r}"
            )


def _open_verified(path: Path, meta: dict[str, Any]) -> int:
    """Open the state file (never through a link, never blocking on a FIFO) and check that it is
    the file we wrote: its stamp must equal the meta's. Returns the fd."""
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags | getattr(os, "O_NOFOLLOW", 0))
    except OSError as err:
        reason = f"{err.strerror or err}; links are not followed"
        raise _Rejected(f"cannot open {path} ({reason})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _Rejected(f"{path} is not a regular file")
        saved = {key: meta["state"][key] for key in _STAMP_KEYS}
        if _stamp(st) != saved:
            changed = ", ".join(k for k in _STAMP_KEYS if _stamp(st)[k] != saved[k])
            raise _Rejected(
                f"{path} is not the file localbot wrote ({changed} differ: written to, "
                "replaced or copied since)"
            )
    except BaseException:
        os.close(fd)
        raise
    return fd


def _fd_path(fd: int, path: Path) -> str:
    """A path that opens exactly the file we hashed (Linux), so a concurrent replace cannot
    slip an unverified file in between the check and llama.cpp's own open."""
    proc = f"/proc/self/fd/{fd}"
    return proc if os.path.exists(proc) else str(path)


def restore_state(model: ChatLlamaCpp, path: Path | str, prompt_ids: Sequence[int]) -> int:
    """Load the state saved at ``path`` into ``model`` when it is valid for it and useful for the
    prompt ``prompt_ids``; return the number of prompt tokens the next generation will not have
    to evaluate (0 when nothing was restored). Never raises for a bad or foreign state file.

    Loads the model if needed; holds it (``model.exclusive()``) while loading the state.
    """
    path = Path(path)
    prompt = [int(t) for t in prompt_ids]
    try:
        meta = _read_meta(path)
    except _Rejected as why:
        log.debug("not restoring KV state %s: %s", path, why)
        return 0
    saved: list[int] = meta["tokens"]
    wanted = usable(common_prefix(saved, prompt), len(prompt))
    if wanted <= 0:
        log.debug("not restoring KV state %s: it shares no prefix with the prompt", path)
        return 0
    with model.exclusive() as llama:
        in_memory = reusable_tokens(llama, prompt)
        if in_memory >= wanted:
            log.debug(
                "not restoring KV state %s: the model already holds %d usable tokens (saved: %d)",
                path,
                in_memory,
                wanted,
            )
            return 0
        try:
            return _restore(model, llama, path, meta, prompt, wanted)
        except _Rejected as why:
            log.debug("not restoring KV state %s: %s", path, why)
            return 0
        except Exception:
            log.debug("not restoring KV state %s: unexpected error", path, exc_info=True)
            clear(llama)
            return 0


def _restore(
    model: ChatLlamaCpp,
    llama: Any,
    path: Path,
    meta: dict[str, Any],
    prompt: list[int],
    wanted: int,
) -> int:
    import llama_cpp

    _check_identity(meta["identity"], _identity(model, llama))
    saved: list[int] = meta["tokens"]
    n = len(saved)
    if n > llama.n_ctx():
        raise _Rejected(f"it holds {n} tokens, more than n_ctx {llama.n_ctx()}")
    n_vocab = int(llama.n_vocab())
    if any(t >= n_vocab for t in saved):
        raise _Rejected("it holds token ids outside this model's vocabulary")
    recurrent = getattr(llama, "_is_recurrent", False) or getattr(llama, "_is_hybrid", False)
    if recurrent and not wanted == n < len(prompt):
        raise _Rejected("recurrent memory cannot be trimmed: the prompt must extend the state")

    start = time.perf_counter()
    fd = _open_verified(path, meta)
    verified = time.perf_counter()
    try:
        # Past this point llama.cpp overwrites the context: any failure must leave it empty.
        clear(llama)
        ctx = context_handle(llama)
        buffer = (llama_cpp.llama_token * n)()
        n_out = ctypes.c_size_t(0)
        ok = llama_cpp.llama_state_load_file(
            ctx, os.fsencode(_fd_path(fd, path)), buffer, n, ctypes.byref(n_out)
        )
    finally:
        os.close(fd)
    try:
        if not ok:
            raise _Rejected("llama.cpp could not load it")
        if n_out.value != n or list(buffer) != saved:
            raise _Rejected("the state file's tokens differ from its meta")
        memory = llama_cpp.llama_get_memory(ctx)
        if memory is not None:
            pos_max = llama_cpp.llama_memory_seq_pos_max(memory, 0)
            if pos_max != n - 1:
                raise _Rejected(f"the loaded KV cache ends at {pos_max}, expected {n - 1}")
        problem = window_problem(llama, wanted)
        if problem:
            raise _Rejected(problem)
    except BaseException:
        clear(llama)
        raise
    llama.input_ids[:n] = saved
    llama.n_tokens = n
    mark_logits_stale(llama)
    log.debug(
        "restored %d tokens of KV state from %s (%d usable; verify %.3f s, load %.3f s)",
        n,
        path,
        wanted,
        verified - start,
        time.perf_counter() - verified,
    )
    return wanted


# --------------------------------------------------------------------------- cleanup


def _unlink(path: Path) -> int:
    """Remove a file; return its size (0 when it was already gone)."""
    try:
        size = os.stat(path, follow_symlinks=False).st_size
        os.unlink(path)
    except FileNotFoundError:
        return 0
    return size


def _remove_temps(directory: Path, names: Iterable[str], max_age_s: float) -> int:
    """Remove temp files left by a killed save of the given state/meta names."""
    prefixes = tuple(f".{name}{TEMP_MARKER}" for name in names)
    cutoff = time.time() - max_age_s
    freed = 0
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(directory):
            if not entry.name.startswith(prefixes):
                continue
            with contextlib.suppress(OSError):
                st = entry.stat(follow_symlinks=False)
                if st.st_mtime < cutoff or max_age_s <= 0:
                    os.unlink(entry.path)
                    freed += st.st_size
    return freed


def remove_state(path: Path | str) -> int:
    """Delete a saved state, its meta and any temp files of theirs; return the bytes freed."""
    path = Path(path)
    freed = _unlink(path) + _unlink(meta_path(path))
    freed += _remove_temps(path.parent, (path.name, meta_path(path).name), max_age_s=0)
    with contextlib.suppress(OSError):
        fsync_directory(path.parent)
    return freed


def prune_states(
    sessions_root: Path | str, max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES
) -> list[Path]:
    """Keep the saved states of the session store at ``sessions_root`` (every
    ``.sidecars/<id>/kvstate``) within ``max_total_bytes`` in all: delete the least recently
    written states (with their meta) until the rest fit. Also removes meta files whose state is
    gone and temp files a killed save left (older than a minute). Returns the state paths
    removed. Links are never followed."""
    base = Path(sessions_root) / SIDECAR_ROOT
    try:
        if not stat.S_ISDIR(os.lstat(base).st_mode):
            return []
        folders = [Path(e.path) for e in os.scandir(base) if e.is_dir(follow_symlinks=False)]
    except OSError:
        return []
    states: list[tuple[int, Path, int]] = []  # (mtime_ns, path, bytes with meta)
    for folder in folders:
        _remove_temps(folder, (KV_STATE_FILE, KV_META_FILE), _STALE_TEMP_AGE_S)
        state = folder / KV_STATE_FILE
        try:
            st = os.lstat(state)
        except FileNotFoundError:
            with contextlib.suppress(OSError):
                _unlink(meta_path(state))  # its state is gone
            continue
        except OSError:
            continue
        if not stat.S_ISREG(st.st_mode):
            continue
        size = st.st_size
        with contextlib.suppress(OSError):
            size += os.lstat(meta_path(state)).st_size
        states.append((st.st_mtime_ns, state, size))
    total = sum(size for _, _, size in states)
    removed: list[Path] = []
    for _, state_path, size in sorted(states, key=lambda s: (s[0], str(s[1]))):
        if total <= max_total_bytes:
            break
        try:
            _unlink(state_path)
            _unlink(meta_path(state_path))
        except OSError as err:
            log.debug("could not remove KV state %s: %s", state_path, err)
            continue
        total -= size
        removed.append(state_path)
        with contextlib.suppress(OSError):
            fsync_directory(state_path.parent)
    if removed:
        log.debug("pruned %d KV states from %s", len(removed), base)
    return removed
