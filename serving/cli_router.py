"""`frugal router`: train the complexity classifier on labelled prompts, and classify prompts with a trained one."""
from __future__ import annotations

import json
import sys


def add_router(sub) -> None:
    p = sub.add_parser("router", help="train and try the model router's complexity classifier")
    router = p.add_subparsers(dest="router_command", required=True)
    train = router.add_parser("train", help="fit on labelled JSONL; prints held-out accuracy beside the baseline")
    train.add_argument("--data", required=True, help='JSONL: {"prompt": ..., "label": "simple"|"complex"} a line '
                                                     '(optionally "task_type")')
    train.add_argument("--out", required=True, help="directory to write the classifier to (router.classifier_dir)")
    train.add_argument("--test-fraction", type=float, default=0.25, help="held-out share (default 0.25)")
    train.add_argument("--seed", type=int, default=0, help="seed of the held-out split (default 0)")
    classify = router.add_parser("classify", help="complexity and task type of prompts, with a trained classifier")
    classify.add_argument("--model", required=True, help="a `frugal router train --out` directory")
    classify.add_argument("--prompt", action="append", required=True, help="prompt text (repeatable)")
    classify.add_argument("--json", action="store_true", help="one JSON object a line")


def cmd_router(args) -> int:
    from serving.control.embeddings import Embedder
    from serving.control.router.classifier import ComplexityClassifier
    from serving.control.router.training import train

    if args.router_command == "train":
        try:
            embedder = Embedder.shared()
            report = train(args.data, args.out, embedder, args.test_fraction, args.seed)
        except (ValueError, OSError, RuntimeError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(report.summary())
        print(f"wrote {args.out}")
        return 0
    try:
        classifier = ComplexityClassifier.load(args.model)
        results = classifier.classify(args.prompt, Embedder.shared())
    except (ValueError, OSError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for prompt, c in zip(args.prompt, results):
        if args.json:
            print(json.dumps({"prompt": prompt, "label": c.label, "p_complex": round(c.p_complex, 4),
                              "task_type": c.task_type,
                              "task_type_p": None if c.task_type_p is None else round(c.task_type_p, 4)}))
        else:
            task = f", task {c.task_type} ({c.task_type_p:.2f})" if c.task_type is not None else ""
            print(f"{c.label} (p_complex {c.p_complex:.2f}{task}): {prompt}")
    return 0
