"""The asynchronous engine the daemon serves from: one engine thread, per-request async iterators, abort.

The engine loop runs in its own thread so the event loop stays free for network I/O while a step computes.
Callers never touch the engine directly: adds and aborts travel through a command queue that the loop drains
between steps (when the scheduler would admit them anyway), and outputs travel back through per-request
asyncio queues. A caller that stops iterating (client gone, deadline hit) aborts its request, which frees its
KV blocks at the next step boundary.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
from dataclasses import dataclass
from itertools import count
from typing import AsyncIterator

from serving.config import EngineConfig
from serving.engine.llm_engine import LLMEngine
from serving.engine.outputs import RequestOutput
from serving.engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine thread has stopped; no request can be served."""


@dataclass(slots=True)
class _Stream:
    loop: asyncio.AbstractEventLoop  # the loop the consumer awaits on
    queue: asyncio.Queue  # RequestOutput items; the last one has finished=True


class AsyncLLM:
    def __init__(self, engine: LLMEngine | None = None, **config_kwargs):
        self.engine = engine or LLMEngine(EngineConfig(**config_kwargs))
        self.tokenizer = self.engine.tokenizer
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._streams: dict[str, _Stream] = {}
        self._ids = count()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="frugal-engine", daemon=True)
        self._thread.start()

    # -- public API -------------------------------------------------------------------------------------
    async def generate(self, prompt, params: SamplingParams | None = None, req_id: str | None = None,
                       **request_kwargs) -> AsyncIterator[RequestOutput]:
        """Yields incremental outputs for one request until the finished one. Raises ValueError for bad input
        (before anything is yielded) and QueueFullError when the waiting queue is full."""
        req_id = req_id or f"areq-{next(self._ids)}"
        loop = asyncio.get_running_loop()
        stream = _Stream(loop=loop, queue=asyncio.Queue())
        finished = False
        try:
            # Inside the try: a caller cancelled while the add is in flight still aborts what the add queued.
            await self._submit(("add", req_id, prompt, params, request_kwargs, stream))
            while True:
                out = await stream.queue.get()
                if isinstance(out, BaseException):
                    raise out
                finished = out.finished
                yield out
                if finished:
                    return
        finally:
            if not finished:
                # Consumer went away (cancelled, deadline, disconnect): free the request's blocks now. Only if the
                # id is still this stream's: a refused add (duplicate id) must not abort the other request.
                self._commands.put(("abort", req_id, stream, None))
                self._wakeup.set()

    async def abort(self, req_id: str) -> None:
        await self._submit(("abort", req_id, None))

    def stats(self) -> dict:
        """A snapshot for health checks and metrics (read without locking; values may be a step old)."""
        sched = self.engine.scheduler
        return {"num_unfinished": self.engine.num_unfinished_requests, "scheduler": sched.stats,
                "steps": self.engine.step_stats()}

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and not self._stopped

    def shutdown(self, timeout: float = 5.0) -> None:
        self._stopped = True
        self._wakeup.set()
        self._thread.join(timeout)

    # -- plumbing ---------------------------------------------------------------------------------------
    async def _submit(self, command: tuple):
        if not self.is_running:
            raise EngineDeadError("the engine is not running")
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put(command + (future,))
        self._wakeup.set()
        return await asyncio.wrap_future(future)

    def _deliver(self, out: RequestOutput | BaseException, req_id: str) -> None:
        stream = self._streams.get(req_id)
        if stream is None:
            return
        if isinstance(out, BaseException) or out.finished:
            del self._streams[req_id]
        try:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, out)
        except RuntimeError:  # the consumer's loop is closed
            pass

    def _run_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            kind, req_id = command[0], command[1]
            future = command[-1]
            if future is not None and not future.set_running_or_notify_cancel():
                if kind == "add":
                    continue  # the caller was cancelled before the add ran: never queue the request
                future = None
            try:
                if kind == "add":
                    _, _, prompt, params, kwargs, stream, _ = command
                    self.engine.add_request(prompt, params, req_id=req_id, **kwargs)
                    self._streams[req_id] = stream
                else:
                    owner = command[2]  # None: abort whoever holds the id; a stream: only if it still does
                    if owner is not None and self._streams.get(req_id) is not owner:
                        continue
                    final = self.engine.abort_request(req_id)
                    if final is not None:
                        self._deliver(final, req_id)
                if future is not None:
                    future.set_result(None)
            except Exception as e:  # bad input: the caller gets the error, the loop goes on
                if future is not None:
                    future.set_exception(e)

    def _loop(self) -> None:
        while not self._stopped:
            self._run_commands()
            if not self.engine.has_unfinished_requests():
                self._wakeup.wait(timeout=0.5)
                self._wakeup.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:
                logger.exception("engine step failed outside the model; failing all requests")
                self._fail_all(e)
                continue
            for out in outputs:
                self._deliver(out, out.req_id)
        self._fail_all(EngineDeadError("the engine was shut down"))

    def _fail_all(self, error: Exception) -> None:
        for req_id in list(self._streams):
            try:
                self.engine.abort_request(req_id)
            except Exception:
                logger.exception("abort of %s failed", req_id)
            self._deliver(EngineDeadError(str(error)) if not isinstance(error, EngineDeadError) else error, req_id)
