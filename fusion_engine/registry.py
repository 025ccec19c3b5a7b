"""Named components per kind (backbone, extractor, fusion) with provenance and option schemas."""

from __future__ import annotations

import difflib
import inspect
import typing
from dataclasses import dataclass, field
from typing import Any, Callable

import pydantic

from .errors import ConfigError, PluginError

KINDS = ("backbone", "extractor", "fusion")

# Leading factory parameters the engine passes itself; they are not user options.
ENGINE_ARGUMENTS = {"backbone": (), "extractor": ("backbone",), "fusion": ("in_dims", "num_classes")}


def suggest(name: str, valid) -> str:
    """' (did you mean X?)' when a close match exists, else ''."""
    match = difflib.get_close_matches(str(name), list(valid), n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""


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
    config = pydantic.ConfigDict(extra="allow" if allow_extra else "forbid", arbitrary_types_allowed=True,
                                 protected_namespaces=())
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

    def validate_options(self, options: dict, where: str) -> dict:
        """Check ``options`` against the schema; return them with defaults filled in."""
        try:
            return self.options(**options).model_dump()
        except pydantic.ValidationError as exc:
            valid = list(self.options.model_fields)
            problems = []
            for err in exc.errors():
                loc = ".".join(str(p) for p in err["loc"])
                if err["type"] == "extra_forbidden":
                    problems.append(f"unknown option '{loc}'{suggest(loc, valid)}")
                elif err["type"] == "missing":
                    problems.append(f"option '{loc}' is required")
                else:
                    problems.append(f"option '{loc}': {err['msg']} (got {err.get('input')!r})")
            raise ConfigError(f"{where}: {self.kind} '{self.name}': " + "; ".join(problems)
                              + f". Valid options: {', '.join(valid) or '(none)'}") from None

    def describe_options(self) -> dict[str, str]:
        """Option name -> 'type = default' for listings."""
        out = {}
        for name, f in self.options.model_fields.items():
            plain = typing.get_origin(f.annotation) is None and hasattr(f.annotation, "__name__")
            annotation = f.annotation.__name__ if plain else str(f.annotation).replace("typing.", "")
            out[name] = annotation if f.is_required() else f"{annotation} = {f.default!r}"
        return out


class Registry:
    """Components by kind and name; registering a taken name is an error naming both plugins."""

    def __init__(self):
        self._components: dict[str, dict[str, Component]] = {kind: {} for kind in KINDS}

    def add(self, component: Component) -> None:
        taken = self._components[component.kind].get(component.name)
        if taken is not None:
            raise PluginError(
                f"{component.kind} '{component.name}' is registered by both plugin '{taken.plugin}' and "
                f"plugin '{component.plugin}'; disable one with FUSION_ENGINE_DISABLE_PLUGINS or rename it")
        self._components[component.kind][component.name] = component

    def get(self, kind: str, name: str) -> Component:
        if kind not in self._components:
            raise ConfigError(f"unknown component kind '{kind}'; valid kinds: {', '.join(KINDS)}")
        try:
            return self._components[kind][name]
        except KeyError:
            valid = sorted(self._components[kind])
            raise ConfigError(f"unknown {kind} '{name}'{suggest(name, valid)}. "
                              f"Valid {kind}s: {', '.join(valid) or '(none registered)'}") from None

    def names(self, kind: str) -> list[str]:
        return sorted(self._components[kind])

    def components(self, kind: str | None = None) -> list[Component]:
        kinds = KINDS if kind is None else (kind,)
        if kind is not None and kind not in KINDS:
            raise ConfigError(f"unknown component kind '{kind}'; valid kinds: {', '.join(KINDS)}")
        return [self._components[k][n] for k in kinds for n in sorted(self._components[k])]
