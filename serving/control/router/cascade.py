"""The cascade's one decision: after the cheaper route answered, is it good enough, or does the request go on to
the stronger route? A pure function of the answer's token logprobs (or, without them, the classifier's belief),
so the caller owns the calls and this owns the policy."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from serving.control.router.config import CascadeConfig


@dataclass(frozen=True, slots=True)
class CascadePlan:
    """Part of a RouteDecision: where to escalate, and the bar the first answer must clear."""

    escalate_to: str  # the route id to try when the first answer is not confident enough
    min_mean_logprob: float  # the first answer's mean token logprob must reach this
    min_classifier_confidence: float | None  # without logprobs: p(simple) must reach this; None: accept


@dataclass(frozen=True, slots=True)
class Escalation:
    escalate: bool  # send the request on to plan.escalate_to
    reason: str  # for logs and the response's route field
    mean_logprob: float | None  # the measured confidence; None when the classifier decided


def plan_for(config: CascadeConfig, escalate_to: str) -> CascadePlan:
    return CascadePlan(escalate_to, config.min_mean_logprob, config.min_classifier_confidence)


def should_escalate(plan: CascadePlan | None, logprobs: Sequence[float] | None = None,
                    p_complex: float | None = None) -> Escalation:
    """Called once the first route answered. `logprobs`: the chosen token's logprob at each generated position
    (the engine's, or the provider's `logprobs`); `p_complex`: the classifier's probability, used only when the
    answer came without logprobs."""
    if plan is None:
        return Escalation(False, "no cascade for this request", None)
    if logprobs:
        bad = [lp for lp in logprobs if not math.isfinite(lp) or lp > 0]
        if bad:
            raise ValueError(f"logprobs must be finite and <= 0, got {bad[0]!r}")
        mean = sum(logprobs) / len(logprobs)
        if mean < plan.min_mean_logprob:
            return Escalation(True, f"mean token logprob {mean:.3f} < {plan.min_mean_logprob:.3f}: escalating to "
                                    f"{plan.escalate_to}", mean)
        return Escalation(False, f"mean token logprob {mean:.3f} >= {plan.min_mean_logprob:.3f}: answer kept", mean)
    if p_complex is not None and plan.min_classifier_confidence is not None:
        confidence = 1.0 - p_complex
        if confidence < plan.min_classifier_confidence:
            return Escalation(True, f"no logprobs; classifier p(simple) {confidence:.3f} < "
                                    f"{plan.min_classifier_confidence:.3f}: escalating to {plan.escalate_to}", None)
        return Escalation(False, f"no logprobs; classifier p(simple) {confidence:.3f} >= "
                                 f"{plan.min_classifier_confidence:.3f}: answer kept", None)
    # NOTE: with nothing to judge by, the answer stands: escalating blind would make every cascade pay twice.
    return Escalation(False, "no logprobs and no classifier bar: answer kept", None)
