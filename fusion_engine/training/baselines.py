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
from fusion_engine.core.probes import (
    C_PATH,
    HANDCRAFTED_KINDS,
    MAX_IN_MEMORY,
    Baselines,
    LinearProbe,
    handcrafted_dim,
)
from fusion_engine.core.progress import Progress

C_GRID = C_PATH  # the C values a tuned probe chooses from (increasing: one warm-started path)


def fit_tuned(probe: LinearProbe, x, y, x_val, y_val, seed: int = 0) -> float:
    """Fit ``probe`` with the C from C_GRID that scores best on the validation data; returns that score.

    One regularisation path (:meth:`LinearProbe.fit_path`): standardised once, C increasing with warm
    starts, the best solution kept without a refit, stopped once the validation accuracy falls.
    Above ``MAX_IN_MEMORY`` feature values the probe is fitted by streaming minibatches (C=1)
    instead, so memory does not grow with the number of images.
    """
    if x.shape[0] * x.shape[1] > MAX_IN_MEMORY:
        probe.fit_streaming(x, y, seed=seed)
        return float((probe.predict_proba(x_val).argmax(1) == np.asarray(y_val)).mean())
    return probe.fit_path(x, y, x_val, y_val, Cs=C_GRID).accuracy  # deterministic: no seed to use


def fit_baselines(
    baselines: Baselines,
    train_feats,
    y,
    val_feats,
    y_val,
    train_hand,
    val_hand,
    seed: int = 0,
    names: list[str] | None = None,
    progress: bool = False,
) -> dict:
    """Fit every probe of ``baselines``, choosing C on the validation split; returns validation accuracies.

    ``progress``: a bar over the probes (``names``: the branches' names, shown as each is fitted)."""
    names = names or [f"branch {i}" for i in range(len(baselines.probes))]
    scores = {}
    with Progress(len(baselines.probes) + 1, "baselines (linear probes)", progress, unit="probe") as bar:
        for i, probe in enumerate(baselines.probes):
            scores[f"branch{i}"] = fit_tuned(probe, train_feats[i], y, val_feats[i], y_val, seed)
            bar.update(1, **{names[i]: scores[f"branch{i}"]})  # each probe's validation accuracy
        scores["handcrafted"] = fit_tuned(baselines.handcrafted, train_hand, y, val_hand, y_val, seed)
        bar.update(1, handcrafted=scores["handcrafted"])
    return scores


def handcrafted_for(
    dataset, cache, kinds=HANDCRAFTED_KINDS, batch_size: int = 256, progress: bool = False
) -> np.ndarray:
    """Handcrafted features of a dataset (N, D), through the feature cache (checked on every read,
    like the branches' features; a non-finite value is a DataError naming the handcrafted features).
    ``progress``: a bar while they are computed (nothing shows on a cache hit)."""
    key = hashlib.sha256(f"handcrafted-v1|{','.join(kinds)}|{dataset.digest()}".encode()).hexdigest()[:32]

    def fill(_, buffers):
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, collate_fn=lambda b: collate_images(b, size=(64, 64))
        )
        row = 0
        with Progress(len(dataset), f"handcrafted features ({', '.join(kinds)})", progress) as bar:
            for images, _labels in loader:
                buffers[0][row : row + len(images)] = handcrafted_features(images, kinds=kinds)
                row += len(images)
                bar.update(len(images))

    name = f"the handcrafted features ({', '.join(kinds)})"
    return cache.arrays([key], [(len(dataset), handcrafted_dim(kinds))], fill, [name])[0]
