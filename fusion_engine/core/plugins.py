"""Plugin discovery: built-ins, installed entry points, extra and given plugins, each loaded on its own.

A plugin that fails in any way is kept as a failure (shown by ``fusion-engine list``) instead of
taking the engine down, unless ``FUSION_ENGINE_STRICT_PLUGINS=1``: it fails to import, calls
``sys.exit()`` (SystemExit is caught like any error; only KeyboardInterrupt goes through), has an
unknown hook, raises in a hook, registers something invalid, or registers a component name that an
earlier plugin holds (the earlier one keeps it, and a built-in always keeps its names; every
component of the failed plugin is withdrawn). An installed entry point named like a built-in is
refused the same way: a built-in cannot be replaced. Environment variables:

- ``FUSION_ENGINE_LOAD_PLUGINS``: comma-separated allow-list of entry-point plugins
  (empty string: built-ins only).
- ``FUSION_ENGINE_DISABLE_PLUGINS``: comma-separated deny-list.
- ``FUSION_ENGINE_STRICT_PLUGINS=1``: a plugin failure is an error.

Extra plugins: :func:`add_extra_plugins` makes plugins load in every :func:`load_plugins` (so
in every ``Engine.from_plugins()``, the CLI's included) until :func:`remove_extra_plugins`
takes them out again. This is the seam :mod:`fusion_engine.testing` registers plugins for one
test with; they load as given plugins (source "given"), after the entry points and before the
plugins given to the call.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import traceback
from dataclasses import dataclass

import pluggy

import fusion_engine.hookspecs as hookspecs
from fusion_engine.errors import PluginError

ENTRY_POINT_GROUP = "fusion_engine"
OWN_DISTRIBUTION = "fusion-engine"  # entry points of this distribution are the built-in plugins
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


# Errors that end the process on purpose and are never a plugin failure.
_NOT_ISOLATED = (KeyboardInterrupt, GeneratorExit)


def _is_builtin(ep) -> bool:
    """One of fusion-engine's own entry points: of this distribution, pointing into ``fusion_engine.builtins``."""
    own = bool(ep.dist) and ep.dist.name.replace("_", "-").lower() == OWN_DISTRIBUTION
    return own and ep.value.split(":")[0].strip().startswith("fusion_engine.builtins.")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, SystemExit):
        return f"SystemExit: the plugin called sys.exit({exc.code!r})"
    return f"{type(exc).__name__}: {exc}"


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
        """Record ``exc`` as the failure of plugin ``name``; raise PluginError instead when ``raise_now``
        (a plugin given to the call) or in strict mode."""
        message = _describe(exc)
        details = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)) if exc.__traceback__ else ""
        failure = PluginFailure(name, version, distribution, message, details)
        if raise_now or self.strict:
            raise PluginError(
                f"Error loading plugin '{name}'"
                + (f" ({distribution} {version})" if distribution else "")
                + f": {message}"
            ) from exc
        self.failures.append(failure)

    def add(self, plugin, name: str, info: PluginInfo) -> bool:
        """Register one plugin object/module; check that its hooks exist (pluggy check_pending)."""
        if self.manager.has_plugin(name) or self.manager.is_registered(plugin):
            return False
        try:
            self.manager.register(plugin, name=name)
            self.manager.check_pending()
        except BaseException as exc:
            if isinstance(exc, _NOT_ISOLATED):
                raise
            if self.manager.has_plugin(name):
                self.manager.unregister(name=name)
            self._fail(name, info.version, info.distribution, exc, raise_now=info.source == "given")
            return False
        self.infos.append(info)
        return True

    def load_entry_points(self, allowed: list[str] | None, disabled: set[str], *, third_party: bool = True):
        """The built-ins (fusion-engine's own entry points) first, then, with ``third_party``, every
        other installed plugin allowed by ``allowed``. An entry point named like a built-in (loaded or
        not) or like a plugin already loaded is a failure and is not imported."""
        points = sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: not _is_builtin(ep))
        builtin_names = {ep.name for ep in points if _is_builtin(ep)}
        for ep in points:
            dist = ep.dist.name if ep.dist else None
            version = ep.dist.version if ep.dist else None
            builtin = _is_builtin(ep)
            if ep.name in disabled or (dist and dist in disabled) or (not builtin and not third_party):
                continue
            if not builtin and allowed is not None and ep.name not in allowed and dist not in allowed:
                continue
            if not builtin and ep.name in builtin_names:
                self._fail(
                    ep.name,
                    version,
                    dist,
                    PluginError(
                        f"its entry point '{ep.name}' has the name of fusion-engine's built-in plugin '{ep.name}', "
                        "which cannot be replaced; rename the entry point"
                    ),
                )
                continue
            if self.manager.has_plugin(ep.name):
                self._fail(
                    ep.name,
                    version,
                    dist,
                    PluginError(
                        f"its entry point '{ep.name}' has the name of a plugin already loaded; rename the entry point"
                    ),
                )
                continue
            try:
                plugin = ep.load()
            except BaseException as exc:
                if isinstance(exc, _NOT_ISOLATED):
                    raise
                self._fail(ep.name, version, dist, exc)
                continue
            self.add(plugin, ep.name, PluginInfo(ep.name, version, "built-in" if builtin else "entry point", dist))

    def load_given(self, plugins, disabled: set[str]):
        for plugin in plugins:
            if isinstance(plugin, str):
                try:
                    plugin = importlib.import_module(plugin)
                except BaseException as exc:
                    if isinstance(exc, _NOT_ISOLATED):
                        raise
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
        """Call every registration hook, plugin by plugin in load order; return the components kept.

        ``make_component(kind, name, factory, description, info)`` builds one component (an object
        with ``kind`` and ``name``). A plugin whose hook raises (SystemExit included), registers
        something invalid, or registers a name already kept from an earlier plugin (or twice) is
        recorded as a failure and none of its components are kept; the earlier plugin keeps the
        name, so a built-in (loaded first) always keeps its own.
        """
        impls: dict[str, list] = {}
        for kind, hook_name in HOOKS.items():
            for impl in reversed(getattr(self.manager.hook, hook_name).get_hookimpls()):
                impls.setdefault(impl.plugin_name, []).append((kind, impl))
        components = []
        owners: dict[tuple[str, str], PluginInfo] = {}  # (kind, name) -> the plugin that keeps it
        for info in list(self.infos):
            offered = []
            try:
                for kind, impl in impls.get(info.name, []):

                    def register(name, factory, *, description="", _kind=kind):
                        offered.append(make_component(_kind, name, factory, description, info))  # noqa: B023 (called now)

                    impl.function(register=register)
                self._check_names(info, offered, owners)
            except BaseException as exc:
                if isinstance(exc, _NOT_ISOLATED):
                    raise
                self._fail(info.name, info.version, info.distribution, exc, raise_now=info.source == "given")
                self.manager.unregister(name=info.name)
                self.infos.remove(info)
                continue
            for component in offered:
                owners[(component.kind, component.name)] = info
            components.extend(offered)
        return components

    @staticmethod
    def _check_names(info: PluginInfo, offered: list, owners: dict) -> None:
        """PluginError when ``info``'s components take a name already kept, or one name twice."""
        seen = set()
        for component in offered:
            key = (component.kind, component.name)
            what = f"{component.kind} '{component.name}'"
            owner = owners.get(key)
            if owner is not None and owner.source == "built-in":
                raise PluginError(
                    f"{what} is a built-in of plugin '{owner.name}' and plugin '{info.name}' cannot replace it; "
                    "rename the component"
                )
            if owner is not None:
                raise PluginError(
                    f"{what} is registered by both plugin '{owner.name}' and plugin '{info.name}' (the first keeps "
                    "it); disable one with FUSION_ENGINE_DISABLE_PLUGINS or rename it"
                )
            if key in seen:
                raise PluginError(f"{what} is registered twice by plugin '{info.name}'; register each name once")
            seen.add(key)

    def info(self, name: str) -> PluginInfo | None:
        return next((i for i in self.infos if i.name == name), None)


