"""Turns the logits of one step into next tokens, one row per sampled sequence.

Greedy rows take the argmax. Other rows apply temperature, top-k and top-p, then draw with the exponential
race (argmax of p / E with E ~ Exp(1)), which equals sampling from p. A request with a seed owns a
torch.Generator, so its tokens do not depend on what else shares the batch.

What belongs to one row (its stop-token mask, its generator's draw, its logprobs) runs inside that row's own
guard: an exception there is reported for that row in `SamplerOutput.errors` and the other rows go on. The
batched tensor ops treat every row alike; if one of them raises, nobody can be blamed and the caller fails the
step.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from serving.engine.faults import InjectedFault
from serving.engine.sampling_params import SamplingParams


@dataclass(slots=True)
class SamplingState:
    params: SamplingParams  # the request's parameters
    stop_ids: list[int]  # EOS (unless ignored) and stop_token_ids; blocked until min_tokens
    generator: torch.Generator | None = None  # set when params.seed is given
    num_output_tokens: int = 0  # tokens generated so far
    inject_fault: bool = False  # tests: this row's sampling raises (serving/engine/faults.py)


@dataclass(slots=True)
class SamplerOutput:
    token_ids: list[int]  # one per row; meaningless for a row in `errors`
    logprobs: list[list[tuple[int, float]]] | None = None  # per row: chosen first, then top-n
    errors: dict[int, Exception] = field(default_factory=dict)  # row -> what failed in that row's own work


def make_sampling_state(params: SamplingParams, eos_token_ids: list[int], device: torch.device) -> SamplingState:
    stop_ids = list(params.stop_token_ids) + ([] if params.ignore_eos else list(eos_token_ids))
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(params.seed)
    return SamplingState(params=params, stop_ids=stop_ids, generator=generator)


def sample(logits: torch.Tensor, states: list[SamplingState]) -> SamplerOutput:
    """logits: [S, V] float32, one row per state. Mutates logits."""
    errors: dict[int, Exception] = {}
    for i, st in enumerate(states):
        try:
            if st.inject_fault:
                raise InjectedFault("injected sampling failure")
            if st.num_output_tokens < st.params.min_tokens and st.stop_ids:
                logits[i, st.stop_ids] = float("-inf")
        except Exception as e:
            errors[i] = e
    want_logprobs = any(st.params.logprobs is not None for st in states)
    logprobs_all = torch.log_softmax(logits, dim=-1) if want_logprobs else None

    greedy = [st.params.greedy for st in states]
    if all(greedy):
        token_ids = logits.argmax(dim=-1)
    else:
        token_ids = _sample_random(logits, states, greedy, errors)
    tokens = token_ids.tolist()
    logprobs = _gather_logprobs(logprobs_all, tokens, states, errors) if want_logprobs else None
    return SamplerOutput(token_ids=tokens, logprobs=logprobs, errors=errors)


def _sample_random(logits: torch.Tensor, states: list[SamplingState], greedy: list[bool],
                   errors: dict[int, Exception]) -> torch.Tensor:
    device = logits.device
    greedy_ids = logits.argmax(dim=-1)
    temps = torch.tensor([1.0 if g else st.params.temperature for g, st in zip(greedy, states)], device=device)
    scaled = logits / temps.unsqueeze(1)
    top_ks = [st.params.top_k for st in states]
    if any(top_ks):
        vocab = scaled.shape[1]
        ks = torch.tensor([k if 0 < k < vocab else vocab for k in top_ks], device=device)
        max_k = int(ks.max())
        kth = scaled.topk(max_k, dim=-1).values.gather(1, (ks - 1).unsqueeze(1))
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    top_ps = [st.params.top_p for st in states]
    if any(p < 1.0 for p in top_ps):
        ps = torch.tensor(top_ps, device=device).unsqueeze(1)
        sorted_logits, order = scaled.sort(dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the mass before it already reaches p; the top token always stays.
        drop = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= ps
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        scaled = torch.empty_like(scaled).scatter_(1, order, sorted_logits)
    probs = scaled.softmax(dim=-1)
    noise = torch.ones_like(probs)
    unseeded = []
    for i, st in enumerate(states):
        if greedy[i] or i in errors:
            continue
        if st.generator is None:
            unseeded.append(i)
            continue
        try:
            noise[i].exponential_(generator=st.generator)
        except Exception as e:
            errors[i] = e
    if unseeded:
        rows = torch.tensor(unseeded, device=device)
        noise[rows] = torch.empty((len(unseeded), probs.shape[1]), device=device).exponential_()
    sampled = (probs / noise).argmax(dim=-1)
    return torch.where(torch.tensor(greedy, device=device), greedy_ids, sampled)


def _gather_logprobs(logprobs_all: torch.Tensor, tokens: list[int], states: list[SamplingState],
                     errors: dict[int, Exception]) -> list[list[tuple[int, float]]]:
    out: list[list[tuple[int, float]]] = []
    max_n = max((st.params.logprobs or 0) for st in states)
    top = logprobs_all.topk(max_n, dim=-1) if max_n else None
    chosen = logprobs_all.gather(1, torch.tensor(tokens, device=logprobs_all.device).unsqueeze(1)).squeeze(1).tolist()
    for i, st in enumerate(states):
        if st.params.logprobs is None or i in errors:
            out.append([])
            continue
        try:
            row = [(tokens[i], chosen[i])]
            if top is not None and st.params.logprobs:
                n = st.params.logprobs
                row += list(zip(top.indices[i, :n].tolist(), top.values[i, :n].tolist()))
        except Exception as e:
            errors[i] = e
            row = []
        out.append(row)
    return out
