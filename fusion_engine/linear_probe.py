"""A standardised logistic-regression classifier fitted by scikit-learn, kept as a torch module.

Used wherever a cheap classifier is fitted on features (per-branch probes, the
handcrafted baseline, stacking): fitted with sklearn, stored as plain tensors, so it
saves to safetensors and exports like any other layer.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import nn


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

    def fit(self, features, y, *, C: float = 1.0, max_iter: int = 300, seed: int = 0) -> "LinearProbe":
        """Fit on ``features`` (N, D) and integer labels ``y`` (N,); returns ``self``."""
        coef, intercept, mean, scale = fit_logistic(features, y, self.num_classes, C=C, max_iter=max_iter, seed=seed)
        with torch.no_grad():
            self.mean.copy_(torch.from_numpy(mean))
            self.scale.copy_(torch.from_numpy(scale))
            self.linear.weight.copy_(torch.from_numpy(coef))
            self.linear.bias.copy_(torch.from_numpy(intercept))
        return self

    @torch.no_grad()
    def predict_proba(self, features) -> np.ndarray:
        x = torch.from_numpy(np.array(features, dtype=np.float32))
        return torch.softmax(self(x), dim=1).numpy()


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
