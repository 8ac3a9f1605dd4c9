"""One accepted request, from admission to its settlement: its reservations, the engine requests it started, and
the ledger row and real cost it ends with.

The front end asks for one callback per engine request (`expect`) and passes it to AsyncLLM.generate, which
calls it exactly once however the engine request ends. When every engine request has ended and the front end
has said it starts no more (`close`, implied by `settled`), the admission settles on its own: it writes the
ledger row, adds the real cost to every budget line, drops its reservations and gives unused tokens back to
the rate limits. A normal response awaits `settled()` before its last bytes go out, so a response a client
received always has its committed row; a cancelled or failed request settles all the same, with nobody waiting.
An admission whose engine requests were all refused writes no row and releases everything.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from serving.control.budgets import Amount, BudgetLine
from serving.control.context import RequestContext
from serving.control.ledger import LedgerRow
from serving.control.ratelimit import Charge

if TYPE_CHECKING:  # the engine pulls in torch; the control plane does not need it
    from serving.control.plane import ControlPlane
    from serving.engine.async_engine import EngineDone, OnDone

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Settlement:
    status: str  # ok | cancelled | failed | refused (no row)
    cost_usd: float  # what the request cost
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    busy_s: float  # its share of engine step time


@dataclass(slots=True)
class Admission:
    plane: "ControlPlane"
    ctx: RequestContext  # who asked
    request_id: str  # the response id the client sees
    model: str  # served model id
    route: str  # where it runs
    prompt_tokens: int  # all prompts, each counted once
    num_choices_per_prompt: int  # n
    max_tokens: int  # per engine request, after any soft-budget fallback
    lines: list[BudgetLine]  # budget lines it was reserved on
    reserved: Amount  # the worst case reserved on every line
    charges: list[Charge]  # rate-limit charges taken (token buckets get the unused part back)
    busy_s_cap: float | None  # per engine request, from a hard money budget; None: uncapped
    soft_over: list[str]  # soft budgets past their limit, described
    route_reason: str = "the only route: one self-hosted model"  # why `route` serves it (the caller sees it)
    tokens_saved: int = 0  # prompt tokens the optimizer removed before admission
    escalated_from: str | None = None  # a cascade's escalation: the route whose answer was not confident enough
    admission_id: str = field(default_factory=lambda: uuid.uuid4().hex)  # the reservation id
    started: float = field(default_factory=time.monotonic)
    _loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.get_running_loop)
    _expected: int = 0  # engine requests submitted
    _done: list[tuple[int, "EngineDone"]] = field(default_factory=list)  # (choice index, how it ended)
    _closed: bool = False
    _task: asyncio.Task | None = None
    _committed: asyncio.Future | None = None  # the Settlement, once its ledger row is committed
    _settling: asyncio.Event = field(default_factory=asyncio.Event)  # set once the settlement has started

    def expect(self, index: int = 0) -> "OnDone":
        """The callback for engine request `index` (prompt index * n + choice); call once per submission."""
        self._expected += 1

        def on_done(done: "EngineDone") -> None:
            self._loop.call_soon_threadsafe(self._one_done, index, done)
        return on_done

    def close(self) -> None:
        """No more engine requests will be submitted; settles once the submitted ones have ended."""
        self._closed = True
        self._maybe_settle()

    async def settled(self) -> Settlement:
        """Closes the admission and waits for its settlement (its ledger row committed). Raises LedgerUnavailable
        when the row could not be committed: the response must not be sent then."""
        self.close()
        await self._settling.wait()  # at once, or when the last engine request's end reaches the loop
        return await asyncio.shield(self._committed)

    def _one_done(self, index: int, done: "EngineDone") -> None:
        self._done.append((index, done))
        self._maybe_settle()

    def _maybe_settle(self) -> None:
        if self._closed and self._task is None and len(self._done) >= self._expected:
            self._committed = self._loop.create_future()
            self._task = asyncio.ensure_future(self._settle())
            self.plane.track(self._task)
            self._settling.set()

    async def _settle(self) -> Settlement:
        plane, ctx = self.plane, self.ctx
        accepted = [(i, d) for i, d in self._done if d.accepted]
        if not accepted:
            self._committed.set_result(Settlement("refused", 0.0, 0, 0, 0, 0.0))
            plane.observer.settled(self, self._committed.result())
            await plane.release(self)
            return self._committed.result()
        outputs = [(i, d.output) for i, d in accepted if d.output is not None]
        completion = sum(len(o.token_ids) for _, o in outputs)
        n = self.num_choices_per_prompt
        cached = min(self.prompt_tokens, sum(o.num_cached_tokens for i, o in outputs if i % n == 0))
        busy_s = sum(o.metrics.busy_s for _, o in outputs if o.metrics is not None)
        cost = plane.cost_model(self.model).actual(busy_s, self.prompt_tokens, cached, completion)
        status, error_code = "ok", None
        if len(outputs) < len(accepted):
            status, error_code = "failed", "engine_dead"
        elif any(o.error is not None for _, o in outputs):
            status, error_code = "failed", "engine_error"
        elif any(o.finish_reason == "abort" for _, o in outputs):
            status, error_code = "cancelled", None
        first_tokens = [o.metrics.first_token_time - o.metrics.arrival_time for _, o in outputs
                        if o.metrics is not None and o.metrics.first_token_time is not None]
        row = LedgerRow(
            ts=time.time(), request_id=self.request_id, admission_id=self.admission_id, replica=plane.replica,
            tenant=ctx.tenant, key_id=ctx.key_id, workflow=ctx.workflow_id, task=ctx.task_id, model=self.model,
            route=self.route, prompt_tokens=self.prompt_tokens, completion_tokens=completion, cached_tokens=cached,
            cost_usd=cost, busy_s=busy_s, ttft_ms=1000 * min(first_tokens) if first_tokens else None,
            latency_ms=1000 * (time.monotonic() - self.started), status=status, error_code=error_code,
            tokens_saved=self.tokens_saved, escalated_from=self.escalated_from)
        settlement = Settlement(status, cost, self.prompt_tokens, completion, cached, busy_s)
        return await self._commit(row, settlement)

    async def settle_external(self, usage, status: str, error_code: str | None = None,
                              ttft_ms: float | None = None) -> Settlement:
        """Settles a request an external route served (or failed): its cost from the provider's reported usage
        at the route's prices. `usage` None: the provider was never reached or failed before answering, so
        nothing was spent and nothing is written. NOTE: an answer that came without usage is costed at the worst
        case reserved for it, never as free."""
        self._closed = True
        self._committed = self._loop.create_future()
        self._settling.set()
        plane, ctx = self.plane, self.ctx
        if usage is None:
            self._committed.set_result(Settlement("refused", 0.0, 0, 0, 0, 0.0))
            plane.observer.settled(self, self._committed.result())
            await plane.release(self)
            return self._committed.result()
        if usage.reported:
            prompt, cached, completion, cost = (usage.prompt_tokens, usage.cached_tokens, usage.completion_tokens,
                                                usage.cost_usd)
        else:
            prompt, cached, completion, cost = self.prompt_tokens, 0, self.max_tokens, self.reserved.usd
        row = LedgerRow(
            ts=time.time(), request_id=self.request_id, admission_id=self.admission_id, replica=plane.replica,
            tenant=ctx.tenant, key_id=ctx.key_id, workflow=ctx.workflow_id, task=ctx.task_id, model=self.model,
            route=self.route, prompt_tokens=prompt, completion_tokens=completion, cached_tokens=cached,
            cost_usd=cost, busy_s=0.0, ttft_ms=ttft_ms, latency_ms=1000 * (time.monotonic() - self.started),
            status=status, error_code=error_code, tokens_saved=self.tokens_saved, escalated_from=self.escalated_from)
        await self._commit(row, Settlement(status, cost, prompt, completion, cached, 0.0))
        return self._committed.result()  # raises LedgerUnavailable when the row could not be committed

    async def _commit(self, row: LedgerRow, settlement: Settlement) -> Settlement:
        plane = self.plane
        try:
            await plane.ledger.commit_request(row)
        except BaseException as e:
            self._committed.set_exception(e)
        else:
            # NOTE: the answer may go out now; the budget settles right after. Until it does, the reservation
            # (the worst case) still holds the amount, so settling late can never let a budget be overspent.
            self._committed.set_result(settlement)
        # The cost happened whether or not its row is in yet (a failed commit stays queued): count it.
        plane.observer.settled(self, settlement)
        await plane.settle(self, Amount(settlement.cost_usd, settlement.prompt_tokens + settlement.completion_tokens))
        return settlement
