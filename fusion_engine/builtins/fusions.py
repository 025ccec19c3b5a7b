"""Built-in fusion strategies: concat, attention, gated, vote (trained by gradient) and stacking (fitted)."""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from torch import nn

from fusion_engine.plugin_api import LinearProbe, hookimpl

Activation = Literal["gelu", "relu", "silu", "tanh"]
ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU, "tanh": nn.Tanh}


def _check(name: str, value, ok: bool, valid: str):
    if not ok:
        raise ValueError(f"{name} must be {valid}, got {value!r}")


class Concat(nn.Module):
    """Normalise each branch, concatenate, then a linear layer or an MLP."""

    def __init__(self, in_dims, num_classes, hidden, dropout, activation):
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(d) for d in in_dims)
        width = sum(in_dims)
        layers: list[nn.Module] = [nn.Dropout(dropout)]
        if hidden:
            layers += [nn.Linear(width, hidden), ACTIVATIONS[activation](), nn.Dropout(dropout)]
            width = hidden
        self.head = nn.Sequential(*layers, nn.Linear(width, num_classes))

    def forward(self, features):
        return self.head(torch.cat([norm(f) for norm, f in zip(self.norms, features)], dim=1))


class Attention(nn.Module):
    """Branches as tokens: project to a common width, self-attend across branches, attention-pool.

    ``last_weights`` holds the per-sample branch weights (B, n_branches) of the last forward.
    """

    def __init__(self, in_dims, num_classes, dim, heads, layers, dropout, activation):
        super().__init__()
        self.project = nn.ModuleList(nn.Sequential(nn.LayerNorm(d), nn.Linear(d, dim)) for d in in_dims)
        self.branch_embedding = nn.Parameter(torch.zeros(len(in_dims), dim))
        encoder_layer = nn.TransformerEncoderLayer(
            dim,
            heads,
            dim * 2,
            dropout,
            activation=activation if activation in ("gelu", "relu") else "gelu",
            batch_first=True,
            norm_first=True,
        )
        self.encoder = (
            nn.TransformerEncoder(encoder_layer, layers, enable_nested_tensor=False) if layers else nn.Identity()
        )
        self.score = nn.Linear(dim, 1)
        self.head = nn.Sequential(nn.LayerNorm(dim), nn.Dropout(dropout), nn.Linear(dim, num_classes))
        self.last_weights: torch.Tensor | None = None

    def forward(self, features):
        tokens = torch.stack([p(f) for p, f in zip(self.project, features)], dim=1) + self.branch_embedding
        tokens = self.encoder(tokens)
        weights = torch.softmax(self.score(tokens).squeeze(-1), dim=1)
        self.last_weights = weights.detach()
        return self.head((weights.unsqueeze(-1) * tokens).sum(dim=1))


class Gated(nn.Module):
    """Each branch projected to a common width; learned gates weigh them per sample.

    ``last_gates`` holds the per-sample gates (B, n_branches) of the last forward.
    """

    def __init__(self, in_dims, num_classes, dim, dropout, activation):
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(d) for d in in_dims)
        self.project = nn.ModuleList(nn.Sequential(nn.Linear(d, dim), ACTIVATIONS[activation]()) for d in in_dims)
        self.gate = nn.Linear(sum(in_dims), len(in_dims))
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(dim, num_classes))
        self.last_gates: torch.Tensor | None = None

    def forward(self, features):
        normed = [norm(f) for norm, f in zip(self.norms, features)]
        gates = torch.sigmoid(self.gate(torch.cat(normed, dim=1)))
        self.last_gates = gates.detach()
        fused = sum(gates[:, i : i + 1] * p(x) for i, (p, x) in enumerate(zip(self.project, normed)))
        return self.head(fused)


class Vote(nn.Module):
    """A linear head per branch; weighted average of their probabilities (weights learned or fixed).

    Returns log-probabilities, which act as logits.
    """

    def __init__(self, in_dims, num_classes, weights, dropout):
        super().__init__()
        self.heads = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(d), nn.Dropout(dropout), nn.Linear(d, num_classes)) for d in in_dims
        )
        n = len(in_dims)
        initial = torch.log(torch.tensor(weights, dtype=torch.float32)) if weights else torch.zeros(n)
        self.log_weights = nn.Parameter(initial, requires_grad=weights is None)

    def branch_weights(self) -> torch.Tensor:
        return torch.softmax(self.log_weights, dim=0)

    def forward(self, features):
        probs = torch.stack([torch.softmax(h(f), dim=1) for h, f in zip(self.heads, features)], dim=0)
        mixed = (self.branch_weights().view(-1, 1, 1) * probs).sum(dim=0)
        return torch.log(mixed.clamp_min(1e-12))


