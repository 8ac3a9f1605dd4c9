"""What the optimizer hands back: the request to send on, and a report of what each step saved."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class StepReport:
    """One enabled step, in the order the steps ran; tokens are whole-prompt chat tokens (tokens.py)."""

    step: str  # whitespace | dedupe | context | trim_history | max_tokens_cap
    applied: bool  # the step changed the request
    tokens_before: int  # prompt tokens when the step started
    tokens_after: int  # prompt tokens when it ended
    note: str  # what it did, or why it did nothing

    @property
    def tokens_saved(self) -> int:
        return self.tokens_before - self.tokens_after


@dataclass(frozen=True, slots=True)
class OptimizationReport:
    tokens_before: int  # the prompt unoptimised: the messages as sent with every context chunk in
    tokens_after: int  # the prompt sent on
    steps: tuple[str, ...]  # the steps that changed the request, in the order they ran
    step_reports: tuple[StepReport, ...]  # every enabled step, in the order they ran
    chunks_kept: tuple[int, ...]  # indices into context_chunks that are in the prompt (all of them without the step)
    chunks_dropped: tuple[int, ...]  # indices into context_chunks left out
    chunk_similarities: tuple[float, ...]  # each chunk's similarity to the question; empty without the step
    num_messages_dropped: int  # messages trim_history left out
    max_tokens_requested: int | None  # the client's max_tokens (None: not set)
    max_tokens: int | None  # max_tokens after the cap
    notes: tuple[str, ...]  # one readable line per enabled step

    @property
    def tokens_saved(self) -> int:
        """Prompt tokens saved by all the steps together (the sum of the steps' tokens_saved)."""
        return self.tokens_before - self.tokens_after


@dataclass(frozen=True, slots=True)
class OptimizedRequest:
    messages: list[dict[str, str]]  # {"role", "content"} for the chat template; fresh copies, the caller's to keep
    max_tokens: int | None  # the completion budget to use (None: the client set none and no cap applies)
    report: OptimizationReport  # what was done and what it saved
