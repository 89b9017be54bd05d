"""The train/test split: seeded, exact, by document (pretraining) or record (SFT), before any packing."""

from __future__ import annotations

import numpy as np


def test_assignment(n_docs: int, pct: float, seed: int) -> np.ndarray:
    """Exact seeded split: round(n * pct) documents (at least one when pct > 0 and n > 1) go to test."""
    n_test = int(round(n_docs * pct))
    if pct > 0 and n_docs > 1:
        n_test = min(max(n_test, 1), n_docs - 1)
    is_test = np.zeros(n_docs, dtype=bool)
    is_test[np.random.default_rng(seed).permutation(n_docs)[:n_test]] = True
    return is_test

