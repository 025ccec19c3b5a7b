"""Testing helpers for plugin authors: register a plugin for one test, and conformance checks.

    from fusion_engine.testing import check_backbone, check_extractor, check_fusion, register_plugin

- :func:`register_plugin` (a pytest fixture), :func:`plugin_fixture` (a fixture factory) and
  :func:`registered_plugins` (a context manager, no pytest needed) make plugins visible to
  every ``Engine.from_plugins()`` -- and so to the CLI run in-process -- and undo it afterwards
  (:mod:`fusion_engine.testing.registration`).
- :func:`check_backbone`, :func:`check_extractor`, :func:`check_fusion` build one component
  (from its factory, or by registered name) and assert the contract of docs/plugins.md:
  output shapes, gradient flow, an eval-mode batch of one, a tensors-only state dict that
  round-trips through safetensors with identical outputs, and determinism in eval mode. A
  fitted fusion (``requires_fit = True``) is fitted with ``fit(features, y)`` first.
  :func:`check_plugin` runs the right check on every component a plugin registers
  (:mod:`fusion_engine.testing.checks`).

Every failure is an ``AssertionError`` whose message says what to fix. The checks return
the built (and, for a fitted fusion, fitted) component for further tests of your own.

A test module picks the fixture up by importing it (``from fusion_engine.testing import
register_plugin``); a top-level ``conftest.py`` may instead say ``pytest_plugins = ["fusion_engine.testing"]``.
It is deliberately not a ``pytest11`` entry point: that would import fusion-engine (and torch)
into every pytest run of an environment where it is installed.
"""

from fusion_engine.testing.checks import check_backbone, check_extractor, check_fusion, check_plugin
from fusion_engine.testing.registration import PluginRegistration, plugin_fixture, registered_plugins

__all__ = [
    "PluginRegistration",
    "register_plugin",
    "plugin_fixture",
    "registered_plugins",
    "check_backbone",
    "check_extractor",
    "check_fusion",
    "check_plugin",
]

try:
    from fusion_engine.testing.registration import register_plugin  # a pytest fixture: only with pytest installed
except ImportError:
    __all__.remove("register_plugin")
