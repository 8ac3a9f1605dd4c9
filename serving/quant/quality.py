"""The quantization quality gate: perplexity and greedy agreement of a quantized model against its reference.

Both models read the same held-out texts in one teacher-forced forward each (our paged model with a scratch
KV cache), so the comparison costs two prefills per text, not a generation loop. Greedy agreement is the
share of positions whose argmax next token is the same in both models.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kernels.paged_attention import AttentionMetadata, PrefillChunk

_BLOCK_SIZE = 16  # tokens per block of the scratch KV cache


@dataclass(slots=True)
class QualityReport:
    """What `evaluate` measured; `ppl_increase` is what the gate compares with its threshold."""

    reference_ppl: float  # perplexity of the reference (unquantized) model on the texts
    quantized_ppl: float  # perplexity of the quantized model on the same tokens
    greedy_agreement: float  # share of positions where both models' argmax next token is the same
    num_texts: int  # texts evaluated
    num_tokens: int  # predicted positions counted

    @property
    def ppl_increase(self) -> float:
        """Relative perplexity rise, e.g. 0.012 for +1.2%."""
        return self.quantized_ppl / self.reference_ppl - 1

    def summary(self) -> str:
        return (f"perplexity {self.reference_ppl:.3f} -> {self.quantized_ppl:.3f} ({100 * self.ppl_increase:+.2f}%), "
                f"greedy agreement {100 * self.greedy_agreement:.1f}% over {self.num_tokens} tokens "
                f"of {self.num_texts} texts")


@torch.inference_mode()
def prompt_logits(model, token_ids: list[int]) -> torch.Tensor:
    """fp32 logits [T, vocab] for every position of one sequence, in a single prefill."""
    args = model.args
    num_tokens = len(token_ids)
    device = next(model.parameters()).device
    num_blocks = (num_tokens + _BLOCK_SIZE - 1) // _BLOCK_SIZE
    dtype = model.norm.weight.dtype
    shape = (num_blocks, _BLOCK_SIZE, args.num_kv_heads, args.head_dim)
    kv_caches = [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
                 for _ in range(args.num_layers)]
    positions = torch.arange(num_tokens, device=device)
    meta = AttentionMetadata(positions=positions, slot_mapping=positions, logits_indices=positions,
                             block_size=_BLOCK_SIZE,
                             prefills=[PrefillChunk(0, num_tokens, 0, torch.arange(num_blocks, device=device))])
    hidden = model(torch.tensor(token_ids, device=device), meta, kv_caches)
    return model.compute_logits(hidden)


def evaluate(reference_model, quantized_model, tokenizer, texts: list[str], max_tokens: int = 256) -> QualityReport:
    """Perplexity of both models and their greedy agreement on `texts`, each cut to `max_tokens` tokens."""
    ref_nll = quant_nll = 0.0
    num_tokens = num_agree = num_texts = 0
    for text in texts:
        ids = list(tokenizer(text).input_ids)[:max_tokens]
        if len(ids) < 2:
            continue
        targets = torch.tensor(ids[1:])
        ref_logits = prompt_logits(reference_model, ids)[:-1]
        quant_logits = prompt_logits(quantized_model, ids)[:-1]
        ref_nll += torch.nn.functional.cross_entropy(ref_logits, targets, reduction="sum").item()
        quant_nll += torch.nn.functional.cross_entropy(quant_logits, targets, reduction="sum").item()
        num_agree += (ref_logits.argmax(-1) == quant_logits.argmax(-1)).sum().item()
        num_tokens += len(targets)
        num_texts += 1
    if not num_tokens:
        raise ValueError("evaluate needs at least one text of two or more tokens")
    return QualityReport(reference_ppl=math.exp(ref_nll / num_tokens), quantized_ppl=math.exp(quant_nll / num_tokens),
                         greedy_agreement=num_agree / num_tokens, num_texts=num_texts, num_tokens=num_tokens)
