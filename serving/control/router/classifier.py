"""The learned complexity router: does a prompt need the strong tier?

A logistic regression on the prompt's all-MiniLM-L6-v2 embedding plus a few cheap shape features (length, lines,
code and math marks), trained by `frugal router train` (serving/control/router/training.py). An optional second
head predicts the task type when the training set labels it.

Saved as `classifier.safetensors` (the standardiser and the linear heads as plain arrays, no pickle) beside
`classifier.json` (labels, the embedder it was trained on, held-out figures). Inference is numpy only:
sklearn is needed to train, not to route.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from serving.control.embeddings import DIMENSION, PACKAGE

FORMAT_VERSION = 1
EMBEDDER_NAME = "all-MiniLM-L6-v2"
WEIGHTS_FILE = "classifier.safetensors"
META_FILE = "classifier.json"
LABELS = ("simple", "complex")
SHAPE_FEATURES = ("log_chars", "log_words", "num_lines", "code_marks", "math_marks", "questions")
_CODE = re.compile(r"[{}();=<>\[\]`]|def |class |import |SELECT |Traceback|Error\b")
_MATH = re.compile(r"[0-9]+\s*[-+*/^%=]\s*[0-9]+|\bprove\b|\bprobability\b|\bintegral\b", re.IGNORECASE)


def shape_features(text: str) -> np.ndarray:
    """[len(SHAPE_FEATURES)] float32: what the embedding misses (a long prompt with a stack trace, a sum)."""
    num_words = len(text.split())
    return np.array([
        math.log1p(len(text)),
        math.log1p(num_words),
        min(text.count("\n"), 50) / 10.0,
        min(len(_CODE.findall(text)), 50) / 10.0,
        min(len(_MATH.findall(text)), 20) / 5.0,
        min(text.count("?"), 10) / 2.0,
    ], dtype=np.float32)


def features(embeddings: np.ndarray, texts: list[str]) -> np.ndarray:
    """[len(texts), DIMENSION + len(SHAPE_FEATURES)] float32."""
    shapes = np.stack([shape_features(t) for t in texts]) if texts else np.zeros((0, len(SHAPE_FEATURES)))
    return np.concatenate([embeddings, shapes], axis=1).astype(np.float32)


@dataclass(frozen=True, slots=True)
class Complexity:
    """What the classifier says about one prompt."""

    p_complex: float  # probability the prompt needs the strong tier
    label: str  # "complex" when p_complex >= the threshold, else "simple"
    task_type: str | None  # predicted task type; None: the model has no task head
    task_type_p: float | None  # the predicted task type's probability


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _softmax(x: np.ndarray) -> np.ndarray:
    z = np.exp(x - x.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


class ComplexityClassifier:
    """Standardise -> linear -> sigmoid (complexity) and softmax (task type). Built by training.fit or load."""

    def __init__(self, mean: np.ndarray, scale: np.ndarray, coef: np.ndarray, intercept: float,
                 task_types: tuple[str, ...] = (), task_coef: np.ndarray | None = None,
                 task_intercept: np.ndarray | None = None, threshold: float = 0.5, meta: dict | None = None):
        num_features = DIMENSION + len(SHAPE_FEATURES)
        if mean.shape != (num_features,) or scale.shape != (num_features,) or coef.shape != (num_features,):
            raise ValueError(f"classifier arrays must have {num_features} features, got mean {mean.shape}, "
                             f"scale {scale.shape}, coef {coef.shape}")
        if task_types and (task_coef is None or task_coef.shape != (len(task_types), num_features)
                           or task_intercept is None or task_intercept.shape != (len(task_types),)):
            raise ValueError(f"task head must be [{len(task_types)}, {num_features}] for task types "
                             f"{', '.join(task_types)}")
        self.mean = mean.astype(np.float32)  # [F] standardiser
        self.scale = scale.astype(np.float32)  # [F]
        self.coef = coef.astype(np.float32)  # [F] complexity head
        self.intercept = float(intercept)
        self.task_types = tuple(task_types)  # class order of the task head; empty: no task head
        self.task_coef = None if task_coef is None else task_coef.astype(np.float32)  # [T, F]
        self.task_intercept = None if task_intercept is None else task_intercept.astype(np.float32)  # [T]
        self.threshold = threshold
        self.meta = dict(meta or {})  # classifier.json as saved (training figures, embedder)

    # -- inference ---------------------------------------------------------------------------------------
    def p_complex(self, x: np.ndarray) -> np.ndarray:
        """x: [N, F] from `features` -> [N] probabilities of "complex"."""
        return _sigmoid(((x - self.mean) / self.scale) @ self.coef + self.intercept)

    def task_proba(self, x: np.ndarray) -> np.ndarray | None:
        """x: [N, F] -> [N, T] task-type probabilities, or None without a task head."""
        if not self.task_types:
            return None
        return _softmax(((x - self.mean) / self.scale) @ self.task_coef.T + self.task_intercept)

    def classify(self, texts: list[str], embedder) -> list[Complexity]:
        """Encodes with the embedder (CPU work: run it off the event loop) and classifies each text."""
        x = features(embedder.encode(texts), texts)
        p = self.p_complex(x)
        tasks = self.task_proba(x)
        out = []
        for i in range(len(texts)):
            task, task_p = None, None
            if tasks is not None:
                j = int(np.argmax(tasks[i]))
                task, task_p = self.task_types[j], float(tasks[i, j])
            out.append(Complexity(float(p[i]), "complex" if p[i] >= self.threshold else "simple", task, task_p))
        return out

    # -- files -------------------------------------------------------------------------------------------
    def save(self, out_dir: str | Path, meta: dict) -> Path:
        from safetensors.numpy import save_file

        out = Path(out_dir).expanduser()
        out.mkdir(parents=True, exist_ok=True)
        tensors = {"mean": self.mean, "scale": self.scale, "coef": self.coef,
                   "intercept": np.array([self.intercept], dtype=np.float32)}
        if self.task_types:
            tensors["task_coef"] = self.task_coef
            tensors["task_intercept"] = self.task_intercept
        # NOTE: sklearn's coefficients can be Fortran-ordered; safetensors writes the raw buffer, so make it C order.
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(out / WEIGHTS_FILE))
        full = {"format_version": FORMAT_VERSION, "labels": list(LABELS), "threshold": self.threshold,
                "task_types": list(self.task_types), "shape_features": list(SHAPE_FEATURES),
                "embedder": {"name": EMBEDDER_NAME, "package": PACKAGE, "dimension": DIMENSION}, **meta}
        (out / META_FILE).write_text(json.dumps(full, indent=2) + "\n")
        self.meta = full
        return out

    @classmethod
    def load(cls, model_dir: str | Path) -> ComplexityClassifier:
        """Reads a `frugal router train` directory; raises ValueError naming what does not match."""
        from safetensors.numpy import load_file

        path = Path(model_dir).expanduser()
        if not (path / META_FILE).exists() or not (path / WEIGHTS_FILE).exists():
            raise ValueError(f"{path} is not a router classifier directory (needs {META_FILE} and {WEIGHTS_FILE}; "
                             "write one with `frugal router train`)")
        meta = json.loads((path / META_FILE).read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path}: classifier format_version {meta.get('format_version')!r}, this frugal "
                             f"reads {FORMAT_VERSION}; retrain it")
        embedder = meta.get("embedder", {})
        if embedder.get("name") != EMBEDDER_NAME or embedder.get("dimension") != DIMENSION:
            raise ValueError(f"{path}: trained on embedder {embedder.get('name')!r} ({embedder.get('dimension')} "
                             f"dims), this frugal embeds with {EMBEDDER_NAME} ({DIMENSION}); retrain it")
        if meta.get("shape_features") != list(SHAPE_FEATURES):
            raise ValueError(f"{path}: trained on other shape features {meta.get('shape_features')}; retrain it")
        t = load_file(str(path / WEIGHTS_FILE))
        task_types = tuple(meta.get("task_types") or ())
        return cls(t["mean"], t["scale"], t["coef"], float(t["intercept"][0]), task_types,
                   t.get("task_coef"), t.get("task_intercept"), float(meta.get("threshold", 0.5)), meta)
