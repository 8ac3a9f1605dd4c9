"""Scheduler configuration: one slots dataclass that checks itself when built.

Each component copies the few fields it needs at construction, so a bad value
fails here, with a message naming the field, instead of deep inside a step.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True, kw_only=True)
class SchedulerConfig:
    num_blocks: int  # KV blocks in the pool; size it with num_blocks_from_memory()
    max_model_len: int  # most tokens (prompt + output) one request may hold
    block_size: int = 16  # tokens per KV block
    max_num_seqs: int = 64  # most requests in the running set
    max_num_batched_tokens: int = 512  # token budget of one step, all requests together
    enable_prefix_caching: bool = True  # reuse full KV blocks across requests by content hash
    enable_chunked_prefill: bool = True  # split a prompt that does not fit the step's remaining budget
    max_waiting: int | None = None  # most requests in the waiting queue; None: unbounded
    aging_steps: int | None = 100  # steps after which a waiting request moves up one priority class; None: no aging
    usage_half_life_steps: int = 500  # half-life, in steps, of the per-tenant token usage behind fair share
    tenant_weights: dict[str, float] = field(default_factory=dict)  # tenant_id -> fair-share weight; absent: 1.0

    def __post_init__(self) -> None:
        _check_int("block_size", self.block_size, 1)
        _check_int("num_blocks", self.num_blocks, 1)
        _check_int("max_num_seqs", self.max_num_seqs, 1)
        _check_int("max_num_batched_tokens", self.max_num_batched_tokens, 1)
        _check_int("max_model_len", self.max_model_len, 1)
        _check_bool("enable_prefix_caching", self.enable_prefix_caching)
        _check_bool("enable_chunked_prefill", self.enable_chunked_prefill)
        if self.max_waiting is not None:
            _check_int("max_waiting", self.max_waiting, 1, none_ok=True)
        if self.aging_steps is not None:
            _check_int("aging_steps", self.aging_steps, 1, none_ok=True)
        _check_int("usage_half_life_steps", self.usage_half_life_steps, 1)
        # NOTE: every running request decodes one token a step; a smaller budget
        # would leave some of them unscheduled every step.
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens must be >= max_num_seqs ({self.max_num_seqs}), "
                f"got {self.max_num_batched_tokens}"
            )
        # NOTE: a lone request must always fit, or preemption could not guarantee progress.
        if self.num_blocks < self.max_blocks_per_seq:
            raise ValueError(
                f"num_blocks must be >= {self.max_blocks_per_seq} (max_model_len {self.max_model_len} "
                f"/ block_size {self.block_size}, rounded up), got {self.num_blocks}"
            )
        for tenant_id, weight in self.tenant_weights.items():
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
                raise ValueError(f"tenant_weights[{tenant_id!r}] must be a number > 0, got {weight!r}")

    @property
    def max_blocks_per_seq(self) -> int:
        return -(-self.max_model_len // self.block_size)


def num_blocks_from_memory(budget_bytes: int, bytes_per_block: int) -> int:
    """How many KV blocks fit in a memory budget.

    Called by the engine once at start, after it measured free device memory;
    the engine owns the per-block formula (it knows layers, heads and dtype).
    """
    _check_int("budget_bytes", budget_bytes, 0)
    _check_int("bytes_per_block", bytes_per_block, 1)
    num_blocks = budget_bytes // bytes_per_block
    if num_blocks < 1:
        raise ValueError(
            f"budget_bytes ({budget_bytes}) holds no KV block of {bytes_per_block} bytes; "
            f"give the KV cache at least {bytes_per_block} bytes"
        )
    return num_blocks


def _check_int(name: str, value: object, minimum: int, none_ok: bool = False) -> None:
    # bool is an int subclass; True as a block count is a bug, not a 1.
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        allowed = f"an int >= {minimum}" + (" or None" if none_ok else "")
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def _check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
