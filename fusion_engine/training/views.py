"""Cheap image views (horizontal flip, a small shift) for feature-level augmentation in frozen mode.

A view is a deterministic change of each image, so its features are cached like any others: a
:class:`ViewDataset` is the base dataset seen through the view, and its digest (the data part of the
feature-cache key) is the base digest plus the view's name, so each view of each branch is its own
cache entry. The head then trains on the original rows plus one copy per view.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch
import torch.nn.functional as F

from fusion_engine.core.data import ImageDataset
from fusion_engine.errors import ConfigError, suggest

SHIFT_FRACTION = 1 / 16  # of the image side, right and down (2 px on a 32 px image)


def flip(image: torch.Tensor) -> torch.Tensor:
    """Mirror left-right."""
    return image.flip(-1)


def shift(image: torch.Tensor) -> torch.Tensor:
    """Move the content right and down by 1/16 of the side (at least one pixel), repeating the edge."""
    h, w = image.shape[-2:]
    dy, dx = max(1, round(h * SHIFT_FRACTION)), max(1, round(w * SHIFT_FRACTION))
    padded = F.pad(image[None].float(), (dx, 0, dy, 0), mode="replicate")[0]
    return padded[..., :h, :w].to(image.dtype)


VIEWS = {"flip": flip, "shift": shift}


def check_views(views) -> list[str]:
    """The view names, validated (a ConfigError with a close match for an unknown one)."""
    for name in views:
        if name not in VIEWS:
            raise ConfigError(f"unknown feature view {name!r}{suggest(name, VIEWS)}; valid: {', '.join(VIEWS)}")
    return list(views)


class ViewDataset(ImageDataset):
    """``base`` with every image seen through the view ``view``; same labels and classes."""

    def __init__(self, base: ImageDataset, view: str):
        check_views([view])
        self.base, self.view = base, view
        self.targets, self.classes, self.name = base.targets, base.classes, f"{base.name} ({view})"

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.base[index]
        return VIEWS[self.view](torch.as_tensor(image)), label

    def subset(self, indices) -> ViewDataset:
        return ViewDataset(self.base.subset(indices), self.view)

    def digest(self) -> str:
        return hashlib.sha256(f"{self.base.digest()}\0view:{self.view}".encode()).hexdigest()


def view_features(cache, model, dataset, views, **options) -> dict[str, list[np.ndarray]]:
    """``{view: one (N, D_i) array per branch}`` for each of ``views``, each a cache entry of its own;
    ``options`` go to :meth:`FeatureCache.features`."""
    return {view: cache.features(model, ViewDataset(dataset, view), **options) for view in check_views(views)}


def stacked(original: list, extra: dict[str, list]) -> list[np.ndarray]:
    """Per branch: the original rows followed by each view's rows (the training set of an augmented head)."""
    return [
        np.concatenate([np.asarray(f)] + [np.asarray(v[i]) for v in extra.values()]) for i, f in enumerate(original)
    ]


def mean_of_views(features: list, flipped: list) -> list[np.ndarray]:
    """Per branch: the mean of an image's features and its mirror image's, as a model with ``flip_average``
    computes them at inference."""
    return [(np.asarray(a) + np.asarray(b)) / 2 for a, b in zip(features, flipped)]


def flip_averaged(cache, model, dataset, features: list, **options) -> list[np.ndarray]:
    """Per branch: the mean of ``features`` (the dataset's own) and its flip view's features."""
    return mean_of_views(features, view_features(cache, model, dataset, ["flip"], **options)["flip"])


def view_options(text: str | None) -> dict:
    """TrainConfig options of ``train --views``: "auto", or a comma list of views and "flip-average"
    (e.g. "flip,shift,flip-average"); {} when not given."""
    if text is None:
        return {}
    if text.strip() == "auto":
        return {"feature_views": "auto", "flip_average": "auto"}
    names = [name.strip() for name in text.split(",") if name.strip()]
    views = [name for name in names if name != "flip-average"]
    for name in views:
        if name not in VIEWS:
            valid = [*VIEWS, "flip-average", "auto"]
            raise ConfigError(f"unknown --views entry {name!r}{suggest(name, valid)}; valid: {', '.join(valid)}")
    return {"feature_views": views, "flip_average": "flip-average" in names}
