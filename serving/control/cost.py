"""What a request costs, and the most it can cost.

Self-hosted models are priced by accelerator time: a request pays its share of every engine step it was in
(`RequestMetrics.busy_s`, the step's wall time split by the tokens each request computed) at the configured
price per hour. Over any period the request costs add up to price x busy time; the rest of the uptime is idle
cost, reported on its own line. Models priced by tokens (an external API, or a fixed internal rate) pay per
million prompt, cached prompt and generated tokens.

The worst case, reserved against budgets at admission, is every prompt and every allowed output token at the
dearest a token gets: a lone decode step (`StepAccounting.solo_s_per_token`), with a margin. A request whose
share of step time reaches what was reserved for it is stopped by the engine (`busy_s_cap`), so the
reservation is a bound, not a guess.
"""
from __future__ import annotations

from dataclasses import dataclass

from serving.control.config import ModelPrice

# NOTE: a lone decode is the dearest step a token gets; twice its recent cost leaves room for a slower moment
# (another process on the machine, a longer context) before the busy-time cap has to stop a request.
SAFETY = 2.0
DEFAULT_S_PER_TOKEN = 0.05  # before the engine has measured a small step: 50 ms a token


@dataclass(frozen=True, slots=True)
class CostModel:
    price: ModelPrice

    @property
    def usd_per_s(self) -> float:
        return (self.price.usd_per_hour or 0.0) / 3600.0

    def actual(self, busy_s: float, prompt_tokens: int, cached_tokens: int, completion_tokens: int) -> float:
        p = self.price
        if not p.by_tokens:
            return busy_s * self.usd_per_s
        cached_price = p.usd_per_m_cached_input if p.usd_per_m_cached_input is not None else p.usd_per_m_input
        return ((prompt_tokens - cached_tokens) * p.usd_per_m_input + cached_tokens * cached_price
                + completion_tokens * p.usd_per_m_output) / 1e6

    def worst_case(self, num_tokens: int, num_output_tokens: int, solo_s_per_token: float | None) -> float:
        """The most `num_tokens` (prompts and outputs, of which `num_output_tokens` generated) can cost."""
        p = self.price
        if p.by_tokens:
            return ((num_tokens - num_output_tokens) * p.usd_per_m_input + num_output_tokens * p.usd_per_m_output) / 1e6
        return num_tokens * self.worst_s_per_token(solo_s_per_token) * self.usd_per_s

    @staticmethod
    def worst_s_per_token(solo_s_per_token: float | None) -> float:
        return SAFETY * (solo_s_per_token if solo_s_per_token else DEFAULT_S_PER_TOKEN)

    def busy_cap_s(self, reserved_usd: float) -> float | None:
        """Step time a request may take for `reserved_usd`; None when its price is not by time (or free)."""
        if self.price.by_tokens or self.usd_per_s <= 0:
            return None
        return reserved_usd / self.usd_per_s
