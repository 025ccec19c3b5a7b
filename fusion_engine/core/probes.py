"""Linear probes: a standardised logistic regression fitted by scikit-learn, kept as a torch module,
and the set of probes (per branch and handcrafted) that travels with every trained model.

Used wherever a cheap classifier is fitted on features (per-branch probes, the
handcrafted baseline, stacking): fitted with sklearn, stored as plain tensors, so it
saves to safetensors and exports like any other layer.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import nn

from fusion_engine.core.handcrafted import handcrafted_features

MAX_IN_MEMORY = 1 << 23  # feature values; larger problems are fitted by streaming minibatches


class LinearProbe(nn.Module):
    """``logits = W @ ((x - mean) / scale) + b``; fit with :meth:`fit`."""

    def __init__(self, in_dim: int, num_classes: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("scale", torch.ones(in_dim))
        self.linear = nn.Linear(in_dim, num_classes)
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear((x - self.mean) / self.scale)

    def fit(self, features, y, *, C: float = 1.0, max_iter: int = 300, seed: int = 0) -> LinearProbe:
        """Fit on ``features`` (N, D) and integer labels ``y`` (N,); returns ``self``."""
        coef, intercept, mean, scale = fit_logistic(features, y, self.num_classes, C=C, max_iter=max_iter, seed=seed)
        with torch.no_grad():
            self.mean.copy_(torch.from_numpy(mean))
            self.scale.copy_(torch.from_numpy(scale))
            self.linear.weight.copy_(torch.from_numpy(coef))
            self.linear.bias.copy_(torch.from_numpy(intercept))
        return self

    def fit_streaming(
        self, features, y, *, C: float = 1.0, epochs: int = 20, batch_size: int = 1024, seed: int = 0
    ) -> LinearProbe:
        """The same L2-regularised logistic regression, fitted by minibatches read from ``features``
        (e.g. a memory-mapped array), so memory stays flat however many rows there are."""
        y = torch.as_tensor(np.asarray(y), dtype=torch.long)
        n = len(y)
        total, total_sq = np.zeros(features.shape[1]), np.zeros(features.shape[1])
        for start in range(0, n, 8192):
            chunk = np.asarray(features[start : start + 8192], dtype=np.float64)
            total += chunk.sum(0)
            total_sq += (chunk**2).sum(0)
        mean = total / n
        scale = np.sqrt(np.maximum(total_sq / n - mean**2, 0))
        scale[scale < 1e-8] = 1.0
        with torch.no_grad():
            self.mean.copy_(torch.from_numpy(mean.astype(np.float32)))
            self.scale.copy_(torch.from_numpy(scale.astype(np.float32)))
            self.linear.weight.zero_()
            self.linear.bias.zero_()
        optimizer = torch.optim.Adam(self.linear.parameters(), lr=1e-2)
        generator = torch.Generator().manual_seed(seed)
        penalty = 1.0 / (2 * C * n)
        for _ in range(epochs):
            order = torch.randperm(n, generator=generator).numpy()
            for start in range(0, n, batch_size):
                idx = np.sort(order[start : start + batch_size])
                x = torch.from_numpy(np.array(features[idx], dtype=np.float32))
                loss = torch.nn.functional.cross_entropy(self(x), y[idx]) + penalty * self.linear.weight.pow(2).sum()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        return self

    @torch.no_grad()
    def predict_proba(self, features, batch_size: int = 8192) -> np.ndarray:
        parts = [
            torch.softmax(self(torch.from_numpy(np.array(features[i : i + batch_size], dtype=np.float32))), dim=1)
            for i in range(0, len(features), batch_size)
        ]
        return torch.cat(parts).numpy() if parts else np.zeros((0, self.num_classes), dtype=np.float32)


def fit_logistic(features, y, num_classes: int, *, C: float = 1.0, max_iter: int = 300, seed: int = 0):
    """Standardise and fit multinomial logistic regression.

    Returns float32 arrays ``(coef (K, D), intercept (K,), mean (D,), scale (D,))`` for all
    ``num_classes`` classes, including classes absent from ``y`` (they get a very low bias).
    """
    from sklearn.linear_model import LogisticRegression

    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(y).astype(np.int64)
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale[scale < 1e-8] = 1.0
    xs = (x - mean) / scale
    present = np.unique(y)
    coef = np.zeros((num_classes, x.shape[1]))
    intercept = np.full(num_classes, -1e4)
    if len(present) == 1:
        intercept[present[0]] = 0.0
    else:
        model = LogisticRegression(C=C, max_iter=max_iter, random_state=seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # convergence warnings: the probe is a baseline, not tuned
            model.fit(xs, y)
        if len(present) == 2:  # sklearn keeps one row for two classes: logit = [0, z]
            coef[present[1]], intercept[present[1]] = model.coef_[0], model.intercept_[0]
            intercept[present[0]] = 0.0
        else:
            coef[present], intercept[present] = model.coef_, model.intercept_
    f32 = np.float32
    return coef.astype(f32), intercept.astype(f32), mean.astype(f32), scale.astype(f32)


HANDCRAFTED_KINDS = ("hog", "color")


def handcrafted_dim(kinds=HANDCRAFTED_KINDS) -> int:
    return int(handcrafted_features(torch.zeros(1, 3, 32, 32), kinds=kinds).shape[1])


class Baselines(nn.Module):
    """Per-branch probes and the handcrafted probe, as plain torch modules (safetensors-friendly)."""

    def __init__(self, branch_dims: list[int], num_classes: int, kinds=HANDCRAFTED_KINDS):
        super().__init__()
        self.kinds = tuple(kinds)
        self.probes = nn.ModuleList(LinearProbe(d, num_classes) for d in branch_dims)
        self.handcrafted = LinearProbe(handcrafted_dim(self.kinds), num_classes)
