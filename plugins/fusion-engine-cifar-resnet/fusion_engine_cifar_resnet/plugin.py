"""The fusion-engine hook: registers the ``cifar_resnet`` backbone."""

from typing import Literal

from fusion_engine.plugin_api import hookimpl

from .model import DEPTHS, CifarResNet
from .weights import load_weights, pretrained_path

ModelName = Literal["resnet20", "resnet32", "resnet44", "resnet56"]  # the keys of DEPTHS


class CifarResNetBackbone(CifarResNet):
    """A CIFAR ResNet under the engine's backbone contract.

    ``forward`` takes resized, normalised (B, 3, 32, 32) images and returns the final
    (B, 64, 8, 8) map; ``classify`` gives the original 10-class logits.
    """

    feature_dim = 64
    output_kind = "map"

    def __init__(self, blocks_per_stage: int):
        super().__init__(blocks_per_stage)
        self.data_config = {
            "input_size": (3, 32, 32),
            "mean": (0.485, 0.456, 0.406),
            "std": (0.229, 0.224, 0.225),
            "interpolation": "bilinear",
        }

    def forward(self, x):
        return self.forward_features(x)

    def classify(self, x):
        return self.forward_head(self.forward_features(x))


def cifar_resnet_backbone(
    model: ModelName = "resnet20", weights: str | None = None, pretrained: bool = False
) -> CifarResNetBackbone:
    """CIFAR ResNet ``model`` with ``weights`` (a file path) or, if ``pretrained``, the published weights."""
    if model not in DEPTHS:
        raise ValueError(f"unknown cifar_resnet model {model!r}; valid: {', '.join(DEPTHS)}")
    backbone = CifarResNetBackbone(DEPTHS[model])
    if weights is None and pretrained:
        weights = pretrained_path(model)
    if weights is not None:
        load_weights(backbone, model, weights)
    return backbone.eval()


@hookimpl
def register_backbones(register):
    register(
        "cifar_resnet",
        cifar_resnet_backbone,
        description="CIFAR ResNet-20/32/44/56 (option-A shortcuts), not in timm",
    )
