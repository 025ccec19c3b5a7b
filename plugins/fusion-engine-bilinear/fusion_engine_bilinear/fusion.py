"""Low-rank bilinear pooling (MFB, Yu et al. 2017; MLB, Kim et al. 2017) over n branches.

For branch features x_1..x_n, with U_i a Linear(in_dims[i] -> k*o):

    h = dropout(U_1 x_1 * U_2 x_2 * ... * U_n x_n)       elementwise, shape (B, k*o)
    z = sum over k of h viewed as (B, o, k)                MFB sum pooling
    z = l2_normalize(sign(z) * sqrt(|z|))                  if normalize
    logits = W z + b                                       W: Linear(o -> num_classes)

With one branch this is a factorised projection followed by the same pooling.
"""

import torch
import torch.nn.functional as F
from torch import nn

from fusion_engine.plugin_api import ConfigError, DataError

_SQRT_EPS = 1e-8  # keeps the signed square root's gradient finite at 0


def _check_int(name, value, low):
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")


class BilinearFusion(nn.Module):
    def __init__(self, in_dims, num_classes, factor=5, dim=256, dropout=0.1, normalize=True):
        super().__init__()
        if not in_dims:
            raise ConfigError("in_dims must list at least one branch width")
        for d in in_dims:
            _check_int("each of in_dims", d, 1)
        _check_int("num_classes", num_classes, 1)
        _check_int("factor", factor, 1)
        _check_int("dim", dim, 1)
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ConfigError(f"dropout must be a number in [0, 1), got {dropout!r}")
        self.in_dims, self.factor, self.dim, self.normalize = list(in_dims), factor, dim, bool(normalize)
        self.projections = nn.ModuleList(nn.Linear(d, factor * dim) for d in in_dims)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(dim, num_classes)

    def forward(self, features):
        if len(features) != len(self.projections):
            raise DataError(f"expected {len(self.projections)} feature tensors, got {len(features)}")
        fused = None
        for proj, x in zip(self.projections, features):
            h = proj(x)
            fused = h if fused is None else fused * h
        z = self.dropout(fused).view(-1, self.dim, self.factor).sum(dim=-1)
        if self.normalize:
            z = torch.sign(z) * torch.sqrt(z.abs() + _SQRT_EPS)
            z = F.normalize(z, dim=-1)
        return self.classifier(z)


def bilinear_fusion(
    in_dims: list[int],
    num_classes: int,
    *,
    factor: int = 5,
    dim: int = 256,
    dropout: float = 0.1,
    normalize: bool = True,
) -> BilinearFusion:
    """Low-rank (MFB) bilinear pooling across any number of branches.

    factor: rank k per output unit (>= 1); dim: pooled width o (>= 1);
    dropout: rate on the fused product, in [0, 1); normalize: signed sqrt + L2 after pooling.
    """
    return BilinearFusion(in_dims, num_classes, factor=factor, dim=dim, dropout=dropout, normalize=normalize)
