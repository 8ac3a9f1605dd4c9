"""The prompt optimizer on the gRPC path: the tenant's and route's plan over a chat call, as on HTTP chat.

Runs after the checks that need no tokenizer and before the cache lookup, so the caches key on the prompt that is
actually sent. Context chunks always go into the last user message; with a `context` step only the most relevant
ones that fit its budget do (serving/control/optimizer/).
"""
from __future__ import annotations

from serving.control.optimizer import OptimizedRequest, OptimizerPlan, optimize, tokenizer_counter
from serving.server_state import ServerState

_NO_STEPS = OptimizerPlan(whitespace=False, dedupe=False, context=None, trim_history=None, max_tokens_cap=None)


async def optimize_chat(state: ServerState, tenant: str, messages: list[dict],
                        context_chunks: list[str]) -> OptimizedRequest | None:
    """The optimizer's result, or None when it has nothing to do: no step applies to this tenant and route, and no
    context chunks came. Raises ValueError starting with the field path (`context_chunks ...`, `chat.messages ...`).
    """
    config = state.optimizer
    plan = config.plan_for(tenant, f"self-hosted:{state.model_name}") if config is not None else None
    if not context_chunks and (plan is None or not plan.enabled_steps):
        return None
    plan = plan or _NO_STEPS
    try:
        # NOTE: on a tokenizer worker: token counts and (with chunks to rank) embeddings stay off the event loop.
        return await state.tokenizers.run(
            lambda tok: optimize(messages, plan, tokenizer_counter(tok), context_chunks=context_chunks or None))
    except ValueError as e:
        message = str(e)
        raise ValueError(message if message.startswith("context_chunks") else f"chat.{message}") from None
