"""The model thread: the one place the server touches llama.cpp.

The model is a single llama.cpp context, so one thread owns it and does all model work:

* **Generations** (a chatbot turn, or a stateless completion) wait in a FIFO and run one at a
  time, in arrival order. A job learns at submission how many are ahead of it.
* **Quick calls** (token counts, the context meter) run between two tokens of the running
  generation, so a client asking "does this fit?" never waits for someone else's reply.
* Each job's chunks go to an ``asyncio.Queue`` through ``call_soon_threadsafe``: the model thread
  never waits for a client, so a slow reader cannot hold the model (its reply is buffered, and a
  reply is at most ``max_tokens`` long).
* Between two tokens the thread looks at the job's flags: a client that went away
  (:meth:`Job.abandon`) closes the stream, a Stop (:meth:`Job.stop`) unwinds it like Ctrl-C. The
  chatbot saves the partial reply, marked interrupted, and the next job starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from localbot.errors import LocalbotError

log = logging.getLogger(__name__)

T = TypeVar("T")


class Stopped(KeyboardInterrupt):
    """Thrown into a chatbot turn when its user presses Stop: the turn unwinds exactly as it
    does on Ctrl-C in the REPL (partial reply saved, ``finish_reason`` "interrupted")."""


@dataclass(frozen=True)
class Event:
    """What a job reports to its client, in order: ``start``, then ``chunk``s, then one of
    ``end`` (``data`` = whatever the job's ``finish`` returned) or ``error`` (``data`` = the
    exception)."""

    kind: str
    data: Any = None


@dataclass(eq=False)
class Job:
    """One queued generation.

    ``begin`` runs on the model thread when the job's turn comes and returns the chunk iterator;
    ``finish`` (optional) runs there after it ends, for figures that need the model (stats, the
    context meter), and its result is the ``end`` event's data.
    """

    begin: Callable[[], Iterator[Any]]
    finish: Callable[[str], Any] | None = None
    session: str | None = None
    ahead: int = 0
    """Generations queued or running when this one was submitted."""
    id: int = field(default_factory=itertools.count(1).__next__)
    loop: asyncio.AbstractEventLoop | None = None
    """The event loop its reader waits on (set by ``Engine.submit``)."""
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _pending: deque[Event] = field(default_factory=deque)
    _ready: asyncio.Event = field(default_factory=asyncio.Event)
    _wake_scheduled: bool = False
    _abandoned: bool = False
    _stopped: bool = False

    def abandon(self) -> None:
        """The client went away: stop generating and let the next job run."""
        self._abandoned = True

    def stop(self) -> None:
        """The user pressed Stop: end the reply now, as Ctrl-C would."""
        self._stopped = True

    @property
    def abandoned(self) -> bool:
        return self._abandoned

    @property
    def stopped(self) -> bool:
        return self._stopped

    @property
    def cancelled(self) -> bool:
        return self._abandoned or self._stopped

    async def batches(self) -> AsyncIterator[list[Event]]:
        """The job's events as they come, in batches: everything that arrived while the reader
        was busy comes at once, so a reader that falls behind catches up in one write."""
        while True:
            await self._ready.wait()
            with self._lock:
                batch = list(self._pending)
                self._pending.clear()
                self._ready.clear()
                self._wake_scheduled = False
            yield batch
            if batch and batch[-1].kind in ("end", "error"):
                return

    async def events(self) -> AsyncIterator[Event]:
        """The job's events one by one."""
        async for batch in self.batches():
            for event in batch:
                yield event

    def emit(self, kind: str, data: Any = None) -> None:
        """Report an event (model thread only). Wakes the event loop only if it is not already
        due to look: one wake-up for a run of tokens the reader has not taken yet."""
        assert self.loop is not None
        with self._lock:
            self._pending.append(Event(kind, data))
            if self._wake_scheduled:
                return
            self._wake_scheduled = True
        # A closed event loop (RuntimeError) means the server is shutting down: nobody listens.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self._ready.set)


@dataclass(eq=False)
class _Call:
    fn: Callable[[], Any]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future

    def run(self) -> None:
        try:
            result, error = self.fn(), None
        except BaseException as err:  # handed to the caller, who decides what it means
            result, error = None, err
        self.loop.call_soon_threadsafe(self._settle, result, error)

    def _settle(self, result: Any, error: BaseException | None) -> None:
        if self.future.cancelled():
            return
        if error is not None:
            self.future.set_exception(error)
        else:
            self.future.set_result(result)


