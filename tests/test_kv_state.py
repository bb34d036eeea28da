"""KV state across restarts (localbot.kv_state) on the real Gemma 3 270M model, greedy decoding.

The proof the issue asks for: a model that restores a saved state gives exactly the reply the warm
process gives, reading only the new message; and any state that does not belong to the model or
is damaged is ignored, leaving a model that answers as a cold one does.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, messages_to_dict

import localbot.kv_files as kv_files
import localbot.kv_state as kv_state
from localbot import ChatLlamaCpp
from localbot.builtin_templates import BUILTIN_TEMPLATES
from localbot.kv_files import meta_path, prune_states, remove_state
from localbot.kv_state import restore_state, save_state
from localbot.llama_cache import common_prefix, drop_unsafe_cache

N_CTX = 2048
HELPER = Path(__file__).parent / "helpers" / "kv_resume.py"
TOPICS = ("the Roman aqueducts", "the printing press", "the steam engine")


def _question(topic: str) -> str:
    facts = " ".join(
        f"Point {i}: explain how {topic} changed daily life, trade and science." for i in range(14)
    )
    return f"I am writing an essay about {topic}. {facts} Please help me with the outline."


# One thread: on a 2-core machine shared with other test runs, llama.cpp's two spinning threads
# made prompt reading up to 5x slower than one thread.
THREADS = {"n_threads": 1, "n_threads_batch": 1}


def _model(path: Path, **kwargs) -> ChatLlamaCpp:
    model_kwargs = {"n_threads_batch": THREADS["n_threads_batch"], **kwargs.pop("model_kwargs", {})}
    settings = {"n_ctx": N_CTX, "temperature": 0, "max_tokens": 16, **kwargs}
    return ChatLlamaCpp(
        model_path=str(path), n_threads=THREADS["n_threads"], model_kwargs=model_kwargs, **settings
    )


def _common(a, b) -> int:
    return common_prefix(list(a), list(b))


# --------------------------------------------------------------------------- restore == warm


@pytest.fixture(scope="module")
def warm(test_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """The warm process: model A answers turns 1..k, saves its state, then answers turn k+1."""
    model = _model(test_model_path)
    history = [SystemMessage("You are a patient history tutor. Answer briefly.")]
    for topic in TOPICS:
        history.append(HumanMessage(_question(topic)))
        history.append(AIMessage(model.invoke(history, max_tokens=12).content))
    directory = tmp_path_factory.mktemp("kv")
    state = directory / "session-1.kvstate"
    start = time.perf_counter()
    written = save_state(model, state)
    save_seconds = time.perf_counter() - start
    llama = model.load()
    saved_tokens = llama._input_ids.tolist()
    next_turn = [*history, HumanMessage("Now summarise all three outlines in one sentence.")]
    reply = model.invoke(next_turn)
    return SimpleNamespace(
        model=model,
        state=state,
        written=written,
        save_seconds=save_seconds,
        saved_tokens=saved_tokens,
        next_turn=next_turn,
        reply=reply,
    )


def test_state_files_and_metadata(warm: SimpleNamespace) -> None:
    n = len(warm.saved_tokens)
    assert 600 <= n <= 1000  # a realistic multi-turn history
    meta = json.loads(meta_path(warm.state).read_text())
    size = warm.state.stat().st_size
    assert warm.written == size + meta_path(warm.state).stat().st_size
    assert meta["tokens"] == warm.saved_tokens
    assert meta["n_tokens"] == n
    assert meta["state"]["size"] == size
    assert meta["identity"]["n_ctx"] == N_CTX
    assert meta["identity"]["template"]["name"] == "gemma"
    assert meta["identity"]["context"]["swa_full"] is True
    assert meta["identity"]["model"]["size"] == Path(warm.model.model_path).stat().st_size
    # No temp files left behind.
    assert sorted(p.name for p in warm.state.parent.iterdir()) == [
        "session-1.kvstate",
        "session-1.kvstate.meta",
    ]
    print(
        f"\nstate: {n} tokens, {size} bytes ({size / n:.0f} B/token), "
        f"saved in {warm.save_seconds * 1000:.0f} ms"
    )


def test_restored_reply_equals_warm_reply(test_model_path: Path, warm: SimpleNamespace) -> None:
    fresh = _model(test_model_path)
    prompt = fresh.prompt_ids(warm.next_turn)
    expected = _common(warm.saved_tokens, prompt)
    assert expected >= len(warm.saved_tokens) - 4  # the new prompt extends the saved tokens

    fresh.load()  # timed apart: the warm process loaded its model too
    start = time.perf_counter()
    restored = restore_state(fresh, warm.state, prompt)
    restore_seconds = time.perf_counter() - start
    assert restored == expected
    reply = fresh.invoke(warm.next_turn)

    assert reply.content == warm.reply.content
    assert reply.content  # a real reply, not an empty one
    usage = reply.usage_metadata
    assert usage["input_token_details"]["cache_read"] == restored
    assert usage["input_token_details"] == warm.reply.usage_metadata["input_token_details"]
    # Only the new message (and the tail of the last reply) was read.
    assert usage["input_tokens"] - restored < 40
    print(
        f"\nrestore: {restore_seconds * 1000:.0f} ms, then read {usage['input_tokens'] - restored}"
    )

    # Asking again with the state already in memory: nothing to do, the cache is left alone.
    llama = fresh.load()
    before = llama.n_tokens
    assert restore_state(fresh, warm.state, fresh.prompt_ids(warm.next_turn)) == 0
    assert llama.n_tokens == before

    # A prompt equal to the saved tokens: generate re-reads its last token for fresh logits.
    llama.reset()
    tokens = warm.saved_tokens
    assert restore_state(fresh, warm.state, tokens) == len(tokens) - 1
    assert llama._input_ids.tolist() == tokens


def test_restored_reply_equals_warm_reply_in_a_new_process(
    test_model_path: Path, warm: SimpleNamespace, tmp_path: Path
) -> None:
    spec = tmp_path / "spec.json"
    spec.write_text(
        json.dumps(
            {
                "model_path": str(test_model_path),
                "n_ctx": N_CTX,
                "max_tokens": 16,
                "threads": THREADS,
                "state": str(warm.state),
                "messages": messages_to_dict(warm.next_turn),
            }
        )
    )
    done = subprocess.run(
        [sys.executable, str(HELPER), str(spec)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["reply"] == warm.reply.content
    assert result["restored"] == result["cache_read"] > 0
    assert result["cache_read"] == warm.reply.usage_metadata["input_token_details"]["cache_read"]
    print(f"\nnew process: {result}")


def test_state_sharing_no_prefix_is_not_even_loaded(
    test_model_path: Path, warm: SimpleNamespace
) -> None:
    model = _model(test_model_path)
    assert restore_state(model, warm.state, [warm.saved_tokens[1]] * 5) == 0
    assert model._llama is None  # decided from the meta alone


# --------------------------------------------------------------------------- damaged or foreign


@pytest.fixture(scope="module")
def small(test_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A short saved session, the prompt of its next turn, and the cold model's reply to it."""
    saver = _model(test_model_path, max_tokens=4)
    first = [HumanMessage("Name three colours of the rainbow.")]
    answer = saver.invoke(first).content
    directory = tmp_path_factory.mktemp("kv-small")
    state = directory / "s.kvstate"
    assert save_state(saver, state)
    next_turn = [*first, AIMessage(answer), HumanMessage("And two more?")]
    # The saved state itself is good: with nothing in memory, it is restored.
    saver.load().reset()
    assert restore_state(saver, state, saver.prompt_ids(next_turn)) > 0
    cold = _model(test_model_path, max_tokens=4)  # the model the damage cases reuse
    reference = cold.invoke(next_turn)
    assert reference.usage_metadata["input_token_details"]["cache_read"] == 0
    return SimpleNamespace(
        saver=saver, state=state, next_turn=next_turn, reference=reference.content, cold=cold
    )


