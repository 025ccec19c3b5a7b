"""``new_plugin``: write a ready-to-install plugin package (``fusion-engine new-plugin NAME``).

The package holds a minimal working component of the chosen kind, the hook that registers
it, the ``fusion_engine`` entry point, a README and a test that runs the conformance checks
of :mod:`fusion_engine.testing`; it installs (``pip install -e .``) and passes its own test
unchanged, so a plugin author starts from green and edits from there.
"""

from __future__ import annotations

import keyword
import os
import re
import shutil
import tempfile
from pathlib import Path
from string import Template

from .errors import ConfigError, FusionEngineError

KINDS = ("backbone", "extractor", "fusion")
NAME_RULE = ("1 to 40 characters: lowercase letters and digits, words joined by single '-' or '_', starting with "
             "a letter (e.g. 'maxout', 'my-fusion'); leave out the 'fusion-engine-' prefix, which is added")
_NAME = re.compile(r"[a-z][a-z0-9]*(?:[-_][a-z0-9]+)*")


class ScaffoldError(FusionEngineError, FileExistsError):
    """The target folder exists already; new_plugin never overwrites."""


def names(name: str) -> dict[str, str]:
    """The names derived from a plugin NAME: folder/distribution, module, component, class."""
    component = name.replace("-", "_")
    return {"name": name, "distribution": f"fusion-engine-{name}", "module": f"fusion_engine_{component}",
            "component": component, "factory": component if not keyword.iskeyword(component) else component + "_",
            "Class": "".join(part.capitalize() for part in component.split("_"))}


def validate_name(name, kind: str | None = None, *, check_installed: bool = True) -> str:
    """Check NAME against :data:`NAME_RULE` (and, with ``kind``, against what is installed); return it."""
    if not isinstance(name, str) or len(name) > 40 or not _NAME.fullmatch(name):
        raise ConfigError(f"invalid plugin name {name!r}: use {NAME_RULE}")
    if name.startswith(("fusion-engine", "fusion_engine")):
        raise ConfigError(f"invalid plugin name {name!r}: leave out the 'fusion-engine-' prefix (it is added: "
                          f"'{name.replace('_', '-').removeprefix('fusion-engine').lstrip('-') or 'NAME'}' gives "
                          f"fusion-engine-...); the rule: {NAME_RULE}")
    if kind is not None and check_installed:
        from importlib.metadata import entry_points

        from .engine import Engine
        from .plugins import BUILTIN_PLUGINS, ENTRY_POINT_GROUP

        component = names(name)["component"]
        engine = Engine.from_plugins()
        if component in engine.registry.names(kind):
            owner = engine.registry.get(kind, component).plugin
            raise ConfigError(f"a {kind} named '{component}' exists already (plugin '{owner}'); choose another name")
        taken = {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)} | set(BUILTIN_PLUGINS)
        if component in taken:
            raise ConfigError(f"an installed plugin is already called '{component}' (entry point of the "
                              f"'{ENTRY_POINT_GROUP}' group); choose another name")
    return name


