"""What a plugin may import from fusion-engine: the declared plugin API, in one place.

Built-in plugins (``fusion_engine.builtins``) and the plugin packages kept in this repository
import only from this module and, in their tests, from ``fusion_engine.testing``; a test checks
it. Everything else in the package may change between releases without notice.

- ``hookimpl``: marks a plugin's hook implementations (``register_backbones`` and friends).
- The error types a component raises for bad options, data or weights.
- Safe weight loading: ``load_weights_file`` (safetensors, or torch files with ``weights_only``;
  with ``sha256=``, the bytes are verified before they are parsed) and ``state_mismatch`` (which
  tensors are missing, unexpected or of another shape).
- The weights index (``--weights-dir`` folders, then weights shipped by installed packages):
  ``find_weights_entry``, ``weights_entries``, ``indexed_timm_model``, ``weights_dirs``,
  ``WEIGHTS_ENV_VAR``; ``hub_reachable`` says whether hub weights can be fetched now.
- Handcrafted features (HOG, colour histogram, LBP) and ``LinearProbe``, a logistic regression
  fitted by scikit-learn and kept as a torch module.
- ``suggest``: the "(did you mean ...?)" hint for an unknown name.
"""

from fusion_engine.artifacts.safe_files import load_weights_file, state_mismatch
from fusion_engine.core.handcrafted import (
    FEATURE_KINDS,
    color_histogram,
    handcrafted_features,
    hog_features,
    lbp_histogram,
)
from fusion_engine.core.hub import hub_reachable
from fusion_engine.core.probes import LinearProbe
from fusion_engine.core.weights_index import ENV_VAR as WEIGHTS_ENV_VAR
from fusion_engine.core.weights_index import all_entries as weights_entries
from fusion_engine.core.weights_index import find_entry as find_weights_entry
from fusion_engine.core.weights_index import timm_model as indexed_timm_model
from fusion_engine.core.weights_index import weights_dirs
from fusion_engine.errors import ConfigError, DataError, FusionEngineError, PluginError, WeightsError, suggest
from fusion_engine.hookspecs import hookimpl

__all__ = [
    "hookimpl",
    "FusionEngineError",
    "ConfigError",
    "DataError",
    "PluginError",
    "WeightsError",
    "load_weights_file",
    "state_mismatch",
    "find_weights_entry",
    "weights_entries",
    "indexed_timm_model",
    "weights_dirs",
    "WEIGHTS_ENV_VAR",
    "hub_reachable",
    "FEATURE_KINDS",
    "handcrafted_features",
    "hog_features",
    "color_histogram",
    "lbp_histogram",
    "LinearProbe",
    "suggest",
]
