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

    def normalised(self, features) -> list[torch.Tensor]:
        return [norm(f) for norm, f in zip(self.norms, features)]

    def weighted(self, normed, scale: torch.Tensor | None = None) -> torch.Tensor:
        """The head on the normalised branches, branch i multiplied by ``scale[:, i]`` (B, n) when given."""
        if scale is not None:
            normed = [scale[:, i : i + 1] * x for i, x in enumerate(normed)]
        return self.head(torch.cat(normed, dim=1))

    def forward(self, features):
        return self.weighted(self.normalised(features))


def _zero(layer: nn.Linear) -> nn.Linear:
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class Attention(nn.Module):
    """Concat whose branches are reweighted per sample by attention across branch tokens.

    Each normalised branch is projected to a token; tokens self-attend; a score per token, softmaxed
    over the branches, scales its branch in the concatenation (times the number of branches, so
    equal scores give concat). The score layer starts at zero: at initialisation the model is
    exactly :class:`Concat` (``self.concat``), and attention only moves away from it where the
    training data say so. ``last_weights`` holds the per-sample branch weights (B, n) of the last
    forward (summing to 1).
    """

    def __init__(self, in_dims, num_classes, dim, heads, layers, dropout, activation):
        super().__init__()
        self.concat = Concat(in_dims, num_classes, 0, dropout, activation)
        self.project = nn.ModuleList(nn.Linear(d, dim) for d in in_dims)
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
        self.score = _zero(nn.Linear(dim, 1))
        self.last_weights: torch.Tensor | None = None

    def forward(self, features):
        normed = self.concat.normalised(features)
        tokens = torch.stack([p(x) for p, x in zip(self.project, normed)], dim=1) + self.branch_embedding
        weights = torch.softmax(self.score(self.encoder(tokens)).squeeze(-1), dim=1)
        self.last_weights = weights.detach()
        return self.concat.weighted(normed, weights * len(normed))


class Gated(nn.Module):
    """Concat whose branches are scaled per sample by learned gates in (0, 1) (times 2).

    The gates come from a small MLP on the normalised branches; its last layer starts at zero, so
    every gate starts at 0.5 (scale 1) and the model at initialisation is exactly :class:`Concat`
    (``self.concat``). ``last_gates`` holds the per-sample gates (B, n_branches) of the last forward.
    """

    def __init__(self, in_dims, num_classes, dim, dropout, activation):
        super().__init__()
        self.concat = Concat(in_dims, num_classes, 0, dropout, activation)
        self.gate = nn.Sequential(
            nn.Linear(sum(in_dims), dim), ACTIVATIONS[activation](), _zero(nn.Linear(dim, len(in_dims)))
        )
        self.last_gates: torch.Tensor | None = None

    def forward(self, features):
        normed = self.concat.normalised(features)
        gates = torch.sigmoid(self.gate(torch.cat(normed, dim=1)))
        self.last_gates = gates.detach()
        return self.concat.weighted(normed, 2 * gates)


class Vote(nn.Module):
    """A linear head per branch; their log-probabilities averaged with branch weights (learned or fixed)
    and sharpened by a learned temperature: a weighted geometric mean of the branches' predictions.

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
        self.log_temperature = nn.Parameter(torch.zeros(()))

    @property
    def branch_heads(self) -> nn.ModuleList:
        """One head per branch, ``branch_heads[i](features[i])`` its logits: what training with independent
        branches (``train --independent-branches``) trains on each branch's own loss."""
        return self.heads

    def branch_weights(self) -> torch.Tensor:
        return torch.softmax(self.log_weights, dim=0)

    def forward(self, features):
        log_probs = torch.stack([torch.log_softmax(h(f), dim=1) for h, f in zip(self.heads, features)], dim=0)
        mixed = (self.branch_weights().view(-1, 1, 1) * log_probs).sum(dim=0) / self.log_temperature.exp()
        return torch.log_softmax(mixed, dim=1)


META_CS = (0.01, 0.1, 1.0, 10.0)  # the meta-classifier's inverse regularisation strengths tried by CV
LOG_FLOOR = float(np.log(1e-6))  # base log-probabilities are clipped here (a class a branch rules out)


