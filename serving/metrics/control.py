"""The control plane's metrics: requests and cost by tenant, workflow and model, refusals, budgets remaining, task
outcomes and what they cost. Tenant and workflow labels are bounded (serving/metrics/labels.py)."""
from __future__ import annotations

import asyncio
import logging
import time

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily

from serving.control.admission import Admission, Settlement
from serving.control.budgets import BudgetLine, lines_for
from serving.control.context import RequestContext
from serving.control.errors import BudgetExceeded, ControlError, RateLimitExceeded
from serving.control.observer import ControlObserver
from serving.control.plane import OUTCOMES
from serving.metrics import names
from serving.metrics.labels import KnownValues

logger = logging.getLogger(__name__)

BUDGET_REFRESH_TIMEOUT_S = 2.0  # a scrape never waits longer than this on the budgets' store


def _refusal_status(error: ControlError) -> str:
    if isinstance(error, RateLimitExceeded):
        return "rate_limited"
    if isinstance(error, BudgetExceeded):
        return "budget_exceeded"
    return error.code


class ControlMetrics(ControlObserver):
    def __init__(self, registry: CollectorRegistry, plane, tenants: KnownValues, workflows: KnownValues,
                 model_names: list[str]):
        self.plane = plane
        self.tenants = tenants
        self.workflows = workflows
        self.requests = Counter(names.REQUESTS.removesuffix("_total"), "Requests by tenant, model and how they "
                                "ended (ok, cancelled, failed, refused by the engine, or refused at admission).",
                                ["tenant", "model_name", "status"], registry=registry)
        self.cost = Counter(names.COST_USD.removesuffix("_total"), "What requests cost, in USD.",
                            ["tenant", "workflow", "model_name"], registry=registry)
        self.rate_limited = Counter(names.RATE_LIMITED.removesuffix("_total"), "Requests refused by a rate limit.",
                                    ["tenant"], registry=registry)
        self.budget_refusals = Counter(names.BUDGET_REFUSALS.removesuffix("_total"),
                                       "Requests refused by a budget (tenant, workflow or agent task).",
                                       ["tenant"], registry=registry)
        tasks = Counter(names.TASKS.removesuffix("_total"), "Tasks whose outcome was reported, by outcome.",
                        ["outcome"], registry=registry)
        task_cost = Counter(names.TASK_COST_USD.removesuffix("_total"),
                            "What the tasks with each outcome cost in all, in USD.", ["outcome"], registry=registry)
        self.tasks = {o: tasks.labels(o) for o in OUTCOMES}
        self.task_cost = {o: task_cost.labels(o) for o in OUTCOMES}
        self.escalations = Counter(names.ESCALATIONS.removesuffix("_total"), "Requests the cascade escalated from "
                                   "an unsure answer of model_name to to_model.", ["model_name", "to_model"],
                                   registry=registry)
        self.fallbacks = Counter(names.ROUTE_FALLBACKS.removesuffix("_total"), "Requests a route (model_name) "
                                 "failed, by kind (timeout, refused, http_status, garbage, circuit_open, queue_full, "
                                 "engine_dead), that went on to the next route.", ["model_name", "kind"],
                                 registry=registry)
        self.model_names = set(model_names)  # NOTE: routes come from the config: a bounded label set
        self.cache_queries, self.cache_hits = {}, {}
        for kind, queries, hits in (("exact", names.EXACT_CACHE_QUERIES, names.EXACT_CACHE_HITS),
                                    ("semantic", names.SEMANTIC_CACHE_QUERIES, names.SEMANTIC_CACHE_HITS)):
            self.cache_queries[kind] = Counter(queries.removesuffix("_total"), f"{kind.title()} response-cache "
                                               "lookups.", registry=registry)
            self.cache_hits[kind] = Counter(hits.removesuffix("_total"), f"{kind.title()} response-cache hits.",
                                            registry=registry)
        invalidations = Counter(names.CACHE_INVALIDATIONS.removesuffix("_total"), "Response-cache invalidations "
                                "over HTTP, by kind: every entry of a tenant, or a tenant's entries with a tag.",
                                ["kind"], registry=registry)
        self.cache_invalidations = {k: invalidations.labels(k) for k in ("tenant", "tag")}
        self.tokens_saved = Counter(names.TOKENS_SAVED.removesuffix("_total"), "Prompt tokens the optimizer "
                                    "removed before requests ran.", ["tenant"], registry=registry)
        self.cache_saved = Counter(names.CACHE_SAVED_USD.removesuffix("_total"), "What response-cache hits saved, "
                                   "in USD (the cost of the answers they reused).", ["tenant"], registry=registry)
        self._lines: dict[str, BudgetLine] = {}  # budget lines with a known subject, by key
        self._remaining: list[tuple[BudgetLine, float | None, int | None]] = []  # the latest refresh
        for budget in plane.config.budgets:
            if budget.scope == "tenant" and budget.id != "*":
                self._track(lines_for([budget], budget.id, None, None, time.time()))

    # -- ControlObserver ---------------------------------------------------------------------------------
    def _tenant(self, ctx: RequestContext) -> str:
        if ctx.key_id is not None and ctx.tenant not in self.tenants:
            self.tenants.add([ctx.tenant])  # a tenant of the key store: it came from an authenticated key
        return self.tenants.label(ctx.tenant)

    def admitted(self, admission: Admission) -> None:
        self._tenant(admission.ctx)
        self._track(admission.lines)

    def refused(self, ctx: RequestContext, model: str, error: ControlError) -> None:
        tenant = self._tenant(ctx)
        self.requests.labels(tenant, model, _refusal_status(error)).inc()
        if isinstance(error, RateLimitExceeded):
            self.rate_limited.labels(tenant).inc()
        elif isinstance(error, BudgetExceeded):
            self.budget_refusals.labels(tenant).inc()

    def settled(self, admission: Admission, settlement: Settlement) -> None:
        ctx = admission.ctx
        tenant = self._tenant(ctx)
        self.requests.labels(tenant, admission.model, settlement.status).inc()
        if settlement.status != "refused" and admission.tokens_saved:
            self.tokens_saved.labels(tenant).inc(admission.tokens_saved)
        if settlement.status != "refused":
            self.cost.labels(tenant, self.workflows.label(ctx.workflow_id), admission.model).inc(settlement.cost_usd)

    def cache_lookup(self, ctx: RequestContext, kind: str, hit: bool, saved_usd: float) -> None:
        self.cache_queries[kind].inc()
        if hit:
            self.cache_hits[kind].inc()
            self.cache_saved.labels(self._tenant(ctx)).inc(saved_usd)

    def cache_invalidated(self, ctx: RequestContext, kind: str, num_removed: int) -> None:
        self.cache_invalidations[kind].inc()

    def fallback(self, ctx: RequestContext, route: str, next_route: str | None, kind: str) -> None:
        self.fallbacks.labels(self._model(route), kind).inc()

    def escalated(self, ctx: RequestContext, route: str, to_route: str) -> None:
        self.escalations.labels(self._model(route), self._model(to_route)).inc()

    def _model(self, route: str) -> str:
        return route if route in self.model_names else "other"

    def outcome(self, ctx: RequestContext, outcome: str, task_cost_usd: float) -> None:
        self.tasks[outcome].inc()
        self.task_cost[outcome].inc(task_cost_usd)

    # -- budgets remaining ---------------------------------------------------------------------------------
    def _track(self, lines: list[BudgetLine]) -> None:
        for line in lines:
            known = self.tenants if line.config.scope == "tenant" else self.workflows
            if line.config.scope == "task" or line.subject not in known or line.tenant not in self.tenants:
                continue  # NOTE: task lines and unknown ids would make the series count unbounded
            self._lines[line.key] = line

    async def refresh(self) -> None:
        """Reads every tracked line's spend and reservations; called before a scrape is rendered."""
        now = time.time()
        current = {}
        for key, line in list(self._lines.items()):
            fresh = lines_for([line.config], line.tenant, line.subject, line.subject, now)
            line = fresh[0] if fresh else line
            current[line.key] = line  # a new period starts a new line
        self._lines = current
        try:
            states = await asyncio.wait_for(
                asyncio.gather(*(self.plane.budgets.state(line) for line in current.values())),
                BUDGET_REFRESH_TIMEOUT_S)
        except Exception as e:  # the store is slow or down: keep the last values, never fail the scrape
            logger.warning("budget metrics not refreshed: %s: %s", type(e).__name__, e)
            return
        remaining = []
        for line, (spent, reserved) in zip(current.values(), states):
            c = line.config
            usd = None if c.usd is None else c.usd - spent.usd - reserved.usd
            tokens = None if c.tokens is None else c.tokens - spent.tokens - reserved.tokens
            remaining.append((line, usd, tokens))
        self._remaining = remaining

    def describe(self):
        return []

    def collect(self):
        labels = ["scope", "tenant", "id", "period"]
        usd = GaugeMetricFamily(names.BUDGET_REMAINING_USD, "What a budget has left in its current period, USD "
                                "(spend and running requests' reservations taken off).", labels=labels)
        tokens = GaugeMetricFamily(names.BUDGET_REMAINING_TOKENS, "What a budget has left in its current period, "
                                   "tokens.", labels=labels)
        for line, left_usd, left_tokens in self._remaining:
            values = [line.config.scope, line.tenant, line.subject, line.period_key]
            if left_usd is not None:
                usd.add_metric(values, left_usd)
            if left_tokens is not None:
                tokens.add_metric(values, left_tokens)
        yield usd
        yield tokens
