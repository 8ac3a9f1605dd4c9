"""The model router: rules and the cheapest eligible route (decision), the learned complexity classifier
(classifier, training) and the cascade's escalation (cascade). Configured by `router:` in frugal.yaml (config)."""
from serving.control.router.cascade import CascadePlan, Escalation, should_escalate
from serving.control.router.config import CascadeConfig, QualityConfig, RouteConfig, RouterConfig, router_config
from serving.control.router.decision import NoEligibleRoute, RouteDecision, RoutePrice, Router, RouteRequest

__all__ = ["CascadeConfig", "CascadePlan", "Escalation", "NoEligibleRoute", "QualityConfig", "RouteConfig",
           "RouteDecision", "RoutePrice", "RouteRequest", "Router", "RouterConfig", "router_config", "should_escalate"]
