"""fusion-engine: fuse several pretrained image backbones into one classifier."""

from .errors import ArtifactError, ConfigError, DataError, FusionEngineError, PluginError, WeightsError
from .hookspecs import hookimpl

__version__ = "0.1.0"
from .config import FusedModelConfig, parse_config
from .engine import Engine
from .model import FusedClassifier

__all__ = ["Engine", "FusedClassifier", "FusedModelConfig", "parse_config", "hookimpl", "FusionEngineError",
           "ConfigError", "PluginError", "DataError", "ArtifactError", "WeightsError", "__version__"]