_EXTRA_PLUGINS: list = []  # see add_extra_plugins; oldest first


def add_extra_plugins(*plugins) -> None:
    """Load ``plugins`` in every :func:`load_plugins` from now on, until :func:`remove_extra_plugins`.

    Plugins are modules, importable module names or objects with hook implementations, loaded
    as given plugins (source "given": a failure is an error) after the entry points, so a
    plugin that is also installed is not loaded twice; they load with ``entry_points=False`` too.
    Adding a plugin twice needs two removals.
    """
    _EXTRA_PLUGINS.extend(plugins)


def remove_extra_plugins(*plugins) -> None:
    """Undo :func:`add_extra_plugins` for ``plugins`` (one addition each, matched by identity;
    a plugin that is not there is ignored)."""
    for plugin in plugins:
        for i in range(len(_EXTRA_PLUGINS) - 1, -1, -1):
            if _EXTRA_PLUGINS[i] is plugin:
                del _EXTRA_PLUGINS[i]
                break


def extra_plugins() -> list:
    """The plugins added with :func:`add_extra_plugins` and not removed, oldest first (a copy)."""
    return list(_EXTRA_PLUGINS)


def load_plugins(plugins=None, *, entry_points: bool = True) -> PluginLoader:
    """Built-ins, then installed entry points (filtered by the env vars, left out with
    ``entry_points=False``), then the extra plugins (:func:`add_extra_plugins`), then ``plugins``."""
    loader = PluginLoader()
    disabled = set(_env_list("FUSION_ENGINE_DISABLE_PLUGINS") or [])
    loader.load_entry_points(_env_list("FUSION_ENGINE_LOAD_PLUGINS"), disabled, third_party=entry_points)
    loader.load_given([*extra_plugins(), *(plugins or [])], disabled)
    return loader