class Stacking(nn.Module):
    """Per-branch logistic regressions; a meta logistic regression on their out-of-fold log-probabilities,
    or, when the meta-classifier does not beat it in cross-validation, the average of the branches'
    probabilities.

    Fitted by :meth:`fit` (stratified k-fold, as scikit-learn's StackingClassifier), not by
    gradient; afterwards it is a plain torch module of linear layers. Base classifiers are fitted along
    :meth:`LinearProbe.fit_path` (scipy's L-BFGS on float32 data); ``C`` (per branch) is chosen on the
    first fold's held rows from the probes' path unless given; ``meta_C`` by cross-validation on
    the out-of-fold log-probabilities unless given. ``use_meta`` (saved) records the choice and
    ``scores`` the cross-validated accuracies behind it.
    """

    requires_fit = True

    def __init__(self, in_dims, num_classes, folds, C, meta_C, seed):
        super().__init__()
        self.base = nn.ModuleList(LinearProbe(d, num_classes) for d in in_dims)
        self.meta = LinearProbe(len(in_dims) * num_classes, num_classes)
        self.num_classes, self.folds, self.C, self.meta_C, self.seed = num_classes, folds, C, meta_C, seed
        self.register_buffer("fitted", torch.tensor(False))
        self.register_buffer("use_meta", torch.tensor(True))
        self.scores: dict = {}

    def forward(self, features):
        log_probs = [torch.log_softmax(b(f), dim=1) for b, f in zip(self.base, features)]
        if bool(self.use_meta):
            return self.meta(torch.cat([lp.clamp_min(LOG_FLOOR) for lp in log_probs], dim=1))
        return torch.logsumexp(torch.stack(log_probs), dim=0) - float(np.log(len(log_probs)))

    def fit(self, features: list, y) -> Stacking:
        """Fit on per-branch feature arrays (N, D_i) and labels (N,)."""
        from sklearn.model_selection import StratifiedKFold

        y = np.asarray(y)
        k = self.num_classes
        folds = max(2, min(self.folds, int(np.bincount(y).min()) if len(y) else 2))
        splits = list(StratifiedKFold(n_splits=folds, shuffle=True, random_state=self.seed).split(np.zeros(len(y)), y))
        Cs: list = [self.C] * len(features)  # None: chosen on the first fold's held rows, then kept
        oof = np.zeros((len(y), len(features) * k), dtype=np.float32)
        for train, held in splits:
            for i, x in enumerate(features):
                probe = LinearProbe(x.shape[1], k)
                given = {"Cs": (Cs[i],)} if Cs[i] else {}  # else the probes' default path
                Cs[i] = probe.fit_path(x[train], y[train], x[held], y[held], **given).C
                oof[held, i * k : (i + 1) * k] = np.log(np.maximum(probe.predict_proba(x[held]), np.exp(LOG_FLOOR)))
        for probe, x, C in zip(self.base, features, Cs):
            probe.fit_path(x, y, x[:0], y[:0], Cs=(C,))  # one C: nothing to validate
        average = float((np.exp(oof).reshape(len(y), -1, k).mean(1).argmax(1) == y).mean())
        meta = {C: self._meta_score(oof, y, splits, C) for C in ([self.meta_C] if self.meta_C else META_CS)}
        meta_C = max(meta, key=meta.get)
        self.scores = {"average": average, "meta": meta, "C": Cs}
        self.use_meta.fill_(meta[meta_C] > average)
        if bool(self.use_meta):
            self.meta.fit(oof, y, C=meta_C, seed=self.seed)
        self.fitted.fill_(True)
        return self

    def _meta_score(self, oof, y, splits, C) -> float:
        """Cross-validated accuracy of the meta-classifier at ``C`` on the out-of-fold log-probabilities."""
        right = 0
        for train, held in splits:
            probe = LinearProbe(oof.shape[1], self.num_classes).fit(oof[train], y[train], C=C, seed=self.seed)
            right += int((probe.predict_proba(oof[held]).argmax(1) == y[held]).sum())
        return right / len(y)


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
    dropout: float = 0.2,
    activation: Activation = "gelu",
):
    _check("dim", dim, dim >= 1 and dim % heads == 0, f"a positive multiple of heads ({heads})")
    _check("layers", layers, layers >= 0, ">= 0")
    _check("dropout", dropout, 0 <= dropout < 1, "in [0, 1)")
    return Attention(in_dims, num_classes, dim, heads, layers, dropout, activation)


def gated(in_dims: list[int], num_classes: int, dim: int = 64, dropout: float = 0.2, activation: Activation = "gelu"):
    _check("dim", dim, dim >= 1, ">= 1")
    _check("dropout", dropout, 0 <= dropout < 1, "in [0, 1)")
    return Gated(in_dims, num_classes, dim, dropout, activation)


def vote(in_dims: list[int], num_classes: int, weights: list[float] | None = None, dropout: float = 0.2):
    if weights is not None:
        _check(
            "weights",
            weights,
            len(weights) == len(in_dims) and all(w > 0 for w in weights),
            f"{len(in_dims)} positive numbers, one per branch (or omitted to learn them)",
        )
    _check("dropout", dropout, 0 <= dropout < 1, "in [0, 1)")
    return Vote(in_dims, num_classes, weights, dropout)


def stacking(
    in_dims: list[int],
    num_classes: int,
    folds: int = 5,
    C: float | None = None,
    meta_C: float | None = None,
    seed: int = 0,
):
    _check("folds", folds, folds >= 2, ">= 2")
    _check("C", C, C is None or C > 0, "> 0 (or omitted: chosen per branch on held-out rows)")
    _check("meta_C", meta_C, meta_C is None or meta_C > 0, "> 0 (or omitted: chosen by cross-validation)")
    return Stacking(in_dims, num_classes, folds, C, meta_C, seed)


@hookimpl
def register_fusions(register):
    register("concat", concat, description="Concatenate normalised branch features; linear or MLP head")
    register("attention", attention, description="Concat reweighted per sample by self-attention across branches")
    register("gated", gated, description="Concat with per-sample learned gates on each branch")
    register("vote", vote, description="Per-branch heads; weighted average of log-probabilities")
    register(
        "stacking",
        stacking,
        description="Per-branch classifiers; a meta-classifier on their out-of-fold log-probabilities, or their average",
    )
