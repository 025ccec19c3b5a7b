"""Classic image descriptors (HOG, colour histogram, LBP) for the handcrafted baseline.

Every function takes images as numpy or tensor, uint8 or float in [0, 1], in any layout
:func:`~fusion_engine.core.data.to_float_images` accepts, and returns float32 numpy (N, D). D depends
only on the parameters, never on the image size or on grey vs RGB input. Images are processed
in chunks, so memory stays bounded for any N.
"""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F

from fusion_engine.core.data import to_float_images
from fusion_engine.errors import ConfigError

FEATURE_KINDS = ("hog", "color", "lbp")
_CHUNK = 512
_LUMA = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)


def hog_features(images, *, size: int = 32, cell: int = 8, block: int = 2, bins: int = 9) -> np.ndarray:
    """Histograms of oriented gradients (Dalal & Triggs) of the grey image resized to ``size`` x ``size``.

    Unsigned gradients ([-1, 0, 1] filters), ``bins`` orientation bins over 0..180 degrees centred
    on 0, 180/bins, ... (bin 0 = horizontal gradient, i.e. vertical edges) with bilinear vote
    splitting, ``cell`` x ``cell`` pixel cells, ``block`` x ``block`` cell blocks at a one-cell
    stride, L2-Hys normalised. D = (size//cell - block + 1)**2 * block**2 * bins (324 by default).
    """
    if min(cell, block, bins) < 1 or size // cell < block:
        raise ConfigError(
            f"HOG needs cell, block, bins >= 1 and size // cell >= block; got size={size}, cell={cell}, block={block}, bins={bins}"
        )
    return _chunked(images, partial(_hog, size=size, cell=cell, block=block, bins=bins))


def color_histogram(images, *, bins: int = 8) -> np.ndarray:
    """Per-channel RGB histograms, ``bins`` bins each, each summing to 1: D = 3 * bins.

    A grey image counts as R = G = B, so it gives its grey histogram three times: the same
    features as the image converted to RGB.
    """
    if bins < 1:
        raise ConfigError(f"color_histogram needs bins >= 1, got {bins}")
    return _chunked(images, partial(_color, bins=bins))


def lbp_histogram(images, *, size: int = 32, grid: int = 2) -> np.ndarray:
    """Uniform local binary pattern histograms of the grey image resized to ``size`` x ``size``.

    8 neighbours at radius 1 (the 3x3 ring), 59 bins (58 uniform patterns + 1 for all others),
    one histogram summing to 1 per cell of a ``grid`` x ``grid`` grid: D = grid**2 * 59.
    """
    if grid < 1 or size - 2 < grid:
        raise ConfigError(f"LBP needs grid >= 1 and size - 2 >= grid; got size={size}, grid={grid}")
    return _chunked(images, partial(_lbp, size=size, grid=grid))


def handcrafted_features(images, *, kinds=("hog", "color")) -> np.ndarray:
    """Concatenated descriptors named by ``kinds`` (from :data:`FEATURE_KINDS`), default parameters."""
    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    unknown = [k for k in kinds if k not in FEATURE_KINDS]
    if unknown or not kinds:
        raise ConfigError(
            f"unknown handcrafted feature kind(s) {unknown or kinds}; valid kinds: {', '.join(FEATURE_KINDS)}"
        )
    funcs = [_FUNCS[k] for k in kinds]
    return _chunked(images, lambda x: torch.cat([f(x) for f in funcs], dim=1))


# --- implementation: each takes float (N, C, H, W) in [0, 1] and returns float32 (N, D) ------


def _chunked(images, fn) -> np.ndarray:
    """Apply ``fn`` to float image chunks of at most _CHUNK images and stack the results."""
    parts = [fn(to_float_images(images[i : i + _CHUNK])) for i in range(0, len(images), _CHUNK)]
    if not parts:  # no images: run once on a dummy image to get D
        parts = [fn(torch.zeros(1, 1, 8, 8))[:0]]
    return torch.cat(parts).numpy()


