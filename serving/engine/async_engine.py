"""The asynchronous engine the daemon serves from: one engine thread, per-request async iterators, abort, health.

The engine loop runs in its own thread so the event loop stays free for network I/O while a step computes.
Callers never touch the engine directly: adds and aborts travel as typed commands through a queue that the loop
drains between steps, and outputs travel back through per-request asyncio queues. A caller that stops iterating
(client gone, deadline hit) aborts its request, which frees its KV blocks at the next step boundary.

The loop keeps a heartbeat (the last time it made progress or had nothing to do) for the watchdog
(serving/engine/watchdog.py). Once the engine is declared dead (the watchdog saw it hang or fail step after
step, or the loop itself crashed) every open stream gets EngineDeadError at once, new requests are refused, and
`health()` says why.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from itertools import count
from typing import AsyncIterator, Callable

from scheduler import Priority
from serving.config import EngineConfig
from serving.engine.llm_engine import LLMEngine
from serving.engine.outputs import RequestOutput
from serving.engine.sampling_params import SamplingParams
from serving.engine.stats import EngineStats

logger = logging.getLogger(__name__)

# NOTE: with work queued but nothing schedulable, the loop waits this long between tries instead of spinning.
_IDLE_RETRY_S = 0.005


def _put_all(items: list[tuple[asyncio.Queue, object]]) -> None:
    for q, item in items:
        q.put_nowait(item)


def _post(loop: asyncio.AbstractEventLoop, items: list[tuple[asyncio.Queue, object]]) -> None:
    """Puts `items` on their queues from the engine thread, in one wake-up of their consumers' loop."""
    try:
        loop.call_soon_threadsafe(_put_all, items)
    except RuntimeError:  # the consumers' loop is closed
        pass


class EngineDeadError(RuntimeError):
    """The engine has stopped or was declared dead; no request can be served."""


@dataclass(slots=True)
class _Stream:
    loop: asyncio.AbstractEventLoop  # the loop the consumer awaits on
    queue: asyncio.Queue  # RequestOutput items, or an exception; the last output has finished=True


@dataclass(frozen=True, slots=True)
class EngineDone:
    """How one submitted request ended, for whoever accounts for it (the control plane settles its cost)."""

    req_id: str  # engine request id
    accepted: bool  # False: the engine never took it (refused, cancelled before the add ran, engine not running)
    output: RequestOutput | None  # its final output; None when not accepted or when the engine died under it
    error: str | None = None  # why it ended without a final output


OnDone = Callable[[EngineDone], None]  # called once per generate() that started, from any thread


@dataclass(slots=True)
class AddRequest:
    """Queue a request; `done` gets None once the engine holds it, or the refusal."""

    req_id: str  # engine request id
    prompt: str | list[int] | dict  # as LLMEngine.add_request takes it
    params: SamplingParams | None  # None: the defaults
    priority: Priority | int  # scheduling class
    tenant_id: str  # fair-share and prefix-cache key
    cache_salt: str | None  # prefix-cache salt; None: the tenant id
    busy_s_cap: float | None  # most step time the request may take (a hard budget's reservation)
    stream: _Stream  # where the request's outputs go
    on_done: OnDone | None  # told how the request ended, once
    done: concurrent.futures.Future  # completed by the engine thread


@dataclass(slots=True)
class AbortRequest:
    """Abort a request and free its blocks now."""

    req_id: str  # engine request id
    owner: _Stream | None  # abort only while the id still belongs to this stream; None: whoever holds it
    done: concurrent.futures.Future | None = None  # completed once applied; None: nobody waits


@dataclass(slots=True)
class EngineHealth:
    healthy: bool  # False once the engine is dead: probes fail and requests are refused
    reason: str | None = None  # why it is not healthy
    since: float | None = None  # time.monotonic() when it stopped being healthy


@dataclass(slots=True)
class Heartbeat:
    """What the loop tells the watchdog; written by the engine thread only."""

    progress_at: float = field(default_factory=time.monotonic)  # last step that computed tokens, or last idle check
    step_started_at: float | None = None  # set while a step runs