def new_plugin(name: str, kind: str = "fusion", directory=".", *, check_installed: bool = True) -> Path:
    """Write the package ``directory/fusion-engine-NAME/`` for a component of ``kind``; return its path.

    ``kind`` is ``"backbone"``, ``"extractor"`` or ``"fusion"``. Refuses an invalid NAME
    (``ConfigError`` stating the rule), a name an installed component or plugin already uses
    (unless ``check_installed=False``), and an existing folder (``ScaffoldError``).
    """
    if kind not in KINDS:
        raise ConfigError(f"unknown component kind {kind!r}; valid kinds: {', '.join(KINDS)}")
    validate_name(name, kind, check_installed=check_installed)
    n = names(name)
    directory = Path(directory)
    target = directory / n["distribution"]
    if target.exists() or target.is_symlink():
        raise ScaffoldError(f"{target} exists already; new-plugin never overwrites: remove it or choose another "
                            "name or directory")
    directory.mkdir(parents=True, exist_ok=True)
    from . import __version__

    values = {**n, "kind": kind, "kinds": kind + "s", "fe_version": __version__}
    values.update({key: Template(text).substitute(values) for key, text in _KIND_VALUES[kind].items()})
    files = {
        "pyproject.toml": _PYPROJECT,
        "README.md": _README,
        f"{n['module']}/__init__.py": _INIT,
        f"{n['module']}/{kind}.py": _COMPONENT[kind],
        f"{n['module']}/plugin.py": _PLUGIN,
        f"tests/test_{n['module']}.py": _TEST,
    }
    staging = Path(tempfile.mkdtemp(prefix=f".{n['distribution']}.", dir=directory))
    try:
        for relative, template in files.items():
            path = staging / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(Template(template).substitute(values))
        if target.exists():
            raise ScaffoldError(f"{target} appeared while it was being written; nothing was overwritten")
        os.rename(staging, target)  # complete or absent: never a half-written package
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def cmd_new_plugin(args) -> int:
    """``fusion-engine new-plugin NAME [--kind KIND] [--directory DIR]``."""
    path = new_plugin(args.name, args.kind or "fusion", args.directory or ".")
    n = names(args.name)
    print(f"wrote {path}/ ({n['distribution']}: a {args.kind or 'fusion'} named '{n['component']}')\n"
          f"next:\n"
          f"  pip install -e {path}\n"
          f"  fusion-engine list {args.kind or 'fusion'}\n"
          f"  pytest {path}\n"
          f"then edit {path / n['module'] / ((args.kind or 'fusion') + '.py')}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("new-plugin", help="write a ready-to-install plugin package skeleton")
    p.add_argument("name", metavar="NAME", help="plugin name; the package is fusion-engine-NAME")
    p.add_argument("--kind", choices=["backbone", "extractor", "fusion"], default="fusion",
                   help="component kind (default: fusion)")
    p.add_argument("--directory", "-d", default=".", help="where to create fusion-engine-NAME/ (default: .)")
    p.set_defaults(func=cmd_new_plugin)


# --- templates (string.Template: $name placeholders) ----------------------------------------------

_KIND_VALUES = {
    "fusion": {
        "description": "Average of per-branch linear heads' logits",
        "what": "fusion strategy",
        "check_call": "check_fusion($factory, in_dims=[16, 8, 4], num_classes=5)",
        "check_call2": "check_fusion($factory, in_dims=[3], num_classes=2, dropout=0.0)",
        "bad_call": "$factory([4], 2, dropout=1.5)",
        "bad_message": "dropout must be in",
        "config": ('{"backbones": [{"name": "timm", "model": "test_resnet", "input_size": 32},\n'
                   '                   {"name": "timm", "model": "test_efficientnet", "input_size": 32}],\n'
                   '     "fusion": {"name": "$component", "dropout": 0.1}}'),
        "config_json": '{"fusion": {"name": "$component", "dropout": 0.1}}',
    },
    "backbone": {
        "description": "A small two-stage CNN (replace with your network)",
        "what": "backbone",
        "check_call": "check_backbone($factory)",
        "check_call2": "check_backbone($factory, width=8, size=16)",
        "bad_call": "$factory(width=3)",
        "bad_message": "width must be an even integer",
        "config": '{"backbones": [{"name": "$component", "width": 16}], "fusion": "concat"}',
        "config_json": '{"backbones": [{"name": "$component", "width": 32}], "fusion": "concat"}',
    },
    "extractor": {
        "description": "Mean and standard deviation of each channel, concatenated",
        "what": "feature extractor",
        "check_call": "check_extractor($factory)",
        "check_call2": "check_extractor($factory, eps=1e-3)",
        "bad_call": "$factory(None, eps=0.0)",
        "bad_message": "eps must be > 0",
        "config": ('{"backbones": [{"name": "timm", "model": "test_resnet", "input_size": 32,\n'
                   '                    "extractor": "$component"}]}'),
        "config_json": '{"backbones": [{"name": "timm", "model": "resnet18", "extractor": "$component"}]}',
    },
}

_PYPROJECT = """\
[build-system]
requires = ["setuptools>=64"]
build-backend = "setuptools.build_meta"

[project]
name = "$distribution"
version = "0.1.0"
description = "fusion-engine plugin: $description"
readme = "README.md"
requires-python = ">=3.10"
dependencies = ["fusion-engine>=$fe_version", "torch>=2.1"]

[project.optional-dependencies]
test = ["pytest>=7"]

# The engine finds the plugin through this entry point: name = module with the @hookimpl functions.
[project.entry-points.fusion_engine]
$component = "$module.plugin"

[tool.setuptools.packages.find]
include = ["$module*"]

[tool.pytest.ini_options]
testpaths = ["tests"]
addopts = "-ra"
"""

_README = """\
# $distribution

A fusion-engine plugin offering one $what:

| name | kind | description |
|---|---|---|
| `$component` | $kind | $description |

## Install

```bash
pip install -e .
fusion-engine list $kind        # shows $component  [$component 0.1.0]
```

## Use

```json
$config_json
```

## Develop

- `$module/$kind.py`: the component; its factory's annotated keyword parameters are the
  options that configs may set (validated before anything is built).
- `$module/plugin.py`: the `register_$kinds` hook that registers it.
- `tests/`: `pytest` runs fusion-engine's conformance checks (`fusion_engine.testing`) on it.

```bash
pip install -e ".[test]" && pytest
```
"""

_INIT = """\
\"\"\"fusion-engine plugin: $description.\"\"\"

from .$kind import $factory

__all__ = ["$factory"]
__version__ = "0.1.0"
"""

_PLUGIN = """\
\"\"\"Entry point (group ``fusion_engine``): registers the ``$component`` $kind.\"\"\"

from fusion_engine import hookimpl

from . import __version__  # noqa: F401  (the version `fusion-engine list` shows when the plugin is given directly)
from .$kind import $factory


@hookimpl
def register_$kinds(register):
    register("$component", $factory, description="$description")
"""

_COMPONENT = {
    "fusion": """\
\"\"\"The ``$component`` fusion: a linear head per branch, their logits averaged.

Replace it with your own strategy. The factory takes ``in_dims`` (each branch's feature width)
and ``num_classes`` first -- the engine passes them -- then the options, as annotated keyword
parameters with defaults. ``forward`` takes one ``(B, D_i)`` tensor per branch and returns
logits ``(B, num_classes)``.
\"\"\"

import torch
from torch import nn


class $Class(nn.Module):
    \"\"\"LayerNorm, dropout and a linear layer per branch; the branches' logits are averaged.\"\"\"

    def __init__(self, in_dims: list[int], num_classes: int, dropout: float):
        super().__init__()
        self.heads = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(d), nn.Dropout(dropout), nn.Linear(d, num_classes)) for d in in_dims
        )

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack([head(f) for head, f in zip(self.heads, features)]).mean(dim=0)


def $factory(in_dims: list[int], num_classes: int, dropout: float = 0.1) -> $Class:
    \"\"\"Average of per-branch linear heads; ``dropout`` in [0, 1) before each head.\"\"\"
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    return $Class(in_dims, num_classes, dropout)
""",
    "backbone": """\
\"\"\"The ``$component`` backbone: a small two-stage CNN. Replace it with your network.

The contract: ``feature_dim`` (the width of the features), ``data_config`` (the input the
engine resizes and normalises images to) and ``forward(images) -> features``, here a map
``(B, width, size/4, size/4)``; ``forward_stages`` lets the ``multiscale`` extractor work.
The factory's annotated keyword parameters are the options.
\"\"\"

from pathlib import Path

import torch
from torch import nn

from fusion_engine import WeightsError


class $Class(nn.Module):
    def __init__(self, width: int, size: int):
        super().__init__()
        self.feature_dim = width
        self.data_config = {
            "input_size": (3, size, size),
            "mean": (0.485, 0.456, 0.406),
            "std": (0.229, 0.224, 0.225),
            "interpolation": "bilinear",
        }
        half = width // 2
        self.stem = nn.Sequential(nn.Conv2d(3, half, 3, 2, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU())
        self.stage = nn.Sequential(nn.Conv2d(half, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        first = self.stem(x)
        return [first, self.stage(first)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stage(self.stem(x))


def $factory(width: int = 32, size: int = 32, weights: str | None = None) -> $Class:
    \"\"\"``width``: feature channels (even, >= 2); ``size``: input side (>= 8); ``weights``: a .safetensors state dict.\"\"\"
    if width < 2 or width % 2:
        raise ValueError(f"width must be an even integer >= 2, got {width}")
    if size < 8:
        raise ValueError(f"size must be >= 8, got {size}")
    model = $Class(width, size)
    if weights is not None:
        from safetensors.torch import load_file

        if not Path(weights).is_file():
            raise WeightsError(f"weights file {weights} does not exist")
        model.load_state_dict(load_file(weights), strict=True)
    return model.eval()
""",
    "extractor": """\
\"\"\"The ``$component`` extractor: mean and standard deviation of each channel, concatenated.

Replace it with your own pooling. The factory takes the built ``backbone`` first -- the engine
passes it -- then the options. ``forward`` turns the backbone's output (a map ``(B, C, H, W)``,
tokens ``(B, N, C)`` or a vector ``(B, D)``) into one vector per image.
\"\"\"

import torch
from torch import nn


class $Class(nn.Module):
    def __init__(self, prefix_tokens: int, eps: float):
        super().__init__()
        self.prefix_tokens = prefix_tokens
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:  # already one vector per image
            return x
        if x.dim() == 3:  # transformer tokens: skip the class/register tokens
            x = x[:, self.prefix_tokens:]
        else:  # (B, C, H, W) -> (B, H*W, C)
            x = x.flatten(2).transpose(1, 2)
        std = (x.var(dim=1, unbiased=False) + self.eps).sqrt()
        return torch.cat([x.mean(dim=1), std], dim=1)


def $factory(backbone, eps: float = 1e-5) -> $Class:
    \"\"\"Mean and standard deviation pooling; ``eps`` (> 0) keeps the square root smooth.\"\"\"
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    return $Class(int(getattr(backbone, "num_prefix_tokens", 0) or 0), eps)
""",
}

_TEST = """\
\"\"\"Tests of the ``$component`` $kind, with fusion-engine's conformance checks.\"\"\"

import json
from importlib.metadata import PackageNotFoundError, distribution, entry_points

import pytest
import torch

from fusion_engine import Engine, cli
from fusion_engine.testing import check_$kind, register_plugin  # noqa: F401  (register_plugin is a fixture)

from $module import $factory, plugin

torch.set_num_threads(1)
CONFIG = $config


def test_conformance():
    $check_call
    $check_call2


def test_invalid_options_are_rejected():
    with pytest.raises(ValueError, match="$bad_message"):
        $bad_call


def test_in_a_fused_model():
    engine = Engine.from_plugins([plugin], entry_points=False)
    model = engine.build(CONFIG, num_classes=3).eval()
    with torch.no_grad():
        assert model(torch.rand(2, 3, 32, 32)).shape == (2, 3)


def test_listed_by_fusion_engine_list(register_plugin, capsys):
    register_plugin(plugin)
    assert cli.main(["list", "$kind", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert any(c["name"] == "$component" for c in listing["components"])


def test_entry_point_is_installed():
    try:
        distribution("$distribution")
    except PackageNotFoundError:
        pytest.skip("not installed: pip install -e .")
    eps = {ep.name: ep.value for ep in entry_points(group="fusion_engine")}
    assert eps.get("$component") == "$module.plugin"
"""
