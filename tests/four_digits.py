"""scikit-learn's digits 0-3 as small uint8 images: the quick real data many tests train on."""

from __future__ import annotations

import numpy as np

CLASSES = ["zero", "one", "two", "three"]


def four_digits(n: int, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` images (uint8, 8x8, 0-255) and labels (0-3) of scikit-learn's digits 0-3, from ``offset`` on."""
    from sklearn.datasets import load_digits  # scikit-learn is slow to import: only when used

    d = load_digits(n_class=4)
    x = np.round(d.images[offset : offset + n] * (255 / 16)).astype(np.uint8)
    return x, d.target[offset : offset + n]


def four_digits_dataset(n: int):
    """The first ``n`` of them as a dataset with classes named zero, one, two, three."""
    from fusion_engine.core.data import load_dataset

    return load_dataset(four_digits(n), classes=CLASSES)
