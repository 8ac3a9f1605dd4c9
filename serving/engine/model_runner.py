"""Executes one scheduled step: builds the flat batch and attention metadata, runs the model, samples.

The runner owns the paged KV cache tensors; the scheduler owns which blocks belong to whom. They meet only
through `SchedulerOutput` (block tables per sequence) and `ModelRunnerOutput`.
"""
from __future__ import annotations

import logging

import torch

from kernels.cpu_ops import cpu_kernels, fused_ops
from kernels.paged_attention import AttentionMetadata, PrefillChunk
from scheduler.output import ModelRunnerOutput, ScheduledSeq, SchedulerOutput
from serving.engine.sampler import SamplingState, sample
from serving.models.llama import LlamaForCausalLM, ModelArgs

logger = logging.getLogger(__name__)


def kv_bytes_per_block(args: ModelArgs, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one block of KV costs across all layers (K and V)."""
    element_size = torch.empty((), dtype=dtype).element_size()
    return 2 * args.num_layers * block_size * args.num_kv_heads * args.head_dim * element_size


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, num_blocks: int, block_size: int, device: torch.device,
                 kv_dtype: torch.dtype):
        self.model = model
        self.args = model.args
        self.block_size = block_size
        self.device = device
        shape = (num_blocks, block_size, self.args.num_kv_heads, self.args.head_dim)
        # NOTE: the torch decode path gathers whole blocks and masks the unwritten slots; a masked NaN would still
        # poison the softmax, so it needs zeroed memory. The CPU kernel and the prefill path only read written
        # slots, so there the cache is left unzeroed: the OS maps pages as they are first written, and a large
        # budget costs neither start-up time nor resident memory until it is used. A model with sliding-window
        # layers takes the torch path for decodes past the window, so its cache is zeroed as well.
        kernel_only = not getattr(model, "has_sliding_window", False)
        alloc = torch.empty if device.type == "cpu" and kv_dtype == torch.float32 and cpu_kernels() and kernel_only \
            else torch.zeros
        if device.type == "cpu":
            fused_ops()  # built (first use on this machine) or loaded now, not inside the first request's time
        # One (K, V) pair per layer: [num_blocks, block_size, num_kv_heads, head_dim]
        self.kv_caches = [(alloc(shape, dtype=kv_dtype, device=device), alloc(shape, dtype=kv_dtype, device=device))
                          for _ in range(self.args.num_layers)]

    def build_batch(self, seqs: list[ScheduledSeq]) -> tuple[torch.Tensor, AttentionMetadata, list[ScheduledSeq]]:
        """Lays the step's tokens end to end, single-token sequences first. Returns the input ids, the metadata
        and the sampled sequences in logits order."""
        bs = self.block_size
        decodes = [s for s in seqs if s.num_tokens == 1]
        prefills = [s for s in seqs if s.num_tokens > 1]
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        logits_indices: list[int] = []
        sampled: list[ScheduledSeq] = []
        for seq in decodes + prefills:
            start = len(input_ids)
            input_ids.extend(seq.token_ids)
            table = seq.block_ids
            for pos in range(seq.start_pos, seq.start_pos + seq.num_tokens):
                positions.append(pos)
                slots.append(table[pos // bs] * bs + pos % bs)
            if seq.sample:
                logits_indices.append(start + seq.num_tokens - 1)
                sampled.append(seq)

        dev = self.device
        meta = AttentionMetadata(
            positions=torch.tensor(positions, dtype=torch.int64, device=dev),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            logits_indices=torch.tensor(logits_indices, dtype=torch.int64, device=dev),
            block_size=bs,
            num_decode_tokens=len(decodes),
        )
        if decodes:
            context_lens = [s.start_pos + 1 for s in decodes]
            max_blocks = (max(context_lens) + bs - 1) // bs
            tables = [s.block_ids[:max_blocks] + [0] * (max_blocks - len(s.block_ids[:max_blocks])) for s in decodes]
            meta.decode_block_tables = torch.tensor(tables, dtype=torch.int64, device=dev)
            meta.decode_context_lens = torch.tensor(context_lens, dtype=torch.int64, device=dev)
        offset = len(decodes)
        for seq in prefills:
            end = offset + seq.num_tokens
            num_blocks = (seq.start_pos + seq.num_tokens + bs - 1) // bs
            table = torch.tensor(seq.block_ids[:num_blocks], dtype=torch.int64, device=dev)
            meta.prefills.append(PrefillChunk(offset, end, seq.start_pos, table))
            offset = end
        ids = torch.tensor(input_ids, dtype=torch.int64, device=dev)
        return ids, meta, sampled

    @torch.inference_mode()
    def execute(self, sched_out: SchedulerOutput, states: dict[str, SamplingState]) -> ModelRunnerOutput:
        input_ids, meta, sampled = self.build_batch(sched_out.seqs)
        hidden = self.model(input_ids, meta, self.kv_caches)
        if not sampled:
            return ModelRunnerOutput(sampled_token_ids={})
        logits = self.model.compute_logits(hidden)
        rows = [states[s.req_id] for s in sampled]
        out = sample(logits, rows)
        errors = {sampled[i].req_id: f"{type(e).__name__}: {e}" for i, e in out.errors.items()}
        sampled_ids = {s.req_id: t for s, t in zip(sampled, out.token_ids) if s.req_id not in errors}
        logprobs = {}
        if out.logprobs is not None:
            logprobs = {s.req_id: lp for s, lp in zip(sampled, out.logprobs) if lp and s.req_id not in errors}
        return ModelRunnerOutput(sampled_token_ids=sampled_ids, logprobs=logprobs, errors=errors)