class AsyncLLM:
    def __init__(self, engine: LLMEngine | None = None, **config_kwargs):
        self.engine = engine or LLMEngine(EngineConfig(**config_kwargs))
        self.tokenizer = self.engine.tokenizer
        self.heartbeat = Heartbeat()
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._streams: dict[str, _Stream] = {}
        self._on_done: dict[str, OnDone] = {}  # accepted requests whose end someone waits to hear of
        self._streams_lock = threading.Lock()  # the engine thread delivers, the watchdog may fail them all
        self._ids = count()
        self._stopped = False
        self._dead: EngineHealth | None = None
        self._thread = threading.Thread(target=self._run_loop, name="frugal-engine", daemon=True)
        self._thread.start()

    # -- public API -------------------------------------------------------------------------------------
    async def generate(self, prompt, params: SamplingParams | None = None, req_id: str | None = None,
                       priority: Priority | int = Priority.STANDARD, tenant_id: str = "default",
                       cache_salt: str | None = None, busy_s_cap: float | None = None,
                       on_done: OnDone | None = None) -> AsyncIterator[RequestOutput]:
        """Yields incremental outputs for one request until the finished one. Raises ValueError for bad input
        (before anything is yielded), QueueFullError when the waiting queue is full and EngineDeadError when
        the engine is not running. `on_done` hears once how the request ended, whatever happens to this
        iterator, as soon as it has started."""
        req_id = req_id or f"areq-{next(self._ids)}"
        loop = asyncio.get_running_loop()
        stream = _Stream(loop=loop, queue=asyncio.Queue())
        finished = False
        command = AddRequest(req_id, prompt, params, priority, tenant_id, cache_salt, busy_s_cap, stream, on_done,
                             concurrent.futures.Future())
        try:
            # Inside the try: a caller cancelled while the add is in flight still aborts what the add queued.
            # Once queued, the engine thread owns the command and tells on_done how it ended.
            if not self.is_running:
                error = self._dead.reason if self._dead else "the engine is not running"
                if on_done is not None:
                    on_done(EngineDone(req_id, accepted=False, output=None, error=error))
                raise EngineDeadError(error)
            await self._submit(command)
            while True:
                out = await stream.queue.get()
                if isinstance(out, BaseException):
                    finished = True  # the engine has already let go of it
                    raise out
                finished = out.finished
                yield out
                if finished:
                    return
        finally:
            if not finished:
                # Consumer went away (cancelled, deadline, disconnect): free the request's blocks now. Only if the
                # id is still this stream's: a refused add (duplicate id) must not abort the other request.
                self._commands.put(AbortRequest(req_id, owner=stream))
                self._wakeup.set()

    async def abort(self, req_id: str) -> None:
        if not self.is_running:
            raise EngineDeadError(self._dead.reason if self._dead else "the engine is not running")
        await self._submit(AbortRequest(req_id, owner=None, done=concurrent.futures.Future()))

    def stats(self) -> EngineStats:
        """A snapshot for health checks and metrics (read without locking; values may be a step old)."""
        return self.engine.stats()

    @property
    def num_streams(self) -> int:
        """Requests with a consumer attached; equals the engine's unfinished requests between steps."""
        return len(self._streams)

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and not self._stopped and self._dead is None

    def health(self) -> EngineHealth:
        if self._dead is not None:
            return self._dead
        if not self._thread.is_alive() and not self._stopped:
            return EngineHealth(False, "the engine thread has stopped")
        return EngineHealth(True)

    def declare_dead(self, reason: str) -> None:
        """Marks the engine dead for good and fails every open stream now (called by the watchdog thread, or by
        the loop when it crashes). A step still running may finish later; its outputs go nowhere."""
        with self._streams_lock:
            if self._dead is not None:
                return
            self._dead = EngineHealth(False, reason, time.monotonic())
            streams, self._streams = self._streams, {}
            callbacks, self._on_done = self._on_done, {}
        logger.error("engine declared dead: %s; failing %d open requests", reason, len(streams))
        for stream in streams.values():
            self._put(stream, EngineDeadError(reason))
        for req_id, callback in callbacks.items():
            self._call(callback, EngineDone(req_id, accepted=True, output=None, error=reason))
        if self.engine.faults is not None:
            self.engine.faults.release()
        self._wakeup.set()

    def shutdown(self, timeout: float = 5.0) -> None:
        self._stopped = True
        if self.engine.faults is not None:
            self.engine.faults.release()
        self._wakeup.set()
        self._thread.join(timeout)
        self.engine.close()  # after the loop's last step, so its events still go out

    # -- plumbing ---------------------------------------------------------------------------------------
    async def _submit(self, command: AddRequest | AbortRequest):
        """Queues a command for the engine thread and awaits it. Callers check `is_running` first; a loop that
        stopped in between is caught here, and the command answered as the loop would have."""
        self._commands.put(command)
        self._wakeup.set()
        if not self._thread.is_alive():
            self._drain_commands(self._dead.reason if self._dead else "the engine is not running")
        return await asyncio.wrap_future(command.done)

    @staticmethod
    def _put(stream: _Stream, item: RequestOutput | BaseException) -> None:
        _post(stream.loop, [(stream.queue, item)])

    @staticmethod
    def _call(callback: OnDone, done: EngineDone) -> None:
        try:
            callback(done)
        except Exception:  # an accounting bug must not take the engine loop down
            logger.exception("on_done callback for %s failed", done.req_id)

    def _take(self, out: RequestOutput) -> _Stream | None:
        """The stream `out` goes to (None: nobody listens); a final output also ends the request's bookkeeping."""
        callback = None
        with self._streams_lock:
            stream = self._streams.get(out.req_id)
            if out.finished:
                self._streams.pop(out.req_id, None)
                callback = self._on_done.pop(out.req_id, None)
        # NOTE: the accounting hears of the end before the consumer does, so a settlement is never behind it.
        if callback is not None:
            self._call(callback, EngineDone(out.req_id, accepted=True, output=out))
        return stream

    def _deliver(self, out: RequestOutput) -> None:
        stream = self._take(out)
        if stream is not None:
            self._put(stream, out)

    def _deliver_step(self, outputs: list[RequestOutput]) -> None:
        """A step's outputs, one wake-up per consumer loop instead of one per request: each wake-up writes to the
        loop's self-pipe, and every such syscall lets the event loop take the GIL from the engine thread."""
        batches: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput]]] = {}
        for out in outputs:
            stream = self._take(out)
            if stream is not None:
                batches.setdefault(stream.loop, []).append((stream.queue, out))
        for loop, items in batches.items():
            _post(loop, items)

    def _run_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            done = command.done
            if done is not None and not done.set_running_or_notify_cancel():
                if isinstance(command, AddRequest):
                    # The caller was cancelled before the add ran: never queue the request.
                    self._refused(command, "cancelled before the engine took it")
                    continue
                done = None
            try:
                if isinstance(command, AddRequest):
                    self._add(command)
                else:
                    self._abort(command)
            except Exception as e:  # bad input: the caller gets the error, the loop goes on
                if isinstance(command, AddRequest):
                    self._refused(command, f"{type(e).__name__}: {e}")
                if done is not None:
                    done.set_exception(e)
                continue
            if done is not None:
                done.set_result(None)

    def _refused(self, command: AddRequest, error: str) -> None:
        if command.on_done is not None:
            self._call(command.on_done, EngineDone(command.req_id, accepted=False, output=None, error=error))

    def _add(self, command: AddRequest) -> None:
        if self._dead is not None:
            raise EngineDeadError(self._dead.reason)
        self.engine.add_request(command.prompt, command.params, req_id=command.req_id, priority=command.priority,
                                tenant_id=command.tenant_id, cache_salt=command.cache_salt,
                                busy_s_cap=command.busy_s_cap)
        with self._streams_lock:
            self._streams[command.req_id] = command.stream
            if command.on_done is not None:
                self._on_done[command.req_id] = command.on_done

    def _abort(self, command: AbortRequest) -> None:
        with self._streams_lock:
            if command.owner is not None and self._streams.get(command.req_id) is not command.owner:
                return
        final = self.engine.abort_request(command.req_id)
        if final is not None:
            self._deliver(final)

    def _run_loop(self) -> None:
        try:
            self._loop()
        except BaseException as e:  # a bug in the loop itself: nobody can be served any more
            logger.exception("the engine loop crashed")
            self.declare_dead(f"the engine loop crashed ({type(e).__name__})")
        finally:
            # Whatever the engine still holds goes back to the pool; their streams were already told.
            error = self._dead.reason if self._dead else "the engine was shut down"
            for out in self.engine.abort_all(error):
                self._deliver(out)
            with self._streams_lock:
                streams, self._streams = self._streams, {}
                callbacks, self._on_done = self._on_done, {}
            for stream in streams.values():
                self._put(stream, EngineDeadError(error))
            for req_id, callback in callbacks.items():
                self._call(callback, EngineDone(req_id, accepted=True, output=None, error=error))
            self._drain_commands(error)

    def _drain_commands(self, error: str) -> None:
        """Commands queued after the loop's last turn: their callers are told the engine is gone."""
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(command, AddRequest):
                self._refused(command, error)
            if command.done is not None and command.done.set_running_or_notify_cancel():
                command.done.set_exception(EngineDeadError(error))

    def _loop(self) -> None:
        beat = self.heartbeat
        while not self._stopped and self._dead is None:
            was_idle = not self.engine.has_unfinished_requests()
            self._run_commands()
            if not self.engine.has_unfinished_requests():
                beat.progress_at = time.monotonic()
                self._wakeup.wait(timeout=0.5)
                self._wakeup.clear()
                continue
            if was_idle:  # work just arrived: the stall clock starts now, not at the last idle check
                beat.progress_at = time.monotonic()
            beat.step_started_at = time.monotonic()
            outputs = self.engine.step()
            beat.step_started_at = None
            if self.engine.last_step_num_tokens or outputs:
                beat.progress_at = time.monotonic()
            elif self.engine.has_unfinished_requests():
                self._wakeup.wait(timeout=_IDLE_RETRY_S)
                self._wakeup.clear()
            if self._dead is not None:
                return  # declared dead during the step: its outputs have nowhere to go
            self._deliver_step(outputs)
