"""Named components per kind (backbone, extractor, fusion) with provenance and option schemas."""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pydantic

from fusion_engine.errors import ConfigError, PluginError, suggest, validation_message

KINDS = ("backbone", "extractor", "fusion")

# Leading factory parameters the engine passes itself; they are not user options.
ENGINE_ARGUMENTS = {"backbone": (), "extractor": ("backbone",), "fusion": ("in_dims", "num_classes")}


def option_schema(kind: str, name: str, factory: Callable) -> type[pydantic.BaseModel]:
    """A pydantic model of the factory's keyword options, derived from its signature."""
    fields: dict[str, Any] = {}
    allow_extra = False
    skip = ENGINE_ARGUMENTS[kind]
    try:
        hints = typing.get_type_hints(factory.__init__ if inspect.isclass(factory) else factory)
    except Exception:  # unresolvable annotations: accept any value
        hints = {}
    for param in inspect.signature(factory).parameters.values():
        if param.name in skip:
            continue
        if param.kind is param.VAR_KEYWORD:
            allow_extra = True
            continue
        if param.kind is param.VAR_POSITIONAL:
            continue
        annotation = hints.get(param.name, Any)
        default = ... if param.default is param.empty else param.default
        fields[param.name] = (annotation, default)
    config = pydantic.ConfigDict(
        extra="allow" if allow_extra else "forbid", arbitrary_types_allowed=True, protected_namespaces=()
    )
    return pydantic.create_model(f"{kind}_{name}_options".replace("-", "_"), __config__=config, **fields)


@dataclass(frozen=True)
class Component:
    """One registered backbone, extractor or fusion and who offered it."""

    kind: str
    name: str
    factory: Callable
    plugin: str
    version: str | None
    description: str = ""
    options: type[pydantic.BaseModel] = field(default=None, repr=False)
    distribution: str | None = None  # the installed distribution of the plugin (None: a plugin given in code)

    def validate_options(self, options: dict, where: str) -> dict:
        """Check ``options`` against the schema; return them with defaults filled in."""
        try:
            return self.options(**options).model_dump()
        except pydantic.ValidationError as exc:
            message = validation_message(exc, valid=list(self.options.model_fields))
            raise ConfigError(f"{where}: {self.kind} '{self.name}': {message}") from None

    def describe_options(self) -> dict[str, str]:
        """Option name -> 'type = default' for listings."""
        out = {}
        for name, f in self.options.model_fields.items():
            plain = typing.get_origin(f.annotation) is None and hasattr(f.annotation, "__name__")
            annotation = f.annotation.__name__ if plain else str(f.annotation).replace("typing.", "")
            out[name] = annotation if f.is_required() else f"{annotation} = {f.default!r}"
        return out


class Registry:
    """Components by kind and name; registering a taken name is an error naming both plugins.

    The engine fills it with what ``PluginLoader.collect`` kept, which has already turned a clash
    into the later plugin's failure, so ``add`` raising here means a bug, not a bad plugin."""

    def __init__(self):
        self._components: dict[str, dict[str, Component]] = {kind: {} for kind in KINDS}

    def add(self, component: Component) -> None:
        taken = self._components[component.kind].get(component.name)
        if taken is not None:
            raise PluginError(
                f"{component.kind} '{component.name}' is registered by both plugin '{taken.plugin}' and "
                f"plugin '{component.plugin}'; disable one with FUSION_ENGINE_DISABLE_PLUGINS or rename it"
            )
        self._components[component.kind][component.name] = component

    def get(self, kind: str, name: str) -> Component:
        if kind not in self._components:
            raise ConfigError(f"unknown component kind '{kind}'; valid kinds: {', '.join(KINDS)}")
        try:
            return self._components[kind][name]
        except KeyError:
            valid = sorted(self._components[kind])
            raise ConfigError(
                f"unknown {kind} '{name}'{suggest(name, valid)}. "
                f"Valid {kind}s: {', '.join(valid) or '(none registered)'}"
            ) from None

    def names(self, kind: str) -> list[str]:
        return sorted(self._components[kind])

    def components(self, kind: str | None = None) -> list[Component]:
        kinds = KINDS if kind is None else (kind,)
        if kind is not None and kind not in KINDS:
            raise ConfigError(f"unknown component kind '{kind}'; valid kinds: {', '.join(KINDS)}")
        return [self._components[k][n] for k in kinds for n in sorted(self._components[k])]
