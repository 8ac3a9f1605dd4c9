"""Per-request sampling parameters, validated whole at construction so bad input never reaches the engine loop.

Every field is checked for its type and its range (a bool is not an integer here, a float must be finite, a seed
fits torch's 64-bit generator), and the message starts with the field's name so both front ends can say which
request field was wrong. What depends on the model (token ids inside the vocabulary) is checked by the engine.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

# torch.Generator.manual_seed takes a signed or unsigned 64-bit value.
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
MAX_LOGPROBS = 20  # top alternatives the sampler returns per token


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(slots=True)
class SamplingParams:
    max_tokens: int = 16  # most tokens to generate
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0  # nucleus mass in (0, 1]
    top_k: int = 0  # keep the k most likely tokens; 0 or -1 keeps all
    seed: int | None = None  # per-request seed: the same seed gives the same tokens
    min_tokens: int = 0  # EOS and stop token ids are blocked until this many tokens exist
    ignore_eos: bool = False  # keep generating past EOS (benchmarks)
    stop: list[str] = field(default_factory=list)  # stop strings; the text is cut before the match
    stop_token_ids: list[int] = field(default_factory=list)  # extra tokens that end generation
    include_stop_str_in_output: bool = False  # keep the matched stop string in the text
    logprobs: int | None = None  # return the chosen token's logprob and this many top alternatives
    skip_special_tokens: bool = True  # leave special tokens out of the text

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) for s in self.stop):
            raise ValueError(f"stop must be a string or a list of strings, got {_short(self.stop)}")
        if any(s == "" for s in self.stop):
            raise ValueError("stop strings must not be empty")
        self.stop = list(self.stop)
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {_short(self.max_tokens)}")
        if not _is_real(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {_short(self.temperature)}")
        if not _is_real(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {_short(self.top_p)}")
        if self.top_k == -1:
            self.top_k = 0
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 or -1 disables it), got {_short(self.top_k)}")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise ValueError(f"min_tokens must be an integer >= 0, got {_short(self.min_tokens)}")
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        if not isinstance(self.stop_token_ids, (list, tuple)) or \
                not all(_is_int(t) and t >= 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be non-negative integers, got {_short(self.stop_token_ids)}")
        self.stop_token_ids = list(self.stop_token_ids)
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise ValueError(f"logprobs must be an integer in [0, {MAX_LOGPROBS}], got {_short(self.logprobs)}")
        if self.seed is not None and (not _is_int(self.seed) or not SEED_MIN <= self.seed <= SEED_MAX):
            raise ValueError(f"seed must be an integer in [-2**63, 2**64 - 1], got {_short(self.seed)}")
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {_short(getattr(self, name))}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _short(value, limit: int = 80) -> str:
    """repr() cut to `limit` characters: an error message never echoes a huge field back."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"
