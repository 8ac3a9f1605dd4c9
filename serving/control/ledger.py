"""The durable ledger: one row per accepted request, written by one thread with group commit.

Callers hand rows over and await the commit: a response leaves the server only after its row is committed, so
every answer a client received has its row, even if the process is killed right after. Rows that arrive while a
commit runs go into the next one, so the cost of a commit is shared by everyone waiting for it. When the database
is unreachable the writer retries; after `retry_s` the waiting callers get the error (their responses fail), but
the rows stay queued and are written once the database is back.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from dataclasses import asdict, dataclass

import sqlalchemy as sa

from serving.control.store import engine_time, outcomes, requests, tool_calls

logger = logging.getLogger(__name__)

MAX_BATCH = 512  # rows per commit


@dataclass(slots=True)
class LedgerRow:
    ts: float  # UNIX seconds when the request finished
    request_id: str  # the id the client got back
    admission_id: str  # unique per accepted request; the id of its budget reservations
    replica: str  # which daemon served it
    tenant: str
    key_id: str | None
    workflow: str | None
    task: str | None
    model: str  # served model id
    route: str  # where it ran ("self-hosted:<model>")
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    cost_usd: float
    busy_s: float  # its share of engine step time
    ttft_ms: float | None
    latency_ms: float
    status: str  # ok | cancelled | failed
    error_code: str | None
    cache: str | None = None  # exact | semantic when a response cache answered
    saved_usd: float | None = None  # what that hit saved
    tokens_saved: int | None = None  # prompt tokens the optimizer removed
    escalated_from: str | None = None  # the cascade's first route, whose answer was not confident enough


@dataclass(slots=True)
class _Item:
    table: sa.Table
    values: dict
    done: concurrent.futures.Future | None


class Ledger:
    def __init__(self, engine: sa.Engine, retry_s: float = 5.0):
        self.engine = engine
        self.retry_s = retry_s
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._pending: list[_Item] = []  # rows whose commit failed and waits for a retry (writer thread only)
        self.num_committed = 0
        self._conn: sa.Connection | None = None  # the writer thread's own connection
        self._thread = threading.Thread(target=self._run, name="frugal-ledger", daemon=True)
        self._thread.start()

    # -- writing -----------------------------------------------------------------------------------------
    def submit(self, table: sa.Table, values: dict) -> concurrent.futures.Future:
        done: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put(_Item(table, values, done))
        return done

    async def commit_request(self, row: LedgerRow) -> None:
        await asyncio.wrap_future(self.submit(requests, asdict(row)))

    async def commit_outcome(self, values: dict) -> None:
        await asyncio.wrap_future(self.submit(outcomes, values))

    async def commit_tool_calls(self, values: dict) -> None:
        await asyncio.wrap_future(self.submit(tool_calls, values))

    def record_engine_time(self, values: dict) -> None:
        self.submit(engine_time, values)

    def close(self, timeout: float = 10.0) -> None:
        """Commits what is queued, then stops the writer."""
        self._queue.put(None)
        self._thread.join(timeout)

    # -- the writer thread -------------------------------------------------------------------------------
    def _run(self) -> None:
        stopping = False
        while not stopping or self._pending:
            batch = self._pending
            self._pending = []
            try:
                item = self._queue.get(timeout=None if not batch else 0.5)
            except queue.Empty:
                item = False
            while item is not False:
                if item is None:
                    stopping = True
                else:
                    batch.append(item)
                if len(batch) >= MAX_BATCH:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    item = False
            if batch:
                self._commit(batch)
            if stopping and self._pending:
                self._commit(self._pending[:])  # one last try; what fails now is logged as lost
                self._pending = []
                break
        if self._conn is not None:
            self._conn.close()

    def _commit(self, batch: list[_Item]) -> None:
        deadline = time.monotonic() + self.retry_s
        delay = 0.05
        while True:
            try:
                # NOTE: one connection kept by the writer: a connection from the pool costs a rollback round trip
                # each time it goes back, more than the commit itself on a fast database.
                if self._conn is None:
                    self._conn = self.engine.connect()
                with self._conn.begin():
                    by_table: dict[str, list[_Item]] = {}
                    for item in batch:
                        by_table.setdefault(item.table.name, []).append(item)
                    for items in by_table.values():
                        self._conn.execute(items[0].table.insert(), [i.values for i in items])
            except sa.exc.SQLAlchemyError as e:
                if self._conn is not None:
                    self._conn.invalidate()  # a broken connection is replaced on the next try
                    self._conn.close()
                    self._conn = None
                if time.monotonic() < deadline:
                    time.sleep(delay)
                    delay = min(delay * 2, 1.0)
                    continue
                logger.error("ledger commit of %d rows failed (%s); they stay queued", len(batch), e)
                for item in batch:
                    if item.done is not None and not item.done.done():
                        item.done.set_exception(LedgerUnavailable(f"the ledger database is unavailable: {e}"))
                    item.done = None
                self._pending.extend(batch)
                return
            self.num_committed += len(batch)
            for item in batch:
                if item.done is not None and not item.done.done():
                    item.done.set_result(None)
            return


class LedgerUnavailable(RuntimeError):
    """The ledger could not commit a row in time; the request's answer must not be sent."""
