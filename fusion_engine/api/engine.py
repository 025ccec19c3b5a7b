"""Engine: the plugins and their components, the builder of fused classifiers, and their loader."""

from __future__ import annotations

import json

import torch

from fusion_engine.api.classifier import FusedClassifier
from fusion_engine.artifacts.store import load as load_artifact
from fusion_engine.core.config import FusedModelConfig, parse_config
from fusion_engine.core.network import Branch, measure_feature_dims
from fusion_engine.core.plugins import PluginFailure, PluginInfo, load_plugins
from fusion_engine.core.registry import KINDS, Component, Registry, option_schema
from fusion_engine.errors import ConfigError, FusionEngineError, PluginError


class Engine:
    """Holds the loaded plugins and the registry of what they offer."""

    def __init__(self, loader):
        """The components ``loader``'s plugins offer; a plugin that fails to register (a clash
        included) is one of ``failures``, not an error, unless it was given in code or strict mode is on."""
        self._loader = loader
        self.registry = Registry()
        for component in loader.collect(self._make_component):
            self.registry.add(component)

    @staticmethod
    def _make_component(kind, name, factory, description, info) -> Component:
        if not isinstance(name, str) or not name or ":" in name:
            raise PluginError(f"component names are non-empty strings without ':', got {name!r}")
        if not callable(factory):
            raise PluginError(f"{kind} '{name}': factory must be callable, got {type(factory).__name__}")
        summary = next(iter(str(description or "").strip().splitlines()), "")
        return Component(
            kind,
            name,
            factory,
            info.name,
            info.version,
            summary,
            option_schema(kind, name, factory),
            distribution=info.distribution,
        )

    @classmethod
    def from_plugins(cls, plugins=None, *, entry_points: bool = True) -> Engine:
        """Built-ins + installed entry-point plugins (unless ``entry_points=False``) + ``plugins``.

        ``plugins`` are modules, importable module names, or objects with hook implementations.
        """
        return cls(load_plugins(plugins, entry_points=entry_points))

    @property
    def plugins(self) -> list[PluginInfo]:
        return list(self._loader.infos)

    @property
    def failures(self) -> list[PluginFailure]:
        return list(self._loader.failures)

    def components(self, kind: str | None = None) -> list[Component]:
        """Registered components (of one kind, or all), each with its plugin and version."""
        return self.registry.components(kind)

    def validate(self, config, *, num_classes: int | None = None) -> FusedModelConfig:
        """Parse ``config`` and check every component name and option before anything is built."""
        config = parse_config(config)
        if num_classes is not None:
            if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
                raise ConfigError(f"num_classes must be an integer >= 2, got {num_classes!r}")
            config = config.model_copy(update={"num_classes": num_classes})
        backbones = []
        for i, spec in enumerate(config.backbones):
            where = f"backbones[{i}]"
            options = self._component("backbone", spec.name, where).validate_options(spec.options, where)
            extractor_options = self._component(
                "extractor", spec.extractor.name, where + ".extractor"
            ).validate_options(spec.extractor.options, where + ".extractor")
            extractor = spec.extractor.model_copy(update={"options": extractor_options})
            backbones.append(spec.model_copy(update={"options": options, "extractor": extractor}))
        fusion_options = self._component("fusion", config.fusion.name, "fusion").validate_options(
            config.fusion.options, "fusion"
        )
        return config.model_copy(
            update={"backbones": backbones, "fusion": config.fusion.model_copy(update={"options": fusion_options})}
        )

    def _component(self, kind: str, name: str, where: str) -> Component:
        try:
            return self.registry.get(kind, name)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None

    def _create(self, kind: str, name: str, where: str, *args, **options):
        component = self.registry.get(kind, name)
        try:
            return component.factory(*args, **options)
        except FusionEngineError:
            raise
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{where}: {kind} '{name}': {exc}") from exc

    def build(self, config, *, num_classes: int | None = None, class_names=None) -> FusedClassifier:
        """A FusedClassifier from a config (dict, file path or FusedModelConfig)."""
        if class_names is not None and num_classes is None:
            num_classes = len(class_names)
        config = self.validate(config, num_classes=num_classes)
        if config.num_classes is None:
            raise ConfigError("num_classes is missing: give it in the config or to build(..., num_classes=N)")
        if class_names is not None and len(class_names) != config.num_classes:
            raise ConfigError(f"{len(class_names)} class names for num_classes={config.num_classes}")
        branches, built = [], {}
        for i, (spec, name) in enumerate(zip(config.backbones, config.branch_names())):
            where = f"backbones[{i}]"
            shared_key = _shared_weights_key(spec)
            if shared_key in built:
                backbone = built[shared_key]  # same backbone, same weights: one module, run once per input
            else:
                backbone = self._create("backbone", spec.name, where, **spec.options)
                if shared_key is not None:
                    built[shared_key] = backbone
            for attr in ("data_config", "forward"):
                if not hasattr(backbone, attr):
                    raise PluginError(
                        f"{where}: backbone '{spec.name}' (plugin "
                        f"{self.registry.get('backbone', spec.name).plugin}) has no '{attr}'"
                    )
            extractor = self._create(
                "extractor", spec.extractor.name, where + ".extractor", backbone, **spec.extractor.options
            )
            branches.append(Branch(name, backbone, extractor, frozen=spec.freeze))
        model = FusedClassifier(branches, torch.nn.Identity(), config, class_names)
        in_dims = measure_feature_dims(model)
        model.fusion = self._create(
            "fusion", config.fusion.name, "fusion", in_dims, config.num_classes, **config.fusion.options
        )
        model.components = [
            {"kind": c.kind, "name": c.name, "plugin": c.plugin, "version": c.version, "distribution": c.distribution}
            for c in self._used_components(config)
        ]
        return model

    def _used_components(self, config: FusedModelConfig) -> list[Component]:
        used = {("fusion", config.fusion.name)}
        for spec in config.backbones:
            used |= {("backbone", spec.name), ("extractor", spec.extractor.name)}
        return [self.registry.get(kind, name) for kind, name in sorted(used)]

    def load(self, folder, *, public_key=None, encryption_key: bytes | None = None) -> FusedClassifier:
        """A saved model (RUN_DIR) rebuilt with this engine's plugins, after checking its digests
        (and its signature, with ``public_key``); see ``artifacts.store.load``."""
        return load_artifact(folder, engine=self, public_key=public_key, encryption_key=encryption_key)


def _shared_weights_key(spec) -> str | None:
    """Branches with this same key may share one backbone: frozen, and weights fixed by the options
    (a file or pretrained weights), so two builds would give identical modules."""
    if not spec.freeze or not (spec.options.get("weights") or spec.options.get("pretrained")):
        return None
    return json.dumps([spec.name, spec.options], sort_keys=True, default=str)


def load(
    folder, *, engine: Engine | None = None, public_key=None, encryption_key: bytes | None = None
) -> FusedClassifier:
    """``fusion_engine.load(RUN_DIR)``: a saved model, built with ``engine`` (default: every installed plugin)."""
    return (engine or Engine.from_plugins()).load(folder, public_key=public_key, encryption_key=encryption_key)


__all__ = ["Engine", "KINDS", "load"]
