"""The offline API, shaped like vLLM's: `LLM(model).generate(prompts, params)` and `LLM.chat(...)`."""
from __future__ import annotations

from typing import Sequence

from serving.config import EngineConfig
from serving.engine.chat import chat_prompt_ids
from serving.engine.llm_engine import LLMEngine
from serving.engine.outputs import RequestOutput
from serving.engine.sampling_params import SamplingParams

Prompt = str | list[int] | dict
# NOTE: the offline twin of the daemon's watchdog: a scheduler that fails every step would otherwise spin forever.
MAX_CONSECUTIVE_FAILED_STEPS = 5


class LLM:
    """Loads a model (the bundled SmolLM2-135M-Instruct when `model` is None) and runs batches to completion.

    Keyword arguments are EngineConfig fields (max_num_seqs, max_num_batched_tokens, enable_prefix_caching, ...).
    """

    def __init__(self, model: str | None = None, *, loaded=None, **kwargs):
        # `loaded` (a serving.loaders.LoadedModel) lets several engines share one set of weights.
        self.engine = LLMEngine(EngineConfig(model=model, **kwargs), loaded=loaded)
        self.tokenizer = self.engine.tokenizer

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 priority: int | Sequence[int] | None = None, tenant_id: str = "default") -> list[RequestOutput]:
        """Runs every prompt to completion; outputs come back in prompt order.

        A prompt is text (tokenized as the tokenizer's default call does), a list of token ids, or a dict with
        "prompt" or "prompt_token_ids". `sampling_params` is one for all prompts or a list with one per prompt.
        """
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        params = self._per_prompt(sampling_params or SamplingParams(), len(prompts), "sampling_params")
        priorities = self._per_prompt(1 if priority is None else priority, len(prompts), "priority")
        # Validate everything before queueing anything, so a bad prompt leaves the engine untouched.
        for p in params:
            if not isinstance(p, SamplingParams):
                raise ValueError(f"sampling_params must be SamplingParams, got {type(p).__name__}")
        req_ids = []
        try:
            for prompt, p, prio in zip(prompts, params, priorities):
                req_ids.append(self.engine.add_request(prompt, p, priority=prio, tenant_id=tenant_id))
        except Exception:
            for req_id in req_ids:
                self.engine.abort_request(req_id)
            raise
        return self._run(req_ids)

    def chat(self, messages: list[dict] | Sequence[list[dict]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             add_generation_prompt: bool = True) -> list[RequestOutput]:
        """Applies the model's chat template to one conversation or a list of them, then generates."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [{"prompt_token_ids": self.apply_chat_template(c, add_generation_prompt)} for c in conversations]
        return self.generate(prompts, sampling_params)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        return chat_prompt_ids(self.tokenizer, messages, add_generation_prompt)

    def _run(self, req_ids: list[str]) -> list[RequestOutput]:
        wanted = set(req_ids)
        finished: dict[str, RequestOutput] = {}
        while len(finished) < len(req_ids):
            for out in self.engine.step():
                if out.finished and out.req_id in wanted:
                    finished[out.req_id] = out
            if not self.engine.has_unfinished_requests() and len(finished) < len(req_ids):
                raise RuntimeError("engine went idle with requests unfinished")
            num_failed = self.engine.stats().steps.num_consecutive_failed_steps
            if num_failed >= MAX_CONSECUTIVE_FAILED_STEPS:
                self.engine.abort_all("the engine failed step after step")
                raise RuntimeError(f"the engine failed {num_failed} steps in a row (the log says why)")
        return [finished[r] for r in req_ids]

    @staticmethod
    def _per_prompt(value, n: int, name: str) -> list:
        if isinstance(value, (list, tuple)):
            if len(value) != n:
                raise ValueError(f"{name} has {len(value)} entries for {n} prompts")
            return list(value)
        return [value] * n
