"""Plugin discovery: built-ins, installed entry points and given modules, each loaded on its own.

A plugin that fails to import or to register is kept as a failure (shown by
``fusion-engine list``) instead of taking the engine down, unless
``FUSION_ENGINE_STRICT_PLUGINS=1``. Environment variables:

- ``FUSION_ENGINE_LOAD_PLUGINS``: comma-separated allow-list of entry-point plugins
  (empty string: built-ins only).
- ``FUSION_ENGINE_DISABLE_PLUGINS``: comma-separated deny-list.
- ``FUSION_ENGINE_STRICT_PLUGINS=1``: a plugin failure is an error.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import traceback
from dataclasses import dataclass

import pluggy

from . import hookspecs
from .errors import PluginError

ENTRY_POINT_GROUP = "fusion_engine"
# The package's own plugins; pyproject.toml registers the same modules as entry points.
BUILTIN_PLUGINS = {
    "timm_backbones": "fusion_engine.builtins.timm_backbones",
    "extractors": "fusion_engine.builtins.extractors",
    "fusions": "fusion_engine.builtins.fusions",
}
HOOKS = {"backbone": "register_backbones", "extractor": "register_extractors", "fusion": "register_fusions"}


@dataclass
class PluginInfo:
    """A loaded plugin: its name, version and where it came from."""

    name: str
    version: str | None
    source: str  # "built-in", "entry point" or "given"
    distribution: str | None = None


@dataclass
class PluginFailure:
    """A plugin that could not be imported, validated or registered."""

    name: str
    version: str | None
    distribution: str | None
    error: str
    details: str = ""


def _env_list(name: str) -> list[str] | None:
    value = os.environ.get(name)
    if value is None:
        return None
    return [item.strip() for item in value.split(",") if item.strip()]


def strict_mode() -> bool:
    return os.environ.get("FUSION_ENGINE_STRICT_PLUGINS", "").strip().lower() in ("1", "true", "yes")


def _version_of(plugin) -> str | None:
    version = getattr(plugin, "__version__", None)
    if version:
        return str(version)
    top = getattr(plugin, "__name__", "").split(".")[0]
    for dist in importlib.metadata.packages_distributions().get(top, []):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


class PluginLoader:
    """Registers plugins with a pluggy manager, keeping provenance and failures."""

    def __init__(self):
        self.manager = pluggy.PluginManager(hookspecs.PROJECT)
        self.manager.add_hookspecs(hookspecs)
        self.infos: list[PluginInfo] = []
        self.failures: list[PluginFailure] = []
        self.strict = strict_mode()

    def _fail(self, name, version, distribution, exc: BaseException, raise_now: bool = False):
        message = f"{type(exc).__name__}: {exc}"
        failure = PluginFailure(name, version, distribution, message, traceback.format_exc())
        if raise_now or self.strict:
            raise PluginError(f"Error loading plugin '{name}'"
                              + (f" ({distribution} {version})" if distribution else "") + f": {message}") from exc
        self.failures.append(failure)

    def add(self, plugin, name: str, info: PluginInfo) -> bool:
        """Register one plugin object/module; check that its hooks exist (pluggy check_pending)."""
        if self.manager.has_plugin(name) or self.manager.is_registered(plugin):
            return False
        try:
            self.manager.register(plugin, name=name)
            self.manager.check_pending()
        except Exception as exc:
            if self.manager.has_plugin(name):
                self.manager.unregister(name=name)
            self._fail(name, info.version, info.distribution, exc, raise_now=info.source == "given")
            return False
        self.infos.append(info)
        return True

    def load_builtins(self, disabled: set[str]):
        for name, module_name in BUILTIN_PLUGINS.items():
            if name in disabled or self.manager.has_plugin(name):
                continue
            module = importlib.import_module(module_name)
            from . import __version__
            self.add(module, name, PluginInfo(name, __version__, "built-in", "fusion-engine"))

    def load_entry_points(self, allowed: list[str] | None, disabled: set[str]):
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            dist = ep.dist.name if ep.dist else None
            version = ep.dist.version if ep.dist else None
            builtin = ep.name in BUILTIN_PLUGINS and ep.value == BUILTIN_PLUGINS[ep.name]
            if ep.name in disabled or (dist and dist in disabled):
                continue
            if not builtin and allowed is not None and ep.name not in allowed and dist not in allowed:
                continue
            try:
                plugin = ep.load()
            except Exception as exc:
                self._fail(ep.name, version, dist, exc)
                continue
            source = "built-in" if builtin else "entry point"
            self.add(plugin, ep.name, PluginInfo(ep.name, version, source, dist))

    def load_given(self, plugins, disabled: set[str]):
        for plugin in plugins:
            if isinstance(plugin, str):
                try:
                    plugin = importlib.import_module(plugin)
                except Exception as exc:
                    self._fail(plugin, None, None, exc, raise_now=True)
            name = getattr(plugin, "__name__", None) or type(plugin).__name__
            if name in disabled:
                continue
            base, n = name, 1
            while self.manager.has_plugin(name) and self.manager.get_plugin(name) is not plugin:
                n += 1  # another object with the same name (two instances of one class): keep both
                name = f"{base}#{n}"
            self.add(plugin, name, PluginInfo(name, _version_of(plugin), "given"))

    def collect(self, make_component) -> list:
        """Call every registration hook, plugin by plugin; return the components they offer.

        ``make_component(kind, name, factory, description, info)`` builds one component. A
        plugin whose hook raises (or registers something invalid) is recorded as a failure
        and none of its components are kept.
        """
        impls: dict[str, list] = {}
        for kind, hook_name in HOOKS.items():
            for impl in reversed(getattr(self.manager.hook, hook_name).get_hookimpls()):
                impls.setdefault(impl.plugin_name, []).append((kind, impl))
        components = []
        for info in list(self.infos):
            offered = []
            try:
                for kind, impl in impls.get(info.name, []):
                    def register(name, factory, *, description="", _kind=kind):
                        offered.append(make_component(_kind, name, factory, description, info))
                    impl.function(register=register)
            except Exception as exc:
                self._fail(info.name, info.version, info.distribution, exc, raise_now=info.source == "given")
                self.manager.unregister(name=info.name)
                self.infos.remove(info)
                continue
            components.extend(offered)
        return components

    def info(self, name: str) -> PluginInfo | None:
        return next((i for i in self.infos if i.name == name), None)


def load_plugins(plugins=None, *, entry_points: bool = True) -> PluginLoader:
    """Built-ins, then installed entry points (filtered by the env vars), then ``plugins``."""
    loader = PluginLoader()
    disabled = set(_env_list("FUSION_ENGINE_DISABLE_PLUGINS") or [])
    if entry_points:
        loader.load_entry_points(_env_list("FUSION_ENGINE_LOAD_PLUGINS"), disabled)
    loader.load_builtins(disabled)  # when the package's own entry points are not installed
    loader.load_given(plugins or [], disabled)
    return loader
