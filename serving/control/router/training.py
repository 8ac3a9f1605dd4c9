"""Training the complexity classifier: labelled JSONL in, held-out accuracy beside the majority baseline out.

Each line is `{"prompt": str, "label": "simple" | "complex"}`, optionally with `"task_type": str` (then every
line needs one, and a task head is trained too). The held-out part is split off with a seed, stratified by
label, and never seen by the fit; the saved model is the one those figures describe.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from serving.control.router.classifier import LABELS, ComplexityClassifier, features

MIN_EXAMPLES = 20


@dataclass(frozen=True, slots=True)
class Example:
    prompt: str  # the text the classifier reads
    label: str  # "simple" | "complex"
    task_type: str | None  # optional task label


@dataclass(frozen=True, slots=True)
class TrainReport:
    """What one training run measured on its held-out part."""

    num_train: int  # examples the model was fitted on
    num_test: int  # held-out examples
    accuracy: float  # held-out accuracy of the complexity head
    baseline: float  # held-out accuracy of always answering the training set's majority label
    majority_label: str  # that label
    task_accuracy: float | None  # held-out accuracy of the task head; None without task labels
    task_baseline: float | None  # the majority task type's held-out accuracy

    def summary(self) -> str:
        line = (f"held-out accuracy {self.accuracy:.3f} vs majority baseline {self.baseline:.3f} "
                f"(always {self.majority_label!r}) on {self.num_test} examples; trained on {self.num_train}")
        if self.task_accuracy is not None:
            line += f"\ntask type accuracy {self.task_accuracy:.3f} vs majority baseline {self.task_baseline:.3f}"
        return line

    def as_dict(self) -> dict:
        return {f: getattr(self, f) for f in self.__slots__}


def read_examples(path: str | Path) -> list[Example]:
    """Reads and checks the whole file first; raises ValueError naming the line at fault."""
    examples = []
    with open(path, encoding="utf-8") as f:
        for num, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{num}: not JSON: {e.msg}") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{num}: expected an object with prompt and label")
            prompt, label, task = row.get("prompt"), row.get("label"), row.get("task_type")
            if not isinstance(prompt, str) or not prompt.strip():
                raise ValueError(f"{path}:{num}: prompt must be a non-empty string")
            if label not in LABELS:
                raise ValueError(f"{path}:{num}: label must be one of {', '.join(LABELS)}, got {label!r}")
            if task is not None and (not isinstance(task, str) or not task):
                raise ValueError(f"{path}:{num}: task_type must be a non-empty string when given")
            examples.append(Example(prompt, label, task))
    if len(examples) < MIN_EXAMPLES:
        raise ValueError(f"{path}: {len(examples)} examples; training needs at least {MIN_EXAMPLES}")
    counts = {lab: sum(e.label == lab for e in examples) for lab in LABELS}
    if min(counts.values()) < 4:
        raise ValueError(f"{path}: each label needs at least 4 examples, got {counts}")
    with_task = sum(e.task_type is not None for e in examples)
    if with_task not in (0, len(examples)):
        raise ValueError(f"{path}: {with_task} of {len(examples)} examples have a task_type; give it on all or none")
    return examples


def split(examples: list[Example], test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, held-out indices): seeded, stratified by label."""
    from sklearn.model_selection import train_test_split

    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    y = [e.label for e in examples]
    return train_test_split(np.arange(len(examples)), test_size=test_fraction, random_state=seed, stratify=y)


def fit(examples: list[Example], embedder, test_fraction: float = 0.25, seed: int = 0,
        c: float = 1.0) -> tuple[ComplexityClassifier, TrainReport]:
    """Splits (seeded, stratified), fits on the training part, measures on the held-out part."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    train_i, test_i = split(examples, test_fraction, seed)
    texts = [e.prompt for e in examples]
    x = features(embedder.encode(texts), texts)
    y = np.array([LABELS.index(e.label) for e in examples])
    scaler = StandardScaler().fit(x[train_i])
    xs = scaler.transform(x)
    scale = np.where(scaler.scale_ > 0, scaler.scale_, 1.0)
    head = LogisticRegression(C=c, max_iter=2000, random_state=seed).fit(xs[train_i], y[train_i])
    accuracy = float((head.predict(xs[test_i]) == y[test_i]).mean())
    majority = int(np.bincount(y[train_i], minlength=2).argmax())
    baseline = float((y[test_i] == majority).mean())

    task_types: tuple[str, ...] = ()
    task_coef = task_intercept = None
    task_accuracy = task_baseline = None
    if examples[0].task_type is not None:
        tasks = np.array([e.task_type for e in examples])
        task_head = LogisticRegression(C=c, max_iter=2000, random_state=seed).fit(xs[train_i], tasks[train_i])
        task_types = tuple(str(t) for t in task_head.classes_)
        task_accuracy = float((task_head.predict(xs[test_i]) == tasks[test_i]).mean())
        values, counts = np.unique(tasks[train_i], return_counts=True)
        task_baseline = float((tasks[test_i] == values[counts.argmax()]).mean())
        if len(task_types) == 2:  # NOTE: sklearn keeps one row for two classes; spell out both for the softmax
            task_coef = np.stack([-task_head.coef_[0] / 2, task_head.coef_[0] / 2])
            task_intercept = np.array([-task_head.intercept_[0] / 2, task_head.intercept_[0] / 2])
        else:
            task_coef, task_intercept = task_head.coef_, task_head.intercept_

    classifier = ComplexityClassifier(scaler.mean_, scale, head.coef_[0], float(head.intercept_[0]), task_types,
                                      task_coef, task_intercept)
    report = TrainReport(len(train_i), len(test_i), accuracy, baseline, LABELS[majority], task_accuracy,
                         task_baseline)
    return classifier, report


def train(data: str | Path, out_dir: str | Path, embedder, test_fraction: float = 0.25,
          seed: int = 0) -> TrainReport:
    """`frugal router train`: read, fit, measure, save (the model and its figures) to out_dir."""
    examples = read_examples(data)
    classifier, report = fit(examples, embedder, test_fraction, seed)
    classifier.save(out_dir, {"trained_on": str(data), "seed": seed, "test_fraction": test_fraction,
                              "held_out": report.as_dict()})
    return report