def _grey(x: torch.Tensor, size: int) -> torch.Tensor:
    """Grey (ITU-R 601 luma) images resized to (N, size, size)."""
    if x.shape[1] == 3:
        x = (x * _LUMA).sum(dim=1, keepdim=True)
    if tuple(x.shape[2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x[:, 0]


def _hog(x: torch.Tensor, *, size: int, cell: int, block: int, bins: int) -> torch.Tensor:
    n, cells = x.shape[0], size // cell
    p = F.pad(_grey(x, size)[:, None], (1, 1, 1, 1), mode="replicate")[:, 0]
    gx = p[:, 1:-1, 2:] - p[:, 1:-1, :-2]
    gy = p[:, 2:, 1:-1] - p[:, :-2, 1:-1]
    crop = cells * cell
    gx, gy = gx[:, :crop, :crop], gy[:, :crop, :crop]
    magnitude = torch.hypot(gx, gy)
    position = torch.atan2(gy, gx).remainder(math.pi) * (bins / math.pi)  # in [0, bins]
    lo = position.floor()
    w_hi = position - lo
    lo = lo.long() % bins
    votes = torch.zeros(n, bins, crop, crop)
    votes.scatter_add_(1, lo[:, None], (magnitude * (1 - w_hi))[:, None])
    votes.scatter_add_(1, ((lo + 1) % bins)[:, None], (magnitude * w_hi)[:, None])
    hist = votes.view(n, bins, cells, cell, cells, cell).sum(dim=(3, 5)).permute(0, 2, 3, 1)  # (N, cy, cx, bins)
    nb = cells - block + 1
    blocks = torch.cat([hist[:, i : i + nb, j : j + nb] for i in range(block) for j in range(block)], dim=-1)
    return _l2hys(blocks).flatten(1)


def _l2hys(v: torch.Tensor, clip: float = 0.2, eps: float = 1e-5) -> torch.Tensor:
    """L2-normalise the last axis, clip at ``clip``, renormalise."""
    v = v / torch.sqrt((v * v).sum(-1, keepdim=True) + eps**2)
    v = v.clamp(max=clip)
    return v / torch.sqrt((v * v).sum(-1, keepdim=True) + eps**2)


def _color(x: torch.Tensor, *, bins: int) -> torch.Tensor:
    n, (h, w) = x.shape[0], x.shape[2:]
    idx = (x.expand(-1, 3, -1, -1) * bins).long().clamp_(max=bins - 1)
    idx = idx + (torch.arange(n * 3) * bins).view(n, 3, 1, 1)
    counts = torch.bincount(idx.flatten(), minlength=n * 3 * bins)
    return counts.view(n, 3 * bins).float() / (h * w)


def _uniform_lbp_table() -> torch.Tensor:
    """Map each 8-bit LBP code to its uniform-pattern bin 0..57, or 58 for non-uniform codes."""
    table, next_bin = [], 0
    for code in range(256):
        transitions = sum(((code >> i) & 1) != ((code >> ((i + 1) % 8)) & 1) for i in range(8))
        table.append(next_bin if transitions <= 2 else 58)
        next_bin += transitions <= 2
    return torch.tensor(table)


_LBP_TABLE = _uniform_lbp_table()
_RING = ((-1, -1), (-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1))  # circular order


def _lbp(x: torch.Tensor, *, size: int, grid: int) -> torch.Tensor:
    g = (_grey(x, size) * 255).round()  # 8-bit levels, so flat areas give exact ties as in classic LBP
    n, inner = g.shape[0], size - 2
    centre = g[:, 1:-1, 1:-1]
    code = torch.zeros(n, inner, inner, dtype=torch.long)
    for bit, (dy, dx) in enumerate(_RING):
        code |= (g[:, 1 + dy : 1 + dy + inner, 1 + dx : 1 + dx + inner] >= centre).long() << bit
    band = torch.arange(inner) * grid // inner  # grid row/column of each pixel
    cell_of_pixel = band[:, None] * grid + band[None, :]
    key = (torch.arange(n).view(n, 1, 1) * grid * grid + cell_of_pixel) * 59 + _LBP_TABLE[code]
    counts = torch.bincount(key.flatten(), minlength=n * grid * grid * 59).view(n, grid * grid, 59).float()
    return (counts / counts.sum(-1, keepdim=True)).flatten(1)


_FUNCS = {
    "hog": partial(_hog, size=32, cell=8, block=2, bins=9),
    "color": partial(_color, bins=8),
    "lbp": partial(_lbp, size=32, grid=2),
}