def _rewrite_meta(path: Path, change) -> None:
    meta = json.loads(meta_path(path).read_text())
    change(meta)
    meta_path(path).write_text(json.dumps(meta))


def _set_tokens(meta: dict, tokens: list[int]) -> None:
    meta["tokens"], meta["n_tokens"] = tokens, len(tokens)
    meta["tokens_sha256"] = kv_files.tokens_sha256(tokens)


def _agree(meta: dict, state: Path) -> None:
    """ "Re-sign" the meta for the damaged state file: its size, mtime and inode as they are now.
    Only the ctime, which no program can set back, still tells the damage apart."""
    st = state.stat()
    meta["state"].update(size=st.st_size, mtime_ns=st.st_mtime_ns, inode=st.st_ino)


def _flip_middle(state: Path) -> None:
    data = bytearray(state.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 16] = bytes(b ^ 0xFF for b in data[middle : middle + 16])
    state.write_bytes(bytes(data))


def _truncate(state: Path) -> None:
    with open(state, "r+b") as f:
        f.truncate(state.stat().st_size // 2)


class _Payload:
    """Unpickling this would create the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _pickle_payload(marker: Path) -> bytes:
    import pickle  # the test builds a payload; the module under test never imports pickle

    return pickle.dumps(_Payload(marker))


def _damage(case: str, state: Path, marker: Path) -> None:
    meta = meta_path(state)
    if case == "missing meta":
        meta.unlink()
    elif case == "missing state":
        state.unlink()
    elif case == "garbage meta":
        meta.write_bytes(b"\x00\xffnot json{{")
    elif case == "meta is a list":
        meta.write_text("[1, 2, 3]")
    elif case == "truncated meta":
        meta.write_bytes(meta.read_bytes()[:100])
    elif case == "pickle as meta":
        meta.write_bytes(_pickle_payload(marker))
    elif case == "pickle as state, meta agrees":
        state.write_bytes(_pickle_payload(marker))
        _rewrite_meta(state, lambda m: _agree(m, state))
    elif case == "truncated state":
        _truncate(state)
    elif case == "truncated state, meta agrees":
        _truncate(state)
        _rewrite_meta(state, lambda m: _agree(m, state))
    elif case == "corrupt bytes in state":
        _flip_middle(state)
    elif case == "corrupt bytes in state, meta re-signed":
        _flip_middle(state)
        _rewrite_meta(state, lambda m: _agree(m, state))
    elif case == "a copy of the state":
        copy = state.with_name("copy")
        shutil.copy2(state, copy)  # same bytes, same mtime; another inode
        os.replace(copy, state)
    elif case == "state file tokens differ from meta":
        _rewrite_meta(state, lambda m: _set_tokens(m, [*m["tokens"][:-1], m["tokens"][-1] + 1]))
    elif case == "token list does not match its sha":
        _rewrite_meta(state, lambda m: m["tokens"].__setitem__(-1, m["tokens"][-1] + 1))
    elif case == "format version":
        _rewrite_meta(state, lambda m: m.__setitem__("version", 99))
    elif case == "model mtime":
        _rewrite_meta(state, lambda m: m["identity"]["model"].__setitem__("mtime_ns", 1))
    elif case == "model fingerprint":
        _rewrite_meta(
            state, lambda m: m["identity"]["model"].__setitem__("fingerprint_sha256", "0" * 64)
        )
    elif case == "llama-cpp-python version":
        _rewrite_meta(state, lambda m: m["identity"].__setitem__("llama_cpp_version", "0.0.1"))
    elif case == "state is a directory":
        state.unlink()
        state.mkdir()
    else:  # pragma: no cover
        raise AssertionError(case)


DAMAGE_CASES = [
    "missing meta",
    "missing state",
    "garbage meta",
    "meta is a list",
    "truncated meta",
    "pickle as meta",
    "pickle as state, meta agrees",
    "truncated state",
    "truncated state, meta agrees",
    "corrupt bytes in state",
    "corrupt bytes in state, meta re-signed",
    "a copy of the state",
    "state file tokens differ from meta",
    "token list does not match its sha",
    "format version",
    "model mtime",
    "model fingerprint",
    "llama-cpp-python version",
    "state is a directory",
]


@pytest.mark.parametrize("case", DAMAGE_CASES)
def test_damaged_or_foreign_state_is_ignored(
    small: SimpleNamespace,
    tmp_path: Path,
    case: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    state = tmp_path / "kvstate"
    assert save_state(small.saver, state)  # a good state of our own: copies are never trusted
    marker = tmp_path / "code-ran"
    _damage(case, state, marker)

    model = small.cold
    llama = model.load()
    llama.reset()  # nothing usable in memory, so a restore would be attempted
    with caplog.at_level(logging.DEBUG, logger="localbot.kv_state"):
        assert restore_state(model, state, model.prompt_ids(small.next_turn)) == 0
    assert any("not restoring" in r.getMessage() for r in caplog.records)
    assert not marker.exists()
    assert llama.n_tokens == 0  # nothing half-loaded is taken for a cache

    reply = model.invoke(small.next_turn)
    assert reply.content == small.reference
    assert reply.usage_metadata["input_token_details"]["cache_read"] == 0


def test_hard_link_to_the_model_is_another_model(
    test_model_path: Path, small: SimpleNamespace, tmp_path: Path
) -> None:
    link = tmp_path / "other.gguf"
    try:
        os.link(test_model_path, link)
    except OSError:
        shutil.copyfile(test_model_path, link)
    model = _model(link, max_tokens=4)
    assert restore_state(model, small.state, model.prompt_ids(small.next_turn)) == 0
    reply = model.invoke(small.next_turn)
    assert reply.content == small.reference
    assert reply.usage_metadata["input_token_details"]["cache_read"] == 0


_VARIANT_TEMPLATE = BUILTIN_TEMPLATES["gemma"] + "{# a different template, same tokens #}"


@pytest.mark.parametrize(
    "settings",
    [
        {"n_ctx": 1024},
        {"chat_format": _VARIANT_TEMPLATE},
        {"swa_full": False},
    ],
    ids=["n_ctx", "template", "swa_full"],
)
def test_state_for_other_settings_is_ignored(
    test_model_path: Path, small: SimpleNamespace, settings: dict, caplog: pytest.LogCaptureFixture
) -> None:
    model = _model(test_model_path, max_tokens=4, **settings)
    prompt = model.prompt_ids(small.next_turn)
    saved = json.loads(meta_path(small.state).read_text())["tokens"]
    assert _common(saved, prompt) > 0  # so the restore gets as far as the identity check
    with caplog.at_level(logging.DEBUG, logger="localbot.kv_state"):
        assert restore_state(model, small.state, prompt) == 0
    assert any("it was saved for" in r.getMessage() for r in caplog.records)
    assert save_state(model, small.state.parent / "unused.kvstate") is None  # nothing evaluated
    reply = model.invoke(small.next_turn)
    assert reply.usage_metadata["input_token_details"]["cache_read"] == 0
    assert prompt == small.cold.prompt_ids(small.next_turn)
    assert reply.content == small.reference


def test_save_without_a_loaded_model_saves_nothing(test_model_path: Path, tmp_path: Path) -> None:
    assert save_state(_model(test_model_path), tmp_path / "x.kvstate") is None
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- sliding window


def test_sliding_window_without_full_cache_refuses_unsafe_trims(
    test_model_path: Path, tmp_path: Path
) -> None:
    """With swa_full=False llama.cpp keeps only the last n_swa + n_ubatch positions of the
    sliding-window layers. A restore that would need older ones is refused; one that extends the
    state (or trims it within the window) is used and answers as the warm process does. The
    window is shrunk to 64 tokens through a GGUF metadata override to keep the test fast."""
    settings = {
        "swa_full": False,
        "n_ctx": 1024,
        "max_tokens": 6,
        # n_ubatch 64, not n_batch 64: with swa_full off, 64-token llama_decode calls ran
        # ~15x slower here. The window cache holds pad(n_swa + n_ubatch, 256) = 256 cells.
        "model_kwargs": {
            "n_ubatch": 64,
            "kv_overrides": {"gemma3.attention.sliding_window": 64},
        },
    }
    warm_model = _model(test_model_path, **settings)
    story = " ".join(f"Fact {i}: the tower number {i} is painted blue." for i in range(24))
    history = [HumanMessage(story)]
    history.append(AIMessage(warm_model.invoke(history).content))
    state = tmp_path / "w.kvstate"
    assert save_state(warm_model, state)
    import llama_cpp

    llama = warm_model.load()
    pos_min = llama_cpp.llama_memory_seq_pos_min(llama_cpp.llama_get_memory(llama._ctx.ctx), 0)
    assert pos_min > 64  # the early positions of the window layers are gone

    fresh = _model(test_model_path, **settings)
    early_change = [HumanMessage("Fact 0: the tower is red. What colour is the tower?")]
    assert 0 < _common(fresh.prompt_ids(early_change), fresh.prompt_ids(history)) < 64
    assert restore_state(fresh, state, fresh.prompt_ids(early_change)) == 0
    assert fresh.load().n_tokens == 0
    cold = fresh.invoke(early_change)  # the reference for a full read of early_change
    assert cold.usage_metadata["input_token_details"]["cache_read"] == 0

    next_turn = [*history, HumanMessage("Which colour are the towers?")]
    restored = restore_state(fresh, state, fresh.prompt_ids(next_turn))
    assert restored > pos_min + 64
    expected = warm_model.invoke(next_turn)
    reply = fresh.invoke(next_turn)
    assert reply.content == expected.content
    assert reply.usage_metadata["input_token_details"]["cache_read"] == restored

    # The warm process has the same hazard: Llama.generate would trim its cache back to the
    # few tokens shared with early_change and read that prompt with holes in the window.
    # drop_unsafe_cache (for ChatLlamaCpp to call before generate) makes it re-read instead.
    assert not drop_unsafe_cache(fresh.load(), fresh.prompt_ids(next_turn))
    assert fresh.load().n_tokens > 0
    assert drop_unsafe_cache(warm_model.load(), warm_model.prompt_ids(early_change))
    assert warm_model.load().n_tokens == 0
    again = warm_model.invoke(early_change)
    assert again.usage_metadata["input_token_details"]["cache_read"] == 0
    assert again.content == cold.content


# --------------------------------------------------------------------------- never runs code


@pytest.mark.parametrize("module", [kv_state, kv_files], ids=["kv_state", "kv_files"])
def test_module_never_unpickles(module) -> None:
    source = Path(module.__file__).read_text().lower()
    assert "pickle" not in source
    assert "marshal" not in source
    assert "shelve" not in source


# --------------------------------------------------------------------------- disk


def _fake_state(root: Path, session_id: str, size: int, age_s: float) -> Path:
    """A state and its meta where a session store keeps them (``.sidecars/<id>/``)."""
    folder = root / ".sidecars" / session_id
    folder.mkdir(parents=True, exist_ok=True)
    state = folder / "kvstate"
    state.write_bytes(b"s" * size)
    meta_path(state).write_bytes(b"m" * 10)
    when = time.time() - age_s
    os.utime(state, (when, when))
    return state


def test_prune_removes_least_recently_written_until_under_budget(tmp_path: Path) -> None:
    old = _fake_state(tmp_path, "old", 1000, 300)
    middle = _fake_state(tmp_path, "middle.v2", 1000, 200)
    new = _fake_state(tmp_path, "new", 1000, 100)
    (tmp_path / "old.json").write_text("[]")  # a session file is never touched
    orphan = tmp_path / ".sidecars" / "gone" / "kvstate.meta"
    orphan.parent.mkdir()
    orphan.write_text("{}")
    stale = old.parent / ".kvstate.tmp-abc"
    stale.write_bytes(b"x" * 5000)
    os.utime(stale, (time.time() - 600,) * 2)
    fresh_temp = new.parent / ".kvstate.tmp-def"
    fresh_temp.write_bytes(b"x")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "kvstate").write_bytes(b"s" * 5000)
    (tmp_path / ".sidecars" / "linked").symlink_to(elsewhere)  # never followed

    assert prune_states(tmp_path, max_total_bytes=10_000) == []  # within budget: only debris
    assert not orphan.exists()
    assert not stale.exists()
    assert fresh_temp.exists()
    assert old.exists()

    assert prune_states(tmp_path, max_total_bytes=2100) == [old]
    assert not old.exists()
    assert not meta_path(old).exists()
    assert middle.exists()
    assert new.exists()
    assert (tmp_path / "old.json").exists()

    assert prune_states(tmp_path, max_total_bytes=0) == [middle, new]
    assert [p.name for p in new.parent.iterdir()] == [".kvstate.tmp-def"]
    assert (elsewhere / "kvstate").exists()
    assert prune_states(tmp_path / "missing") == []


def test_remove_state_removes_both_files_and_temps(tmp_path: Path) -> None:
    state = _fake_state(tmp_path, "s", 100, 0)
    (state.parent / ".kvstate.tmp-123").write_bytes(b"x")
    (state.parent / "settings.json").write_text("{}")
    assert remove_state(state) == 111
    assert sorted(p.name for p in state.parent.iterdir()) == ["settings.json"]
    assert remove_state(state) == 0  # already gone: fine


def test_session_store_keeps_state_files_with_the_session(tmp_path: Path) -> None:
    from localbot.sessions import SessionStore

    store = SessionStore(tmp_path)
    store.get("chat").add_message(HumanMessage("hi"))
    state = _fake_state(tmp_path, "chat", 10, 0)
    assert store.kv_state_path("chat") == state
    assert [info.id for info in store.list()] == ["chat"]
    store.rename("chat", "chat.v2")
    assert store.kv_state_path("chat.v2").read_bytes() == b"s" * 10
    store.delete("chat.v2")
    assert not store.kv_state_path("chat.v2").exists()
    assert not (tmp_path / ".sidecars" / "chat.v2").exists()
