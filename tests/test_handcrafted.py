"""Tests of fusion_engine.core.handcrafted: fixed dimensions, HOG orientation, determinism, real-data sanity."""

from pathlib import Path

import numpy as np
import pytest
import torch

from fusion_engine.core.handcrafted import (
    FEATURE_KINDS,
    color_histogram,
    handcrafted_features,
    hog_features,
    lbp_histogram,
)
from fusion_engine.errors import ConfigError

SHARED = Path(__file__).resolve().parents[1].parent / "shared"

DIMS = {"hog": 324, "color": 24, "lbp": 236}


def rgb(n, h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("kind", FEATURE_KINDS)
@pytest.mark.parametrize(
    "images",
    [
        rgb(3, 32, 32),
        rgb(3, 17, 45)[..., 0],  # grey (N, H, W)
        torch.rand(3, 1, 64, 20),  # grey tensor (N, C, H, W)
        torch.rand(3, 3, 9, 9).numpy(),  # float numpy (N, C, H, W)
    ],
)
def test_dimension_fixed_for_any_size_and_channels(kind, images):
    out = handcrafted_features(images, kinds=(kind,))
    assert out.shape == (3, DIMS[kind]) and out.dtype == np.float32
    assert np.isfinite(out).all()


def test_combined_features_and_empty_input():
    x = rgb(4, 32, 32)
    out = handcrafted_features(x, kinds=("hog", "color", "lbp"))
    assert out.shape == (4, sum(DIMS.values()))
    assert np.allclose(out, np.concatenate([hog_features(x), color_histogram(x), lbp_histogram(x)], axis=1))
    assert handcrafted_features(x[:0]).shape == (0, DIMS["hog"] + DIMS["color"])


def test_parameters_change_dimension():
    x = rgb(2, 20, 20)
    assert hog_features(x, size=64, cell=8, block=2, bins=6).shape == (2, 7 * 7 * 4 * 6)
    assert color_histogram(x, bins=4).shape == (2, 12)
    assert lbp_histogram(x, grid=3).shape == (2, 9 * 59)


def test_grey_equals_its_rgb_copy():
    grey = rgb(3, 24, 24)[..., 0]
    as_rgb = np.repeat(grey[..., None], 3, axis=-1)
    for fn in (hog_features, color_histogram, lbp_histogram):
        assert np.allclose(fn(grey), fn(as_rgb), atol=1e-5)


def test_histograms_are_normalised():
    x = rgb(5, 16, 16)
    assert np.allclose(color_histogram(x).reshape(5, 3, 8).sum(-1), 1)
    assert np.allclose(lbp_histogram(x).reshape(5, 4, 59).sum(-1), 1)


def test_hog_of_vertical_edge_is_horizontal_gradient():
    edge = np.zeros((1, 32, 32), dtype=np.float32)
    edge[:, :, 16:] = 1  # vertical edge: intensity changes along x
    blocks = hog_features(edge).reshape(-1, 9)  # rows: one cell's histogram inside a block
    assert blocks[:, 0].sum() / blocks.sum() > 0.99  # bin 0 = 0 degrees = horizontal gradient
    horizontal = hog_features(edge.transpose(0, 2, 1)).reshape(-1, 9)
    assert horizontal[:, 4:6].sum() / horizontal.sum() > 0.99  # 90 degrees splits between 80 and 100
    assert hog_features(np.full((1, 32, 32), 0.5)).max() == 0  # flat image: no gradients


def test_lbp_of_flat_image_is_one_uniform_pattern():
    out = lbp_histogram(np.full((1, 32, 32), 0.3)).reshape(4, 59)
    assert (out.max(axis=1) == 1).all()  # every neighbour >= centre: code 255, one bin per cell


def test_deterministic_and_chunk_independent():
    x = rgb(600, 32, 32)  # more than one 512-image chunk
    a = handcrafted_features(x, kinds=FEATURE_KINDS)
    assert np.array_equal(a, handcrafted_features(x, kinds=FEATURE_KINDS))
    assert np.allclose(a[550:], handcrafted_features(x[550:], kinds=FEATURE_KINDS), atol=1e-6)


def test_unknown_kind_lists_valid_ones():
    with pytest.raises(ValueError, match="sift.*hog, color, lbp"):
        handcrafted_features(rgb(1, 8, 8), kinds=("hog", "sift"))
    with pytest.raises(ConfigError):
        hog_features(rgb(1, 8, 8), size=8, cell=8)


@pytest.mark.skipif(not (SHARED / "data" / "usps_train.npz").is_file(), reason=f"real data {SHARED / 'data'} is absent")
def test_usps_hog_color_probe_beats_chance():
    from fusion_engine.core.probes import LinearProbe

    d = np.load(SHARED / "data" / "usps_train.npz")
    rng = np.random.default_rng(0)
    order = rng.permutation(len(d["y"]))[:2000]
    x, y = d["x"][order], d["y"][order]
    features = handcrafted_features(x)
    probe = LinearProbe(features.shape[1], 10).fit(features[:1500], y[:1500])
    accuracy = (probe.predict_proba(features[1500:]).argmax(1) == y[1500:]).mean()
    print(f"USPS HOG+colour linear probe, 1500 train / 500 held out: accuracy {accuracy:.3f}")
    assert accuracy > 0.8
