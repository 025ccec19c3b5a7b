"""The project's own error types: every failure a user can cause raises one of these."""


class FusionEngineError(Exception):
    """Base class of every error fusion-engine raises on purpose."""


class ConfigError(FusionEngineError, ValueError):
    """A fused-model config names an unknown component or option, or a bad value."""


class PluginError(FusionEngineError):
    """A plugin failed to import or register, or two plugins clash."""


class DataError(FusionEngineError, ValueError):
    """Input data is missing, unreadable or inconsistent."""


class ArtifactError(FusionEngineError):
    """A saved model is missing, altered, unsigned or cannot be loaded safely."""


class WeightsError(FusionEngineError):
    """Pretrained weights cannot be found, downloaded or read safely."""


class ExportError(FusionEngineError):
    """A model cannot be exported, or the exported model does not reproduce the original."""
