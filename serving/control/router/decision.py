"""The model router: the cheapest route that meets quality, latency, sensitivity and budget, plus the ordered
fallbacks and the cascade plan.

    hard rules (never relaxed): sensitivity (private -> self-hosted only), the tenant tier's routes
    soft rules, in this order: task type, latency target, quality tier (skipped past a soft budget)
    choice: the cheapest route left; ties go to the stronger, then the faster, then the earlier in config

A soft rule that no route left can meet keeps the routes closest to it (the fastest, the strongest) instead of
refusing, and the reason says so. `Router.decide` is called once per request, after admission (which says
whether a soft budget is past) and before the engine or upstream call; with a classifier and no precomputed
complexity it encodes the prompt, which is CPU work: run it off the event loop.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from serving.control.errors import NotPermitted
from serving.control.router.cascade import CascadePlan, plan_for
from serving.control.router.config import RouteConfig, RouterConfig


class NoEligibleRoute(NotPermitted):
    """No route passes the hard rules (sensitivity, tenant tier): nothing may serve this request."""

    code = "no_eligible_route"


@dataclass(frozen=True, slots=True)
class RoutePrice:
    usd_per_m_input: float  # per million prompt tokens
    usd_per_m_output: float  # per million generated tokens


@dataclass(frozen=True, slots=True)
class RouteRequest:
    """What the router reads off one admitted request."""

    tenant: str  # RequestContext.tenant
    private: bool  # RequestContext.private: self-hosted routes only
    prompt: str | None = None  # the text the classifier reads (the last user turn); None: not classified
    task_type: str | None = None  # the x-frugal-task-type header; None: the classifier's guess, if it has one
    latency_target_ms: float | None = None  # routes expected slower than this are skipped
    over_soft_budget: bool = False  # admission found a soft budget past its limit (Admission.soft_over)
    prompt_tokens: int = 0  # for the cost estimate; 0 with max_tokens 0: compare blended prices
    max_tokens: int = 0  # for the cost estimate
    p_complex: float | None = None  # precomputed complexity; None: the router's classifier reads `prompt`
    chat: bool = True  # chat messages (only chat routes take them); False: a plain completion (any route)


@dataclass(frozen=True, slots=True)
class RouteDecision:
    route: RouteConfig  # the route to call first
    reason: str  # why, in words a caller can show or log
    fallbacks: tuple[RouteConfig, ...]  # the next routes to try on an error, open circuit or overload, in order
    p_complex: float | None  # the classifier's complexity score; None: unknown
    required_quality: int | None  # the tier the request needed; None: quality was waived (soft budget)
    task_type: str | None  # the task type the rules used
    estimated_usd: float  # the chosen route's cost estimate for this request
    cascade: CascadePlan | None = None  # escalate after a low-confidence answer; None: no cascade
    relaxed: tuple[str, ...] = ()  # soft rules no route could meet


class Router:
    def __init__(self, config: RouterConfig, classifier=None, embedder=None,
                 price_of: Callable[[RouteConfig], RoutePrice] | None = None):
        """`price_of` prices the routes whose config leaves the price to the caller (a self-hosted route's cost
        per token from the accelerator's price and the engine's throughput). `classifier` is a
        ComplexityClassifier; `embedder` defaults to the process's shared one when a classifier is given."""
        unpriced = [r.id for r in config.routes if not r.priced]
        if unpriced and price_of is None:
            raise ValueError(f"routes {', '.join(unpriced)} have no usd_per_m_input/usd_per_m_output and no "
                             "price_of was given to derive them")
        self.config = config
        self.classifier = classifier
        self.embedder = embedder
        self.price_of = price_of

    @classmethod
    def from_config(cls, config: RouterConfig, embedder=None,
                    price_of: Callable[[RouteConfig], RoutePrice] | None = None) -> Router:
        """Loads `router.classifier_dir` when set (ValueError when it is not a classifier directory)."""
        classifier = None
        if config.classifier_dir is not None:
            from serving.control.router.classifier import ComplexityClassifier

            classifier = ComplexityClassifier.load(config.classifier_dir)
        return cls(config, classifier, embedder, price_of)

    # -- pieces --------------------------------------------------------------------------------------------
    def price(self, route: RouteConfig) -> RoutePrice:
        if route.priced:
            return RoutePrice(route.usd_per_m_input, route.usd_per_m_output)
        return self.price_of(route)

    def estimate_usd(self, route: RouteConfig, prompt_tokens: int, max_tokens: int) -> float:
        price = self.price(route)
        if prompt_tokens == 0 and max_tokens == 0:  # NOTE: no size given: compare one million of each
            return price.usd_per_m_input + price.usd_per_m_output
        return (prompt_tokens * price.usd_per_m_input + max_tokens * price.usd_per_m_output) / 1e6

    def classify(self, prompt: str):
        """The classifier's Complexity for one prompt, or None without a classifier. CPU work."""
        if self.classifier is None:
            return None
        if self.embedder is None:
            from serving.control.embeddings import Embedder

            self.embedder = Embedder.shared()
        return self.classifier.classify([prompt], self.embedder)[0]

    def allowed(self, request: RouteRequest) -> list[RouteConfig]:
        """The routes the hard rules leave, in config order; raises NoEligibleRoute when none is left."""
        routes = list(self.config.routes)
        tier = self.config.tier_of(request.tenant)
        if tier is not None:
            permitted = set(self.config.tiers[tier])
            routes = [r for r in routes if r.id in permitted]
        if request.private:
            routes = [r for r in routes if r.self_hosted]
        if request.chat:
            routes = [r for r in routes if r.chat]
        if not routes:
            what = f"tenant {request.tenant!r}" + (f" (tier {tier!r})" if tier is not None else "")
            if request.private:
                raise NoEligibleRoute(f"no self-hosted route{' taking chat' if request.chat else ''} is open to "
                                      f"{what}, and private data may not leave self-hosted routes")
            raise NoEligibleRoute(f"no route{' taking chat messages' if request.chat else ''} is open to {what}")
        return routes

    # -- the decision --------------------------------------------------------------------------------------
    def decide(self, request: RouteRequest) -> RouteDecision:
        if request.latency_target_ms is not None and request.latency_target_ms <= 0:
            raise ValueError(f"latency_target_ms must be > 0, got {request.latency_target_ms}")
        if request.prompt_tokens < 0 or request.max_tokens < 0:
            raise ValueError("prompt_tokens and max_tokens must be >= 0")
        allowed = self.allowed(request)

        p_complex, task_type, task_source = request.p_complex, request.task_type, "header"
        if (p_complex is None or task_type is None) and request.prompt and self.classifier is not None:
            guess = self.classify(request.prompt)
            if p_complex is None:
                p_complex = guess.p_complex
            if task_type is None and guess.task_type is not None:
                task_type, task_source = guess.task_type, "classifier"
        if p_complex is not None and not 0.0 <= p_complex <= 1.0:
            raise ValueError(f"p_complex must be in [0, 1], got {p_complex}")
        if p_complex is None:  # NOTE: unknown takes the complex tier: a wrong cheap answer costs more than the gap
            required, why_quality = self.config.quality.complex, "complexity unknown"
        elif p_complex >= self.config.complex_threshold:
            required, why_quality = self.config.quality.complex, f"complex (p={p_complex:.2f})"
        else:
            required, why_quality = self.config.quality.simple, f"simple (p={p_complex:.2f})"

        cost = {r.id: self.estimate_usd(r, request.prompt_tokens, request.max_tokens) for r in allowed}
        rules = self._rules(task_type, request.latency_target_ms,
                            None if request.over_soft_budget else required)
        candidates, relaxed = allowed, []
        for name, passes, closest in rules:
            kept = [r for r in candidates if passes(r)]
            if not kept:
                kept = closest(candidates)
                relaxed.append(name)
            candidates = kept

        def order(r: RouteConfig):
            return (cost[r.id], -r.quality, r.max_latency_ms if r.max_latency_ms is not None else float("inf"),
                    self.config.routes.index(r))

        route = min(candidates, key=order)
        # NOTE: fallbacks keep the hard rules and prefer the routes that break the fewest soft ones; among
        # equals the cheapest first, the same order the choice used.
        others = [r for r in allowed if r is not route]
        fallbacks = tuple(sorted(others, key=lambda r: (sum(not passes(r) for _, passes, _ in rules), *order(r))))

        cascade = None
        if self.config.cascade.enabled and not request.over_soft_budget:
            stronger = [r for r in allowed if r.quality > route.quality
                        and all(passes(r) for name, passes, _ in rules if name != "quality")]
            if stronger:
                cascade = plan_for(self.config.cascade, min(stronger, key=order).id)

        parts = []
        if request.private:
            parts.append("private: self-hosted only")
        tier = self.config.tier_of(request.tenant)
        if tier is not None:
            parts.append(f"tier {tier}")
        if task_type is not None:
            parts.append(f"task {task_type} ({task_source})")
        if request.latency_target_ms is not None:
            parts.append(f"latency target {request.latency_target_ms:g} ms")
        if request.over_soft_budget:
            parts.append("past a soft budget: downgraded to the cheapest eligible route")
        else:
            parts.append(f"{why_quality}: needs quality >= {required}")
        for name in relaxed:
            parts.append(f"no route met the {name} rule: kept the closest")
        reason = f"{route.id}: cheapest of {len(candidates)} eligible; " + "; ".join(parts)
        if cascade is not None:
            reason += f"; cascade to {cascade.escalate_to} if unsure"
        return RouteDecision(route, reason, fallbacks, p_complex, None if request.over_soft_budget else required,
                             task_type, cost[route.id], cascade, tuple(relaxed))

    @staticmethod
    def _rules(task_type: str | None, latency_target_ms: float | None, required: int | None) -> list:
        """(name, passes(route), closest(routes)) for each soft rule that applies to this request."""
        rules = []
        if task_type is not None:
            rules.append(("task type", lambda r: not r.task_types or task_type in r.task_types, lambda rs: rs))
        if latency_target_ms is not None:
            def fastest(rs):
                known = [r for r in rs if r.max_latency_ms is not None]
                if not known:
                    return rs
                best = min(r.max_latency_ms for r in known)
                return [r for r in known if r.max_latency_ms == best]
            rules.append(("latency", lambda r: r.max_latency_ms is not None and r.max_latency_ms <= latency_target_ms,
                          fastest))
        if required is not None:
            def strongest(rs):
                best = max(r.quality for r in rs)
                return [r for r in rs if r.quality == best]
            rules.append(("quality", lambda r: r.quality >= required, strongest))
        return rules
