"""The prompt and context optimizer: opt-in steps per tenant or route that make a chat request cheaper.

    plan = optimizer_config(raw["optimizer"]).plan_for(ctx.tenant, route)
    result = optimize(messages, plan, tokenizer_counter(tokenizer), max_tokens=..., context_chunks=...)
    result.messages, result.max_tokens, result.report.tokens_saved
"""
from serving.control.optimizer.config import (ContextConfig, OptimizerConfig, OptimizerPlan, OptimizerSteps,
                                              TrimHistoryConfig, optimizer_config)
from serving.control.optimizer.pipeline import optimize
from serving.control.optimizer.report import OptimizationReport, OptimizedRequest, StepReport
from serving.control.optimizer.tokens import (MESSAGE_OVERHEAD_TOKENS, REPLY_PRIMING_TOKENS, count_chat_tokens,
                                              tokenizer_counter)

__all__ = ["ContextConfig", "MESSAGE_OVERHEAD_TOKENS", "OptimizationReport", "OptimizedRequest", "OptimizerConfig",
           "OptimizerPlan", "OptimizerSteps", "REPLY_PRIMING_TOKENS", "StepReport", "TrimHistoryConfig",
           "count_chat_tokens", "optimize", "optimizer_config", "tokenizer_counter"]
