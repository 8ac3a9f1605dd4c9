"""Bounded label values: a tenant or workflow label carries only ids the operator declared (the config, the key
store), and everything else is counted under "other", so a client inventing ids cannot blow up the series count."""
from __future__ import annotations

import threading
from typing import Iterable

OTHER = "other"
NONE = "none"  # a request that named no workflow


class KnownValues:
    def __init__(self, values: Iterable[str] = (), max_values: int = 1000):
        self.max_values = max_values
        self._values: set[str] = set()
        self._lock = threading.Lock()
        self.add(values)

    def add(self, values: Iterable[str]) -> None:
        with self._lock:
            for value in values:
                if len(self._values) >= self.max_values:
                    return
                if value and value != "*":
                    self._values.add(value)

    def label(self, value: str | None) -> str:
        if value is None:
            return NONE
        return value if value in self._values else OTHER

    def __contains__(self, value: str) -> bool:
        return value in self._values
