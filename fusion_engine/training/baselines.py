"""Baselines kept with every trained model: a linear probe per branch and handcrafted features.

They are fitted in the same run, on the same split, from the cached features, so every
evaluation can show the fused model beside each branch alone and beside HOG + colour
histogram + logistic regression.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from fusion_engine.core.data import collate_images
from fusion_engine.core.handcrafted import handcrafted_features
from fusion_engine.core.probes import HANDCRAFTED_KINDS, MAX_IN_MEMORY, Baselines, LinearProbe, handcrafted_dim

C_GRID = (0.1, 1.0, 10.0)


def fit_tuned(probe: LinearProbe, x, y, x_val, y_val, seed: int = 0) -> float:
    """Fit ``probe`` with the C from C_GRID that scores best on the validation data.

    Above ``MAX_IN_MEMORY`` feature values the probe is fitted by streaming minibatches (C=1)
    instead, so memory does not grow with the number of images.
    """
    if x.shape[0] * x.shape[1] > MAX_IN_MEMORY:
        probe.fit_streaming(x, y, seed=seed)
        return float((probe.predict_proba(x_val).argmax(1) == np.asarray(y_val)).mean())
    best = None
    for C in C_GRID:
        probe.fit(x, y, C=C, seed=seed)
        acc = float((probe.predict_proba(x_val).argmax(1) == np.asarray(y_val)).mean())
        if best is None or acc > best[0]:
            best = (acc, C)
    probe.fit(x, y, C=best[1], seed=seed)
    return best[0]


def fit_baselines(baselines: Baselines, train_feats, y, val_feats, y_val, train_hand, val_hand, seed: int = 0) -> dict:
    """Fit every probe of ``baselines``, choosing C on the validation split; returns validation accuracies."""
    scores = {}
    for i, probe in enumerate(baselines.probes):
        scores[f"branch{i}"] = fit_tuned(probe, train_feats[i], y, val_feats[i], y_val, seed)
    scores["handcrafted"] = fit_tuned(baselines.handcrafted, train_hand, y, val_hand, y_val, seed)
    return scores


def handcrafted_for(dataset, cache, kinds=HANDCRAFTED_KINDS, batch_size: int = 256) -> np.ndarray:
    """Handcrafted features of a dataset (N, D), through the feature cache (checked on every read,
    like the branches' features; a non-finite value is a DataError naming the handcrafted features)."""
    key = hashlib.sha256(f"handcrafted-v1|{','.join(kinds)}|{dataset.digest()}".encode()).hexdigest()[:32]

    def fill(_, buffers):
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, collate_fn=lambda b: collate_images(b, size=(64, 64))
        )
        row = 0
        for images, _labels in loader:
            buffers[0][row : row + len(images)] = handcrafted_features(images, kinds=kinds)
            row += len(images)

    name = f"the handcrafted features ({', '.join(kinds)})"
    return cache.arrays([key], [(len(dataset), handcrafted_dim(kinds))], fill, [name])[0]
