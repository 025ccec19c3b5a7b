"""Linear probes: a standardised logistic regression kept as a torch module, and the set of probes
(per branch and handcrafted) that travels with every trained model.

Used wherever a cheap classifier is fitted on features (per-branch probes, the
handcrafted baseline, stacking): fitted at one C with scikit-learn (:meth:`LinearProbe.fit`) or
with C chosen on validation data along one warm-started regularisation path (scikit-learn's
objective, scipy's L-BFGS-B: :meth:`LinearProbe.fit_path`), stored as plain tensors, so it
saves to safetensors and exports like any other layer.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from fusion_engine.core.handcrafted import handcrafted_features

MAX_IN_MEMORY = 1 << 23  # feature values; larger problems are fitted by streaming minibatches
C_PATH = (0.1, 1.0, 10.0)  # the inverse regularisation strengths a tuned probe chooses from
PATH_TOL = 1e-3  # lbfgs gradient tolerance along the path (see fit_logistic_path)
LOOK_AHEAD = 5  # lbfgs iterations toward the next C that must raise the validation accuracy


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
        return self.set_solution(*fit_logistic(features, y, self.num_classes, C=C, max_iter=max_iter, seed=seed))

    def fit_path(self, features, y, val_features, y_val, *, Cs=C_PATH, **options) -> LogisticPath:
        """Fit with the C of ``Cs`` that scores best on the validation data, along one warm-started
        regularisation path (:func:`fit_logistic_path`, which takes ``options``); returns the path."""
        path = fit_logistic_path(features, y, val_features, y_val, self.num_classes, Cs=Cs, **options)
        self.set_solution(path.coef, path.intercept, path.mean, path.scale)
        return path

    def set_solution(self, coef, intercept, mean, scale) -> LinearProbe:
        """Load a fitted solution: ``coef`` (K, D), ``intercept`` (K,), ``mean`` and ``scale`` (D,)."""
        with torch.no_grad():
            self.mean.copy_(torch.as_tensor(np.asarray(mean, dtype=np.float32)))
            self.scale.copy_(torch.as_tensor(np.asarray(scale, dtype=np.float32)))
            self.linear.weight.copy_(torch.as_tensor(np.asarray(coef, dtype=np.float32)))
            self.linear.bias.copy_(torch.as_tensor(np.asarray(intercept, dtype=np.float32)))
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


def standardise(features, dtype=np.float64):
    """``(x - mean) / scale`` in ``dtype`` (statistics in float64; constant columns keep scale 1), mean, scale."""
    x = np.asarray(features)
    mean = x.mean(axis=0, dtype=np.float64)
    scale = x.std(axis=0, dtype=np.float64)
    scale[scale < 1e-8] = 1.0
    return ((x.astype(dtype, copy=False) - mean.astype(dtype)) / scale.astype(dtype)), mean, scale


def one_blas_thread():
    """Linear algebra on one thread for the duration of a ``with`` block.

    Probe-sized problems (thousands of rows, a few thousand columns, ten classes) are matrix-vector
    sized: a multi-threaded BLAS gains nothing there and, on a busy machine, its threads spin
    against each other (measured 20-40x slower per lbfgs fit on two shared cores)."""
    from threadpoolctl import threadpool_limits  # a dependency of scikit-learn

    return threadpool_limits(1, user_api="blas")


def _expand(model, present: np.ndarray, num_classes: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """sklearn's coefficients as ``(coef (K, D), intercept (K,))`` over all ``num_classes``; classes absent
    from the training labels get a very low bias."""
    coef = np.zeros((num_classes, dim))
    intercept = np.full(num_classes, -1e4)
    if model is None:  # one class only
        intercept[present[0]] = 0.0
    elif len(present) == 2:  # sklearn keeps one row for two classes: logit = [0, z]
        coef[present[1]], intercept[present[1]] = model.coef_[0], model.intercept_[0]
        intercept[present[0]] = 0.0
    else:
        coef[present], intercept[present] = model.coef_, model.intercept_
    return coef, intercept


def fit_logistic(features, y, num_classes: int, *, C: float = 1.0, max_iter: int = 300, seed: int = 0):
    """Standardise and fit multinomial logistic regression.

    Returns float32 arrays ``(coef (K, D), intercept (K,), mean (D,), scale (D,))`` for all
    ``num_classes`` classes, including classes absent from ``y`` (they get a very low bias).
    """
    from sklearn.linear_model import LogisticRegression

    xs, mean, scale = standardise(np.asarray(features, dtype=np.float64))
    y = np.asarray(y).astype(np.int64)
    present = np.unique(y)
    model = None
    if len(present) > 1:
        model = LogisticRegression(C=C, max_iter=max_iter, random_state=seed)
        with warnings.catch_warnings(), one_blas_thread():
            warnings.simplefilter("ignore")  # convergence warnings: the probe is a baseline, not tuned
            model.fit(xs, y)
    coef, intercept = _expand(model, present, num_classes, xs.shape[1])
    f32 = np.float32
    return coef.astype(f32), intercept.astype(f32), mean.astype(f32), scale.astype(f32)


class LogisticPath(NamedTuple):
    """The solution chosen along a regularisation path (float32 arrays) and how each C scored."""

    coef: np.ndarray
    intercept: np.ndarray
    mean: np.ndarray
    scale: np.ndarray
    C: float
    accuracy: float
    scores: dict  # C -> validation accuracy, for the Cs tried (of a look ahead where the path stopped there)


def softmax_objective(xs: np.ndarray, y: np.ndarray, num_classes: int, C: float):
    """scikit-learn's multinomial logistic-regression objective and its gradient, as one function of
    ``theta`` = the (K, D + 1) weights-and-intercepts matrix raveled (float64, for lbfgs):
    ``mean(log-loss) + ||W||^2 / (2 C n)``, the intercept unpenalised. The data stay float32: one
    pass forward and one back per call, which is all a call costs."""
    n, dim = xs.shape
    rows = np.arange(n)

    def objective(theta):
        w = theta.reshape(num_classes, dim + 1)
        z = xs @ w[:, :dim].T.astype(np.float32)
        z += w[:, dim].astype(np.float32)
        z -= z.max(axis=1, keepdims=True)
        e = np.exp(z)
        total = e.sum(axis=1, keepdims=True)
        loss = (np.log(total[:, 0]).sum(dtype=np.float64) - z[rows, y].sum(dtype=np.float64)) / n
        loss += float((w[:, :dim] ** 2).sum()) / (2 * C * n)
        e /= total
        e[rows, y] -= 1.0  # softmax minus one-hot: d(loss)/d(logits) times n
        grad = np.empty_like(w)
        grad[:, :dim] = (e.T @ xs) / n + w[:, :dim] / (C * n)
        grad[:, dim] = e.sum(axis=0, dtype=np.float64) / n
        return float(loss), grad.ravel()

    return objective


def fit_logistic_path(
    features,
    y,
    val_features,
    y_val,
    num_classes: int,
    *,
    Cs=C_PATH,
    max_iter: int = 300,
    tol: float = PATH_TOL,
    look_ahead: int = LOOK_AHEAD,
) -> LogisticPath:
    """Multinomial logistic regression with C chosen on validation data, along one regularisation path.

    The objective is scikit-learn's (``LogisticRegression(C=C)``, :func:`softmax_objective`), minimised
    by scipy's L-BFGS-B as scikit-learn does, with ``tol`` as its gradient tolerance; calling scipy
    directly keeps the data float32 and skips importing ``sklearn.linear_model`` (0.35 s, more than
    the fits). The features are standardised once. C runs through ``Cs`` in increasing order, each fit
    starting from the previous solution (a warm start), and each solution is scored on the validation
    data; the best one is kept as it is (no refit). Before a weaker C is fitted to convergence (the
    slow fits), ``look_ahead`` iterations toward it must raise the validation accuracy above the best
    so far; the path stops as soon as a C, or the look ahead toward it, does not raise it, so ties
    keep the smaller C. ``tol`` 1e-3 (scikit-learn's default is 1e-4) reaches the same held-out
    accuracy in a third of the iterations (docs/benchmarks.md, "Baselines").
    """
    from scipy.optimize import minimize

    xs, mean, scale = standardise(np.asarray(features, dtype=np.float32), np.float32)
    xv = ((np.asarray(val_features, dtype=np.float64) - mean) / scale).astype(np.float32)
    y = np.asarray(y).astype(np.int64)
    y_val = np.asarray(y_val).astype(np.int64)
    present = np.unique(y)
    dim = xs.shape[1]
    f32 = np.float32
    Cs = sorted(float(C) for C in Cs)

    def solution(theta):
        """(coef, intercept) over all classes; classes absent from ``y`` get a very low bias."""
        w = theta.reshape(len(present), dim + 1)
        coef = np.zeros((num_classes, dim), dtype=f32)
        intercept = np.full(num_classes, -1e4, dtype=f32)
        coef[present], intercept[present] = w[:, :dim], w[:, dim]
        return coef, intercept

    def accuracy(coef, intercept) -> float:
        return float(((xv @ coef.T + intercept).argmax(1) == y_val).mean()) if len(y_val) else 0.0

    theta = np.zeros(len(present) * (dim + 1))
    if len(present) == 1:  # nothing to fit: every C gives the same constant classifier
        coef, intercept = solution(theta)
        score = accuracy(coef, intercept)
        return LogisticPath(coef, intercept, mean.astype(f32), scale.astype(f32), Cs[0], score, {Cs[0]: score})
    labels = np.searchsorted(present, y)  # the classes present, numbered 0..len(present)-1

    def fitted(objective, start, limit: int):
        options = {"maxiter": limit, "gtol": tol, "ftol": 64 * np.finfo(float).eps}
        theta = minimize(objective, start, jac=True, method="L-BFGS-B", options=options).x
        coef, intercept = solution(theta)
        return theta, coef, intercept, accuracy(coef, intercept)

    best, scores = None, {}
    with one_blas_thread():
        for C in Cs:
            # two classes: scikit-learn's binomial form (one weight vector v, penalty |v|^2) is the softmax
            # form with w1 = -w0 = v/2 at half the C
            objective = softmax_objective(xs, labels, len(present), C / 2 if len(present) == 2 else C)
            if best is not None and look_ahead:  # a few iterations toward C must raise the accuracy
                theta, coef, intercept, scores[C] = fitted(objective, theta, look_ahead)
                if scores[C] <= best[2]:
                    break
            theta, coef, intercept, scores[C] = fitted(objective, theta, max_iter)
            if best is not None and scores[C] <= best[2]:
                break
            best = (coef, intercept, scores[C], C)
    coef, intercept, score, C = best
    return LogisticPath(coef, intercept, mean.astype(f32), scale.astype(f32), C, score, scores)


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
