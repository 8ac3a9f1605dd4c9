"""The `frugal` command line."""
from __future__ import annotations

import argparse
import logging
import sys
import time

SAMPLE_PROMPTS = [
    "What is the capital of France?",
    "Give me three tips for writing clear emails.",
    "Explain what a KV cache is in one paragraph.",
    "Write a haiku about autumn.",
]


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate answers with the engine (offline)")
    p.add_argument("--prompt", action="append", help="prompt text (repeatable); default: a few sample questions")
    p.add_argument("--model", default=None, help="GGUF file or HF directory (default: bundled SmolLM2-135M)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")


def cmd_generate(args) -> int:
    from serving import LLM, SamplingParams

    try:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                                seed=args.seed)
        llm = LLM(model=args.model)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    prompts = args.prompt or SAMPLE_PROMPTS
    use_chat = not args.raw and bool(getattr(llm.tokenizer, "chat_template", None))
    start = time.perf_counter()
    try:
        if use_chat:
            outs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params)
        else:
            outs = llm.generate(prompts, params)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - start
    for prompt, out in zip(prompts, outs):
        print(f"\n>>> {prompt}\n{out.text.strip()}\n[{len(out.token_ids)} tokens, finish: {out.finish_reason}]")
    num_tokens = sum(len(o.token_ids) for o in outs)
    print(f"\n{len(outs)} requests, {num_tokens} tokens in {elapsed:.2f} s: {num_tokens / elapsed:.1f} output tok/s")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="frugal", description="frugal: cost-efficient LLM serving")
    parser.add_argument("--log-level", default="WARNING")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import serving  # noqa: F401  (sets the OpenMP wait policy before torch loads)

    return {"generate": cmd_generate}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