class Engine:
    """Owns the model thread (see the module docstring). ``start()`` once, ``close()`` at exit."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._jobs: deque[Job] = deque()
        self._calls: list[_Call] = []
        self._current: Job | None = None
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="localbot-model", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def abandon_all(self) -> None:
        """Stop every running and queued generation now (on SIGTERM / Ctrl-C); non-blocking,
        so a signal handler may call it. Partial replies are saved, marked interrupted."""
        with self._cond:
            for job in [*self._jobs, *([self._current] if self._current else [])]:
                job.abandon()
            self._cond.notify_all()

    def close(self, timeout: float = 30.0) -> None:
        """Abandon every job (partial replies are saved) and stop the thread."""
        with self._cond:
            self._closing = True
            for job in [*self._jobs, *([self._current] if self._current else [])]:
                job.abandon()
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # ------------------------------------------------------------------ submitting
    def submit(self, job: Job) -> Job:
        """Queue ``job`` (from the event loop); its events arrive on ``job.events()``."""
        job.loop = asyncio.get_running_loop()
        with self._cond:
            if self._closing:
                raise LocalbotError("the server is shutting down")
            job.ahead = len(self._jobs) + (self._current is not None)
            self._jobs.append(job)
            self._cond.notify_all()
        return job

    async def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the model thread (between two tokens if a reply is streaming)."""
        loop = asyncio.get_running_loop()
        call = _Call(fn, loop, loop.create_future())
        with self._cond:
            if self._closing:
                raise LocalbotError("the server is shutting down")
            self._calls.append(call)
            self._cond.notify_all()
        return await call.future

    def busy_sessions(self) -> set[str]:
        """Sessions with a generation queued or running."""
        with self._cond:
            jobs = [*self._jobs, *([self._current] if self._current else [])]
        return {job.session for job in jobs if job.session is not None}

    def stop_session(self, session: str) -> int:
        """Stop the running and queued generations of ``session``; how many there were."""
        with self._cond:
            jobs = [*self._jobs, *([self._current] if self._current else [])]
        found = [job for job in jobs if job.session == session]
        for job in found:
            job.stop()
        return len(found)

    @property
    def queued(self) -> int:
        with self._cond:
            return len(self._jobs) + (self._current is not None)

    # ------------------------------------------------------------------ the model thread
    def _run(self) -> None:
        stream: Iterator[Any] | None = None
        while True:
            with self._cond:
                while not (self._calls or self._jobs or self._current or self._closing):
                    self._cond.wait()
                if self._closing and not self._current and not self._calls:
                    for job in self._jobs:
                        job.emit("error", LocalbotError("the server is shutting down"))
                    self._jobs.clear()
                    return
                calls, self._calls = self._calls, []
                if self._current is None and self._jobs:
                    self._current = self._jobs.popleft()
                    stream = None
                job = self._current
            for call in calls:
                call.run()
            if job is None:
                continue
            if stream is None:
                stream = self._begin(job)
                if stream is None:
                    self._done(job)
                    continue
            if not self._step(job, stream):
                stream = None
                self._done(job)

    def _begin(self, job: Job) -> Iterator[Any] | None:
        if job.cancelled:  # its client left while it waited: never start it
            job.emit("error", LocalbotError("cancelled before it started"))
            return None
        try:
            stream = job.begin()
        except Exception as err:
            job.emit("error", _as_reportable(err))
            return None
        job.emit("start")
        return stream

    def _step(self, job: Job, stream: Iterator[Any]) -> bool:
        """Move ``job`` on by one chunk; False once it has ended (and reported so)."""
        try:
            if job.stopped:
                _throw_stop(stream)
                return self._end(job, "interrupted")
            if job.abandoned:
                stream.close()  # type: ignore[attr-defined]
                return self._end(job, "abandoned")
            chunk = next(stream)
        except StopIteration:
            return self._end(job, "complete")
        except Exception as err:
            _close_quietly(stream)
            job.emit("error", _as_reportable(err))
            return False
        job.emit("chunk", chunk)
        return True

    def _end(self, job: Job, outcome: str) -> bool:
        try:
            data = job.finish(outcome) if job.finish else outcome
        except Exception as err:
            job.emit("error", _as_reportable(err))
            return False
        job.emit("end", data)
        return False

    def _done(self, job: Job) -> None:
        with self._cond:
            if self._current is job:
                self._current = None


def _throw_stop(stream: Iterator[Any]) -> None:
    """Unwind ``stream`` as Ctrl-C would; it saves what it has and re-raises."""
    throw = getattr(stream, "throw", None)
    if throw is None:
        return
    try:
        throw(Stopped())
    except (Stopped, StopIteration):
        pass
    finally:
        _close_quietly(stream)


def _close_quietly(stream: Iterator[Any]) -> None:
    close = getattr(stream, "close", None)
    if close is not None:
        try:
            close()
        except Exception:  # closing after an error: the error is what gets reported
            log.debug("closing a stream failed", exc_info=True)


def _as_reportable(err: Exception) -> Exception:
    """User errors go to the client as they are; anything else is logged here and reported as
    an internal error, never with its traceback."""
    if isinstance(err, LocalbotError):
        return err
    log.error("generation failed: %s: %s", type(err).__name__, err, exc_info=True)
    return RuntimeError("internal error while generating (see the server's log)")