class Stacking(nn.Module):
    """Per-branch logistic regressions; a meta logistic regression on their out-of-fold probabilities.

    Fitted by :meth:`fit` (stratified k-fold, as scikit-learn's StackingClassifier), not by
    gradient; afterwards it is a plain torch module of linear layers.
    """

    requires_fit = True

    def __init__(self, in_dims, num_classes, folds, C, meta_C, seed):
        super().__init__()
        self.base = nn.ModuleList(LinearProbe(d, num_classes) for d in in_dims)
        self.meta = LinearProbe(len(in_dims) * num_classes, num_classes)
        self.num_classes, self.folds, self.C, self.meta_C, self.seed = num_classes, folds, C, meta_C, seed
        self.register_buffer("fitted", torch.tensor(False))

    def forward(self, features):
        probs = [torch.softmax(b(f), dim=1) for b, f in zip(self.base, features)]
        return self.meta(torch.cat(probs, dim=1))

    def fit(self, features: list, y) -> Stacking:
        """Fit on per-branch feature arrays (N, D_i) and labels (N,)."""
        from sklearn.model_selection import StratifiedKFold

        y = np.asarray(y)
        folds = max(2, min(self.folds, int(np.bincount(y).min()) if len(y) else 2))
        splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=self.seed)
        oof = np.zeros((len(y), len(features) * self.num_classes), dtype=np.float32)
        for train, held in splitter.split(np.zeros(len(y)), y):
            for i, x in enumerate(features):
                probe = LinearProbe(x.shape[1], self.num_classes).fit(x[train], y[train], C=self.C, seed=self.seed)
                oof[held, i * self.num_classes : (i + 1) * self.num_classes] = probe.predict_proba(x[held])
        for probe, x in zip(self.base, features):
            probe.fit(x, y, C=self.C, seed=self.seed)
        self.meta.fit(oof, y, C=self.meta_C, seed=self.seed)
        self.fitted.fill_(True)
        return self


def concat(
    in_dims: list[int], num_classes: int, hidden: int = 0, dropout: float = 0.2, activation: Activation = "gelu"
):
    _check("hidden", hidden, hidden >= 0, ">= 0 (0: no hidden layer)")
    _check("dropout", dropout, 0 <= dropout < 1, "in [0, 1)")
    return Concat(in_dims, num_classes, hidden, dropout, activation)


def attention(
    in_dims: list[int],
    num_classes: int,
    dim: int = 256,
    heads: int = 4,
    layers: int = 1,
    dropout: float = 0.1,
    activation: Activation = "gelu",
):
    _check("dim", dim, dim >= 1 and dim % heads == 0, f"a positive multiple of heads ({heads})")
    _check("layers", layers, layers >= 0, ">= 0")
    _check("dropout", dropout, 0 <= dropout < 1, "in [0, 1)")
    return Attention(in_dims, num_classes, dim, heads, layers, dropout, activation)


def gated(in_dims: list[int], num_classes: int, dim: int = 256, dropout: float = 0.1, activation: Activation = "gelu"):
    _check("dim", dim, dim >= 1, ">= 1")
    _check("dropout", dropout, 0 <= dropout < 1, "in [0, 1)")
    return Gated(in_dims, num_classes, dim, dropout, activation)


def vote(in_dims: list[int], num_classes: int, weights: list[float] | None = None, dropout: float = 0.0):
    if weights is not None:
        _check(
            "weights",
            weights,
            len(weights) == len(in_dims) and all(w > 0 for w in weights),
            f"{len(in_dims)} positive numbers, one per branch (or omitted to learn them)",
        )
    _check("dropout", dropout, 0 <= dropout < 1, "in [0, 1)")
    return Vote(in_dims, num_classes, weights, dropout)


def stacking(in_dims: list[int], num_classes: int, folds: int = 5, C: float = 1.0, meta_C: float = 1.0, seed: int = 0):
    _check("folds", folds, folds >= 2, ">= 2")
    _check("C", C, C > 0, "> 0")
    _check("meta_C", meta_C, meta_C > 0, "> 0")
    return Stacking(in_dims, num_classes, folds, C, meta_C, seed)


@hookimpl
def register_fusions(register):
    register("concat", concat, description="Concatenate normalised branch features; linear or MLP head")
    register("attention", attention, description="Self-attention across branch tokens, attention pooling")
    register("gated", gated, description="Per-sample learned gates weigh each branch")
    register("vote", vote, description="Per-branch heads; learned or fixed weighted average of probabilities")
    register("stacking", stacking, description="Out-of-fold per-branch classifiers + meta-classifier (fitted)")
