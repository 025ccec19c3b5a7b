"""Registering plugins for one test: :class:`PluginRegistration`, :func:`registered_plugins`,
the :func:`register_plugin` fixture and :func:`plugin_fixture`.

They make plugins visible to every ``Engine.from_plugins()`` -- and so to the CLI run
in-process -- and undo it afterwards, through the extra plugins of
:mod:`fusion_engine.core.plugins` (:func:`~fusion_engine.core.plugins.add_extra_plugins` /
:func:`~fusion_engine.core.plugins.remove_extra_plugins`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from fusion_engine.api.engine import Engine
from fusion_engine.core.plugins import add_extra_plugins, remove_extra_plugins

try:
    import pytest
except ImportError:  # the checks and registered_plugins work without pytest; only the fixtures need it
    pytest = None

__all__ = ["PluginRegistration", "registered_plugins", "plugin_fixture"] + (["register_plugin"] if pytest else [])


class PluginRegistration:
    """Plugins added to every ``Engine.from_plugins()`` until :meth:`close`.

    Call it with plugins (modules, importable module names, or objects with hook
    implementations); the call returns an ``undo()`` that removes just those. The plugins load
    as plugins given to ``Engine.from_plugins`` (source "given"), after the entry points, so a
    plugin that is also installed is not loaded twice.
    """

    def __init__(self):
        self.plugins: list = []
        self.closed = False

    def __call__(self, *plugins) -> Callable[[], None]:
        if self.closed:
            raise RuntimeError("this plugin registration is closed; open a new one")
        add_extra_plugins(*plugins)
        self.plugins.extend(plugins)

        def undo():
            for plugin in plugins:
                for i, registered in enumerate(self.plugins):
                    if registered is plugin:
                        del self.plugins[i]
                        remove_extra_plugins(plugin)
                        break

        return undo

    def close(self) -> None:
        """Remove every plugin still registered by this registration; it takes no more."""
        remove_extra_plugins(*self.plugins)
        self.plugins.clear()
        self.closed = True

    def __enter__(self) -> PluginRegistration:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@contextlib.contextmanager
def registered_plugins(*plugins):
    """``with registered_plugins(my_plugin): ...``: the plugins are loaded by every engine inside."""
    registration = PluginRegistration()
    try:
        registration(*plugins)
        yield registration
    finally:
        registration.close()


if pytest is not None:

    @pytest.fixture(name="register_plugin")  # named: importable under another name (ruff F811 otherwise)
    def register_plugin():
        """``undo = register_plugin(plugin, ...)``: add plugins to every Engine built during the test.

        Whatever is still registered is removed at teardown (as datasette's ``pm.register`` /
        ``pm.unregister`` in a ``try/finally``).
        """
        registration = PluginRegistration()
        try:
            yield registration
        finally:
            registration.close()


def plugin_fixture(*plugins, scope: str = "function", name: str | None = None):
    """A pytest fixture that registers ``plugins`` while it is active and yields an Engine with them.

    ``my_engine = plugin_fixture(my_plugin)`` in a test module (or conftest.py) gives tests a
    ``my_engine`` argument; ``scope="module"`` keeps one registration for the whole module.
    """
    if pytest is None:
        raise RuntimeError("plugin_fixture needs pytest; use registered_plugins() without it")

    def fixture():
        with registered_plugins(*plugins):
            yield Engine.from_plugins()

    given = ", ".join(getattr(p, "__name__", type(p).__name__) for p in plugins)
    fixture.__doc__ = f"An Engine with {given} registered."
    return pytest.fixture(fixture, scope=scope, name=name)
