"""Pydantic models of a fused model as users write it (JSON, YAML or Python dicts).

Accepted forms of a backbone: ``"timm:resnet50"`` (the part after ``:`` sets the option
``model``), ``"hog"`` (a name alone), or a dict ``{"name": "timm", "model": ..., "extractor":
"gem", ...}`` whose other keys are the backbone's options. Extractors and fusions are a name
or ``{"name": ..., option: value}``. The canonical (saved) form keeps options under ``options``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pydantic
from pydantic import BaseModel, ConfigDict, Field, model_validator

from fusion_engine.errors import ConfigError, validation_message

# Keys of a backbone dict that belong to the engine rather than to the backbone factory.
BACKBONE_KEYS = ("name", "extractor", "label", "freeze", "options")


def _component_dict(value: Any, what: str) -> Any:
    """``"name"`` or ``{"name": ..., **options}`` -> ``{"name": ..., "options": {...}}``."""
    if isinstance(value, str):
        return {"name": value, "options": {}}
    if isinstance(value, dict) and "name" in value and "options" not in value:
        return {"name": value["name"], "options": {k: v for k, v in value.items() if k != "name"}}
    if isinstance(value, dict) and "name" not in value:
        raise ValueError(f"a {what} needs a 'name' (got keys {sorted(value)})")
    return value


class ComponentSpec(BaseModel):
    """A component by registered name, with its options."""

    model_config = ConfigDict(extra="forbid")
    name: str
    options: dict[str, Any] = Field(default_factory=dict)


class ExtractorSpec(ComponentSpec):
    @model_validator(mode="before")
    @classmethod
    def _short(cls, value):
        return _component_dict(value, "extractor")


class FusionSpec(ComponentSpec):
    @model_validator(mode="before")
    @classmethod
    def _short(cls, value):
        return _component_dict(value, "fusion")


class BackboneSpec(ComponentSpec):
    """One branch: a backbone, its extractor, and whether its weights stay frozen."""

    extractor: ExtractorSpec = Field(default_factory=lambda: ExtractorSpec(name="avg"))
    label: str | None = None
    freeze: bool = True

    @model_validator(mode="before")
    @classmethod
    def _short(cls, value):
        if isinstance(value, str):
            name, _, model = value.partition(":")
            return {"name": name, "options": {"model": model} if model else {}}
        if isinstance(value, dict) and "name" in value and "options" not in value:
            engine = {k: v for k, v in value.items() if k in BACKBONE_KEYS}
            engine["options"] = {k: v for k, v in value.items() if k not in BACKBONE_KEYS}
            return engine
        if isinstance(value, dict) and "name" not in value:
            raise ValueError(f"a backbone needs a 'name' (got keys {sorted(value)})")
        return value

    def display_name(self) -> str:
        if self.label:
            return self.label
        variant = self.options.get("model") or self.options.get("weights")
        return f"{self.name}:{Path(str(variant)).name}" if variant else self.name


class FusedModelConfig(BaseModel):
    """A fused classifier: branches, one fusion, the number of classes (and test-time flip averaging)."""

    model_config = ConfigDict(extra="forbid")
    backbones: list[BackboneSpec] = Field(min_length=1)
    fusion: FusionSpec = Field(default_factory=lambda: FusionSpec(name="concat"))
    num_classes: int | None = Field(default=None, ge=2)
    flip_average: bool = False  # predict from the mean of each image's and its mirror image's features

    def branch_names(self) -> list[str]:
        """Unique display names, ``#2``, ``#3`` appended to repeats."""
        names, seen = [], {}
        taken = {spec.display_name() for spec in self.backbones}
        for spec in self.backbones:
            base = spec.display_name()
            seen[base] = seen.get(base, 0) + 1
            name = base
            if seen[base] > 1:
                while f"{base}#{seen[base]}" in taken:  # an explicit label may already be "x#2"
                    seen[base] += 1
                name = f"{base}#{seen[base]}"
            taken.add(name)
            names.append(name)
        return names


def parse_config(config) -> FusedModelConfig:
    """A dict, JSON/YAML file path, or FusedModelConfig -> FusedModelConfig (ConfigError if malformed)."""
    if isinstance(config, FusedModelConfig):
        return config
    if isinstance(config, (str, Path)):
        config = load_config_file(config)
    if not isinstance(config, dict):
        raise ConfigError(f"a fused-model config is a dict or a .json/.yaml file, not {type(config).__name__}")
    return validated(FusedModelConfig, config, "invalid config", noun="key")


def validated(model: type[BaseModel], values: dict, what: str, noun: str = "option"):
    """``model`` validated from ``values``; else a ConfigError starting with ``what`` that names each
    problem (a misspelt name with its close match, a bad value with the value given)."""
    try:
        return model.model_validate(values)
    except pydantic.ValidationError as exc:
        raise ConfigError(f"{what}: {validation_message(exc, valid=list(model.model_fields), noun=noun)}") from None


def load_config_file(path) -> dict:
    """Read a JSON or YAML config file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            return yaml.safe_load(text)
        return json.loads(text)
    except Exception as exc:
        raise ConfigError(
            f"config file {path} is not valid {'YAML' if path.suffix in ('.yaml', '.yml') else 'JSON'}: {exc}"
        ) from None
