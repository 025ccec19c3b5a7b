"""fusion-engine plugin offering the CIFAR ResNets (He et al. 2016, option-A shortcuts)."""

from .model import DEPTHS, CifarResNet

__all__ = ["DEPTHS", "CifarResNet"]
__version__ = "0.1.0"
