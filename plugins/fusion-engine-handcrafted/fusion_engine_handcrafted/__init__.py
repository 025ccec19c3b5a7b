"""Handcrafted image descriptors (HOG, colour histogram, LBP) as fusion-engine backbones."""

from .backbones import (
    KINDS,
    HandcraftedBackbone,
    color_histogram_backbone,
    handcrafted_backbone,
    hog_backbone,
    lbp_backbone,
)

__all__ = [
    "KINDS",
    "HandcraftedBackbone",
    "color_histogram_backbone",
    "handcrafted_backbone",
    "hog_backbone",
    "lbp_backbone",
]
__version__ = "0.1.0"
