"""The control plane: the one admission and settlement path both front ends use.

    authenticate (key -> tenant) -> model allowlist -> rate limits -> agent task -> budgets -> [engine] -> settle

`authenticate` turns what the client sent into a RequestContext; `admit` takes the rate-limit charges, counts the
agent task's call and reserves the worst case on every budget line, all or nothing, and returns the Admission
that settles the real cost once the engine is done (serving/control/admission.py). Neither front end makes a
policy decision of its own.
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from typing import TYPE_CHECKING, Callable

import sqlalchemy as sa

from serving.control import queries
from serving.control.admission import Admission
from serving.control.budgets import Amount, BudgetLine, LocalBudgets, lines_for
from serving.control.config import BudgetConfig, ControlConfig
from serving.control.context import DEFAULT_TENANT, Caller, RequestContext
from serving.control.cost import CostModel
from serving.control.errors import ControlError, ControlUnavailable, ModelNotAllowed, TaskNotFound
from serving.control.keys import KeyStore
from serving.control.ledger import Ledger, LedgerRow
from serving.control.observer import ControlObserver
from serving.control.ratelimit import Charge, LocalLimiter, RedisLimiter
from serving.control.store import open_database
from serving.control.tasks import LocalTasks, RedisTasks, TaskState

if TYPE_CHECKING:  # the caches load the embedder's libraries only when they are configured
    from serving.control.caches import CacheHit

logger = logging.getLogger(__name__)

OUTCOMES = ("resolved", "escalated", "failed")
ENGINE_TIME_INTERVAL_S = 60.0  # how often the accelerator's busy and idle time go to the ledger
RECONCILE_INTERVAL_S = 30.0  # how often expired reservations are checked against the ledger (Redis only)


async def _nothing() -> None:
    return None


class ControlPlane:
    def __init__(self, config: ControlConfig, model_name: str, db: sa.Engine, redis_client=None,
                 solo_s_per_token: Callable[[], float | None] = lambda: None,
                 busy_s: Callable[[], float] = lambda: 0.0, replica: str | None = None):
        self.config = config
        self.model_name = model_name
        self.db = db
        self.replica = replica or f"{socket.gethostname()}:{os.getpid()}"
        self.keys = KeyStore(db, config.key_cache_s)
        self.ledger = Ledger(db)
        self.solo_s_per_token = solo_s_per_token  # the engine's current worst cost of a token, in seconds
        self.busy_s = busy_s  # the engine's step time since start
        self.redis = redis_client
        seed_line = self._in_thread(queries.spent)
        seed_task = self._in_thread(queries.task_state)
        if redis_client is None:
            self.limiter = LocalLimiter()
            self.budgets = LocalBudgets(seed_line, config.reservation_ttl_s)
            self.tasks = LocalTasks(config.tasks, seed_task)
        else:
            from serving.control.budgets_redis import RedisBudgets

            self.limiter = RedisLimiter(redis_client)
            # NOTE: an expired reservation is checked against the ledger one more TTL later: by then a replica
            # that was only slow has settled it itself.
            self.budgets = RedisBudgets(redis_client, seed_line, config.reservation_ttl_s,
                                        grace_s=config.reservation_ttl_s)
            self.tasks = RedisTasks(redis_client, config.tasks, seed_task)
        self._background: set[asyncio.Task] = set()
        self._workers: list[asyncio.Task] = []
        self.num_soft_exceeded = 0  # soft-budget overruns since start
        self.observer = ControlObserver()  # the metrics, once the daemon installs them
        self.caches = None  # serving.control.caches.ResponseCaches when caches: enables one
        # per self-hosted model, its engine's current worst time per token (several models: each its own)
        self.solo_s_per_token_of: dict[str, Callable[[], float | None]] = {}
        self._engine_time_mark: tuple[float | None, float] = (None, 0.0)  # (UNIX s, busy s) of the last row

    @classmethod
    def open(cls, config: ControlConfig, model_name: str, **kwargs) -> ControlPlane:
        """Connects to the configured database (schema created on first use) and Redis. Raises OSError when the
        database cannot be reached."""
        try:
            db = open_database(config.resolved_database_url())
        except sa.exc.SQLAlchemyError as e:
            raise OSError(f"cannot open the ledger database: {getattr(e, 'orig', None) or e}") from None
        redis_client = None
        if config.redis_url:
            import redis.asyncio as aioredis

            # NOTE: a blocking pool: a burst past the pool's size waits for a connection instead of failing.
            pool = aioredis.BlockingConnectionPool.from_url(config.redis_url, max_connections=64, timeout=10,
                                                            decode_responses=True)
            redis_client = aioredis.Redis(connection_pool=pool)
        return cls(config, model_name, db, redis_client, **kwargs)

    def _in_thread(self, query):
        async def run(*args):
            return await asyncio.to_thread(query, self.db, *args)
        return run

    # -- lifetime ----------------------------------------------------------------------------------------
    def start(self) -> None:
        """Starts the background work: engine time to the ledger, and (with Redis) reconciliation."""
        self._workers.append(asyncio.create_task(self._record_engine_time(), name="frugal-engine-time"))
        if self.redis is not None:
            self._workers.append(asyncio.create_task(self._reconcile(), name="frugal-reconcile"))

    async def close(self) -> None:
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        if self._background:
            await asyncio.wait(self._background, timeout=10)
        self._write_engine_time()
        await asyncio.to_thread(self.ledger.close)
        await self.budgets.close()
        self.db.dispose()

    def track(self, task: asyncio.Task) -> None:
        """Keeps a settlement alive until it is done (nobody may be waiting for it)."""
        self._background.add(task)
        task.add_done_callback(self._settled)

    def _settled(self, task: asyncio.Task) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("background work of a request failed: %s", task.exception())

    # -- admission ---------------------------------------------------------------------------------------
    async def authenticate(self, caller: Caller) -> RequestContext:
        private = caller.sensitivity == "private"
        if self.config.auth == "none":
            return RequestContext(tenant=DEFAULT_TENANT, key_id=None, role="user", workflow_id=caller.workflow_id,
                                  task_id=caller.task_id, private=private, allowed_models=None, key_rpm=None,
                                  key_tpm=None)
        if self.keys.is_cached(caller.api_key):
            key = self.keys.authenticate(caller.api_key)
        else:
            key = await asyncio.to_thread(self.keys.authenticate, caller.api_key)
        # NOTE: a tenant the client names is ignored unless an admin key (a platform's own gateway) acts for it.
        tenant = caller.on_behalf_of if caller.on_behalf_of and key.role == "admin" else key.tenant
        return RequestContext(tenant=tenant, key_id=key.key_id, role=key.role, workflow_id=caller.workflow_id,
                              task_id=caller.task_id, private=private or key.private, allowed_models=key.models,
                              key_rpm=key.rpm, key_tpm=key.tpm)

    def check_model(self, ctx: RequestContext, model: str) -> None:
        if ctx.allowed_models is not None and model not in ctx.allowed_models:
            raise ModelNotAllowed(f"key {ctx.key_id} may not use model {model!r}; allowed: "
                                  f"{', '.join(ctx.allowed_models)}", param="model")

    def cost_model(self, model: str) -> CostModel:
        return CostModel(self.config.price_of(model))

    def _charges(self, ctx: RequestContext, num_tokens: int) -> list[Charge]:
        charges = []
        if ctx.key_id is not None:
            if ctx.key_rpm:
                charges.append(Charge(f"key:{ctx.key_id}:rpm", ctx.key_rpm, 1, f"requests per minute for key {ctx.key_id}"))
            if ctx.key_tpm:
                charges.append(Charge(f"key:{ctx.key_id}:tpm", ctx.key_tpm, num_tokens,
                                      f"tokens per minute for key {ctx.key_id}"))
        limits = self.config.tenants.get(ctx.tenant) or self.config.tenants.get("*")
        if limits is not None:
            if limits.rpm:
                charges.append(Charge(f"tenant:{ctx.tenant}:rpm", limits.rpm, 1,
                                      f"requests per minute for tenant {ctx.tenant}"))
            if limits.tpm:
                charges.append(Charge(f"tenant:{ctx.tenant}:tpm", limits.tpm, num_tokens,
                                      f"tokens per minute for tenant {ctx.tenant}"))
        return charges

    def _lines(self, ctx: RequestContext) -> list[BudgetLine]:
        budgets = list(self.config.budgets)
        if ctx.task_id is not None and self.config.tasks.max_tokens is not None:
            budgets.append(BudgetConfig(scope="task", id=ctx.task_id, tokens=self.config.tasks.max_tokens,
                                        period="total", mode="hard"))
        return lines_for(budgets, ctx.tenant, ctx.workflow_id, ctx.task_id, time.time())

    async def admit(self, ctx: RequestContext, request_id: str, model: str, prompt_tokens: int, max_tokens: int,
                    num_prompts: int = 1, num_choices_per_prompt: int = 1) -> Admission:
        """Admits a request of `num_prompts` x `num_choices_per_prompt` engine requests (`prompt_tokens` over
        all prompts, `max_tokens` each), or raises a ControlError (and holds nothing)."""
        num_engine = num_prompts * num_choices_per_prompt
        num_output = max_tokens * num_engine
        num_tokens = prompt_tokens * num_choices_per_prompt + num_output
        charges = self._charges(ctx, num_tokens)
        lines = self._lines(ctx)
        cost = self.cost_model(model)
        solo = self.solo_s_per_token_of.get(model, self.solo_s_per_token)()
        need = Amount(cost.worst_case(num_tokens, num_output, solo), num_tokens)
        admission = Admission(self, ctx, request_id, model, f"self-hosted:{model}", prompt_tokens,
                              num_choices_per_prompt, max_tokens, lines, need, charges, None, [])
        # NOTE: the three checks run at once (with Redis: one round trip instead of three); each is atomic on
        # its own, and whichever took something is given back when another refuses.
        limit, call, over = await asyncio.gather(
            self.limiter.take(charges),
            self.tasks.admit_call(ctx.tenant, ctx.task_id) if ctx.task_id is not None else _nothing(),
            self.budgets.reserve(lines, admission.admission_id, need),
            return_exceptions=True)
        failures = [r for r in (limit, call, over) if isinstance(r, BaseException)]
        if failures:
            undo = []
            if not isinstance(limit, BaseException):
                undo.append(self.limiter.give_back(charges))
            if ctx.task_id is not None and not isinstance(call, BaseException):
                undo.append(self.tasks.undo_call(ctx.tenant, ctx.task_id))
            if not isinstance(over, BaseException):
                undo.append(self.budgets.release(lines, admission.admission_id))
            await asyncio.gather(*undo, return_exceptions=True)
            first = failures[0]  # in this order: rate limit, agent task, budget
            if not isinstance(first, ControlError):  # the shared store is down or slow: not the caller's fault
                logger.error("admission of %s failed: %s: %s", request_id, type(first).__name__, first)
                unavailable = ControlUnavailable(f"the control plane's store is unavailable "
                                                 f"({type(first).__name__}); retry shortly", retry_after_s=1.0)
                self.observer.refused(ctx, model, unavailable)
                raise unavailable from first
            self.observer.refused(ctx, model, first)
            raise first
        if any(line.config.mode == "hard" and line.config.usd is not None for line in lines):
            cap = cost.busy_cap_s(need.usd / num_engine)
            admission.busy_s_cap = cap
        for line in over:
            self.num_soft_exceeded += 1
            admission.soft_over.append(line.describe())
            logger.warning("request %s of tenant %s is past a soft budget: %s", request_id, ctx.tenant,
                           line.describe())
            if line.config.fallback is not None:
                admission.max_tokens = min(admission.max_tokens, line.config.fallback.max_tokens)
        self.observer.admitted(admission)
        return admission

    # -- response caches ---------------------------------------------------------------------------------
    async def cached_answer(self, ctx: RequestContext, request) -> CacheHit | None:
        """The exact cache, then the semantic one; None when neither holds an answer (or none is on)."""
        caches = self.caches
        if caches is None:
            return None
        for kind, cache in (("exact", caches.exact), ("semantic", caches.semantic)):
            if not cache.config.enabled:
                continue
            hit = await cache.get(request)
            self.observer.cache_lookup(ctx, kind, hit is not None, hit.saved_usd if hit is not None else 0.0)
            if hit is not None:
                return hit
        return None

    async def record_cache_hit(self, ctx: RequestContext, request_id: str, model: str, hit, prompt_tokens: int,
                               latency_ms: float) -> None:
        """The ledger row of an answer a cache gave: it cost nothing and saved what the original cost."""
        import uuid

        row = LedgerRow(ts=time.time(), request_id=request_id, admission_id=uuid.uuid4().hex, replica=self.replica,
                        tenant=ctx.tenant, key_id=ctx.key_id, workflow=ctx.workflow_id, task=ctx.task_id,
                        model=model, route=f"cache:{hit.kind}", prompt_tokens=prompt_tokens,
                        completion_tokens=hit.response.completion_tokens, cached_tokens=0, cost_usd=0.0, busy_s=0.0,
                        ttft_ms=latency_ms, latency_ms=latency_ms, status="ok", error_code=None, cache=hit.kind,
                        saved_usd=hit.saved_usd)
        await self.ledger.commit_request(row)

    def remember_answer(self, request, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int,
                        cost_usd: float, model: str) -> None:
        """Stores a finished answer in the caches that take it, in the background: the answer does not wait
        for the embedding, and a failure is logged (`track`), never the caller's."""
        if self.caches is None:
            return
        from serving.control.caches import CachedResponse

        answer = CachedResponse(text, finish_reason, prompt_tokens, completion_tokens, cost_usd, model)
        self.track(asyncio.ensure_future(self.caches.store(request, answer)))

    async def release(self, admission: Admission) -> None:
        """The engine took none of it: nothing was spent."""
        await self.budgets.release(admission.lines, admission.admission_id)
        await self.limiter.give_back(admission.charges)
        if admission.ctx.task_id is not None:
            await self.tasks.undo_call(admission.ctx.tenant, admission.ctx.task_id)

    async def settle(self, admission: Admission, actual: Amount) -> None:
        await self.budgets.settle(admission.lines, admission.admission_id, actual)
        unused = [Charge(c.bucket, c.per_minute, max(0, c.amount - actual.tokens), c.what)
                  for c in admission.charges if c.bucket.endswith(":tpm")]
        await self.limiter.give_back([c for c in unused if c.amount])

    # -- what agents and workflows report ----------------------------------------------------------------
    async def report_tool_calls(self, ctx: RequestContext, task_id: str, count: int = 1) -> TaskState:
        if not task_id:
            raise ValueError("task_id must not be empty")
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        state = await self.tasks.add_tool_calls(ctx.tenant, task_id, count)
        await self.ledger.commit_tool_calls({"ts": time.time(), "tenant": ctx.tenant, "task": task_id,
                                             "count": count})
        return state

    async def report_outcome(self, ctx: RequestContext, task_id: str, workflow_id: str | None, outcome: str,
                             quality: float | None) -> None:
        if not task_id:
            raise ValueError("task_id must not be empty")
        if outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {', '.join(OUTCOMES)}, got {outcome!r}")
        if quality is not None and not 0.0 <= quality <= 1.0:
            raise ValueError(f"quality must be in [0, 1], got {quality}")
        state = await self.tasks.get(ctx.tenant, task_id)
        if state.calls == 0:
            raise TaskNotFound(f"task {task_id!r} is unknown: it has made no model call")
        await self.ledger.commit_outcome({"ts": time.time(), "tenant": ctx.tenant, "workflow": workflow_id,
                                          "task": task_id, "outcome": outcome, "quality": quality})
        # NOTE: from the shared ledger, so a task whose calls ran on other replicas is costed in full.
        self.observer.outcome(ctx, outcome, await self._in_thread(queries.task_cost)(ctx.tenant, task_id))

    # -- background --------------------------------------------------------------------------------------
    def _write_engine_time(self) -> None:
        now, busy = time.time(), self.busy_s()
        start, busy_before = self._engine_time_mark
        if start is not None and now > start:
            price = self.config.price_of(self.model_name)
            self.ledger.record_engine_time({"replica": self.replica, "model": self.model_name, "start_ts": start,
                                            "end_ts": now, "busy_s": max(0.0, busy - busy_before),
                                            "usd_per_hour": price.usd_per_hour or 0.0})
        self._engine_time_mark = (now, busy)

    async def _record_engine_time(self) -> None:
        self._write_engine_time()  # marks the start
        while True:
            await asyncio.sleep(ENGINE_TIME_INTERVAL_S)
            self._write_engine_time()

    async def _reconcile(self) -> None:
        find = self._in_thread(queries.costs_of)
        while True:
            await asyncio.sleep(min(RECONCILE_INTERVAL_S, self.config.reservation_ttl_s))
            try:
                counted = await self.budgets.reconcile(find)
                if counted:
                    logger.warning("counted %d requests whose replica died before settling them", counted)
            except Exception:
                logger.exception("reconciling expired reservations failed")
