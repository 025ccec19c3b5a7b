"""Low-rank (MFB) bilinear pooling fusion for fusion-engine."""

from .fusion import BilinearFusion, bilinear_fusion

__all__ = ["BilinearFusion", "bilinear_fusion"]
__version__ = "0.1.0"
