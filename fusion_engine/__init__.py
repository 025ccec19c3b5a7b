"""fusion-engine: fuse several pretrained image backbones into one classifier."""

from fusion_engine.api.classifier import FusedClassifier
from fusion_engine.api.engine import Engine, load
from fusion_engine.core.config import FusedModelConfig, parse_config
from fusion_engine.errors import (
    ArtifactError,
    ConfigError,
    DataError,
    ExportError,
    FusionEngineError,
    NotFittedError,
    PluginError,
    RandomInitWarning,
    WeightsError,
)
from fusion_engine.hookspecs import hookimpl
from fusion_engine.version import __version__

__all__ = [
    "Engine",
    "FusedClassifier",
    "FusedModelConfig",
    "load",
    "parse_config",
    "hookimpl",
    "FusionEngineError",
    "ConfigError",
    "PluginError",
    "DataError",
    "ArtifactError",
    "WeightsError",
    "RandomInitWarning",
    "ExportError",
    "NotFittedError",
    "__version__",
]
