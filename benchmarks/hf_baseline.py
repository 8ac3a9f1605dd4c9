"""The transformers baseline: static batches, left padding, greedy, the same prompts and output lengths.

This is what serving with plain `model.generate` looks like: requests wait for their batch, and a batch runs
until its longest request is done. Every request arrives at t0, as in the engine phase.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.generation.streamers import BaseStreamer

from benchmarks.metrics import PeakRSS, PhaseResult
from benchmarks.sharegpt import SampledRequest


class FirstTokenClock(BaseStreamer):
    """Timestamps the first generated step of a `generate` call.

    `generate` puts the prompt first, then one token per sequence per step, so the second put is the first
    token of every sequence in the batch.
    """

    def __init__(self):
        self.num_puts = 0
        self.first_token_time: float | None = None  # time.monotonic() of the first generated step

    def put(self, value) -> None:
        self.num_puts += 1
        if self.num_puts == 2:
            self.first_token_time = time.monotonic()

    def end(self) -> None:
        pass


def _from_pretrained_args(model_path: str | Path) -> tuple[Path, dict]:
    model_path = Path(model_path)
    if model_path.suffix == ".gguf":
        return model_path.parent, {"gguf_file": model_path.name}
    return model_path, {}


def load_tokenizer(model_path: str | Path):
    """The transformers tokenizer of a GGUF file or a model directory."""
    source, kwargs = _from_pretrained_args(model_path)
    return AutoTokenizer.from_pretrained(source, **kwargs)


def load_model(model_path: str | Path):
    """The reference model from the same file the engine serves, dequantized to float32."""
    source, kwargs = _from_pretrained_args(model_path)
    return AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, **kwargs).eval()


def _generate(model, tokenizer, prompts: list[list[int]], num_new_tokens: int, streamer=None) -> torch.Tensor:
    batch = tokenizer.pad({"input_ids": prompts}, padding=True, padding_side="left", return_tensors="pt")
    # NOTE: min_new_tokens == max_new_tokens masks EOS, so every batch does the same work as the engine's
    # ignore_eos requests; greedy tokens after a masked EOS differ from the engine's, their cost does not.
    with torch.inference_mode():
        out = model.generate(
            **batch,
            do_sample=False,
            max_new_tokens=num_new_tokens,
            min_new_tokens=num_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            streamer=streamer,
        )
    return out[:, batch["input_ids"].shape[1] :]


def run_hf_baseline(model_path: str | Path, tokenizer, requests: list[SampledRequest], batch_size: int) -> PhaseResult:
    """Load the model, warm it up, then serve `requests` in arrival order in static batches of `batch_size`.

    The peak memory covers loading the model, as the engine's does.
    """
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    with PeakRSS() as mem:
        model = load_model(model_path)
        _generate(model, tokenizer, [r.prompt_token_ids for r in requests[:2]], 2)  # warm-up, not timed

        ttft_s, tpot_s = [], []
        t0 = time.monotonic()
        for start in range(0, len(requests), batch_size):
            batch = requests[start : start + batch_size]
            num_new_tokens = max(r.output_len for r in batch)
            clock = FirstTokenClock()
            generated = _generate(model, tokenizer, [r.prompt_token_ids for r in batch], num_new_tokens, clock)
            finish_time = time.monotonic()
            if generated.shape[1] != num_new_tokens:
                raise RuntimeError(f"generate returned {generated.shape[1]} tokens, asked for {num_new_tokens}")
            decode_tpot = (finish_time - clock.first_token_time) / max(num_new_tokens - 1, 1)
            ttft_s += [clock.first_token_time - t0] * len(batch)
            tpot_s += [decode_tpot] * len(batch)
        duration_s = time.monotonic() - t0
        del model

    return PhaseResult(
        name=f"transformers b={batch_size}",
        num_requests=len(requests),
        num_prompt_tokens=sum(r.prompt_len for r in requests),
        num_output_tokens=sum(r.output_len for r in requests),
        duration_s=duration_s,
        ttft_s=ttft_s,
        tpot_s=tpot_s,
        peak_rss_bytes=mem.peak_bytes,
        peak_rss_delta_bytes=mem.delta_bytes,
    )
