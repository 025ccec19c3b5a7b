"""Engine: the plugins and their components, the builder of fused classifiers, and their loader."""

from __future__ import annotations

import contextlib
import contextvars
import json
import warnings

import torch

from fusion_engine.api.classifier import FusedClassifier
from fusion_engine.artifacts.store import load as load_artifact
from fusion_engine.core.config import FusedModelConfig, parse_config
from fusion_engine.core.network import Branch, measure_feature_dims
from fusion_engine.core.plugins import PluginFailure, PluginInfo, load_plugins
from fusion_engine.core.registry import KINDS, Component, Registry, option_schema
from fusion_engine.errors import ConfigError, FusionEngineError, PluginError, RandomInitWarning

# Set while a saved model is rebuilt: its tensors come from the artifact, so no backbone fetches weights.
_REBUILDING = contextvars.ContextVar("fusion_engine_rebuilding", default=False)


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
        """A FusedClassifier from a config (dict, file path or FusedModelConfig).

        Backbones are pretrained by default when weights can be had; every branch that had to fall back to
        random weights is named in one :class:`~fusion_engine.errors.RandomInitWarning` (``"pretrained":
        false`` asks for random weights on purpose, without a warning)."""
        given = parse_config(config)
        if class_names is not None and num_classes is None:
            if given.num_classes is not None and given.num_classes != len(class_names):
                raise ConfigError(
                    f"the config says num_classes: {given.num_classes}, but the data has {len(class_names)} "
                    f"classes; remove num_classes from the config (it is taken from the data) or set it to "
                    f"{len(class_names)}"
                )
            num_classes = len(class_names)
        config = self.validate(given, num_classes=num_classes)
        if config.num_classes is None:
            raise ConfigError("num_classes is missing: give it in the config or to build(..., num_classes=N)")
        if class_names is not None and len(class_names) != config.num_classes:
            raise ConfigError(f"{len(class_names)} class names for num_classes={config.num_classes}")
        rebuilding = _REBUILDING.get()
        branches, built, random = [], {}, []
        for i, (spec, name) in enumerate(zip(config.backbones, config.branch_names())):
            where = f"backbones[{i}]"
            options = dict(spec.options)
            if rebuilding and "pretrained" in options:
                options["pretrained"] = False  # the tensors come from the saved model
            shared_key = _shared_weights_key(spec)
            if shared_key in built:
                backbone = built[shared_key]  # same backbone, same weights: one module, run once per input
            else:
                backbone = self._create("backbone", spec.name, where, **options)
                fixed = spec.options.get("weights") or spec.options.get("pretrained") or _pretrained(backbone)
                if shared_key is not None and fixed:
                    built[shared_key] = backbone
            for attr in ("data_config", "forward"):
                if not hasattr(backbone, attr):
                    raise PluginError(
                        f"{where}: backbone '{spec.name}' (plugin "
                        f"{self.registry.get('backbone', spec.name).plugin}) has no '{attr}'"
                    )
            if not rebuilding and _randomly_initialised(backbone, options):
                random.append((name, getattr(backbone, "random_init_reason", None)))
            extractor = self._create(
                "extractor", spec.extractor.name, where + ".extractor", backbone, **spec.extractor.options
            )
            branches.append(Branch(name, backbone, extractor, frozen=spec.freeze))
        if random:
            warnings.warn(random_init_message(random, len(branches)), RandomInitWarning, stacklevel=2)
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
        with rebuilding():
            return load_artifact(folder, engine=self, public_key=public_key, encryption_key=encryption_key)


@contextlib.contextmanager
def rebuilding():
    """Within: ``Engine.build`` rebuilds saved models, whose tensors come from the artifact: backbones with a
    ``pretrained`` option get ``pretrained=False`` (nothing is fetched) and random weights are not warned about."""
    token = _REBUILDING.set(True)
    try:
        yield
    finally:
        _REBUILDING.reset(token)


def _shared_weights_key(spec) -> str | None:
    """Branches with this same key may share one backbone: frozen, and weights fixed by the options (a file,
    or pretrained weights asked for or left to the default; by default shared only once weights were had),
    so two builds would give identical modules."""
    options = spec.options
    if not spec.freeze or (not options.get("weights") and options.get("pretrained", False) is False):
        return None
    return json.dumps([spec.name, options], sort_keys=True, default=str)


def _pretrained(backbone) -> bool:
    return getattr(backbone, "pretrained_source", None) is not None


def _randomly_initialised(backbone, options: dict) -> bool:
    """A backbone that says it has no pretrained weights (``pretrained_source`` None), unless random weights
    were asked for (``"pretrained": false``)."""
    return (
        hasattr(backbone, "pretrained_source") and not _pretrained(backbone) and options.get("pretrained") is not False
    )


def random_init_message(branches: list[tuple[str, str | None]], total: int) -> str:
    """One line naming every randomly initialised branch (``(name, reason)``), why, and what to do."""
    reasons = {reason for _, reason in branches if reason}
    why = f" ({reasons.pop()})" if len(reasons) == 1 else ""
    named = ", ".join(name + (f" ({reason})" if reason and not why else "") for name, reason in branches)
    return (
        f"{len(branches)} of {total} branch{'es' if total > 1 else ''} RANDOMLY INITIALISED, no pretrained weights "
        f"could be had{why}: "
        f"{named}. Expect far lower accuracy; go online, give --weights-dir / FUSION_ENGINE_WEIGHTS_DIR or a "
        'weights file, or set "pretrained": false for random weights on purpose'
    )


def load(
    folder, *, engine: Engine | None = None, public_key=None, encryption_key: bytes | None = None
) -> FusedClassifier:
    """``fusion_engine.load(RUN_DIR)``: a saved model, built with ``engine`` (default: every installed plugin)."""
    return (engine or Engine.from_plugins()).load(folder, public_key=public_key, encryption_key=encryption_key)


__all__ = ["Engine", "KINDS", "load"]
