"""``new_plugin``: write a ready-to-install plugin package (``fusion-engine new-plugin NAME``).

The package holds a minimal working component of the chosen kind, the hook that registers
it, the ``fusion_engine`` entry point, a README and a test that runs the conformance checks
of :mod:`fusion_engine.testing`; it installs (``pip install -e .``) and passes its own test
unchanged, so a plugin author starts from green and edits from there.

The files are written from the ``string.Template`` files (``$name`` placeholders) in
``fusion_engine/scaffold/templates/``, package data read with :mod:`importlib.resources`:
``pyproject.toml.tmpl``, ``README.md.tmpl``, ``__init__.py.tmpl``, ``plugin.py.tmpl``,
``test.py.tmpl`` and one component template per kind (``fusion.py.tmpl``, ...). What differs
between the kinds besides the component (description, the checks the test calls, a config)
is in :data:`KIND_VALUES`.
"""

from __future__ import annotations

import keyword
import os
import re
import shutil
import tempfile
from importlib.metadata import entry_points
from importlib.resources import files
from pathlib import Path
from string import Template

from fusion_engine.api.engine import Engine
from fusion_engine.core.plugins import ENTRY_POINT_GROUP
from fusion_engine.core.registry import KINDS
from fusion_engine.errors import ConfigError, FusionEngineError
from fusion_engine.version import __version__

__all__ = ["KINDS", "NAME_RULE", "KIND_VALUES", "ScaffoldError", "names", "validate_name", "new_plugin", "template"]

NAME_RULE = (
    "1 to 40 characters: lowercase letters and digits, words joined by single '-' or '_', starting with "
    "a letter (e.g. 'maxout', 'my-fusion'); leave out the 'fusion-engine-' prefix, which is added"
)
_NAME = re.compile(r"[a-z][a-z0-9]*(?:[-_][a-z0-9]+)*")
TEMPLATES = "templates"  # folder of this package holding the *.tmpl files

# Per kind: values substituted into the templates (themselves templates of the names, e.g. $factory).
KIND_VALUES = {
    "fusion": {
        "description": "Average of per-branch linear heads' logits",
        "what": "fusion strategy",
        "check_call": "check_fusion($factory, in_dims=[16, 8, 4], num_classes=5)",
        "check_call2": "check_fusion($factory, in_dims=[3], num_classes=2, dropout=0.0)",
        "bad_call": "$factory([4], 2, dropout=1.5)",
        "bad_message": "dropout must be in",
        "config": (
            '{"backbones": [{"name": "timm", "model": "test_resnet", "input_size": 32},\n'
            '                   {"name": "timm", "model": "test_efficientnet", "input_size": 32}],\n'
            '     "fusion": {"name": "$component", "dropout": 0.1}}'
        ),
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
        "config": (
            '{"backbones": [{"name": "timm", "model": "test_resnet", "input_size": 32,\n'
            '                    "extractor": "$component"}]}'
        ),
        "config_json": '{"backbones": [{"name": "timm", "model": "resnet18", "extractor": "$component"}]}',
    },
}
assert set(KIND_VALUES) == set(KINDS), "a scaffold for every component kind"


class ScaffoldError(FusionEngineError, FileExistsError):
    """The target folder exists already; new_plugin never overwrites."""


def template(name: str) -> Template:
    """The template ``templates/NAME.tmpl`` of this package (e.g. ``"pyproject.toml"``, ``"fusion.py"``)."""
    return Template((files(__package__) / TEMPLATES / f"{name}.tmpl").read_text(encoding="utf-8"))


def names(name: str) -> dict[str, str]:
    """The names derived from a plugin NAME: folder/distribution, module, component, class."""
    component = name.replace("-", "_")
    return {
        "name": name,
        "distribution": f"fusion-engine-{name}",
        "module": f"fusion_engine_{component}",
        "component": component,
        "factory": component if not keyword.iskeyword(component) else component + "_",
        "Class": "".join(part.capitalize() for part in component.split("_")),
    }


def validate_name(name, kind: str | None = None, *, check_installed: bool = True) -> str:
    """Check NAME against :data:`NAME_RULE` (and, with ``kind``, against what is installed); return it.

    Taken are the names of the components of ``kind`` that the installed plugins offer and the
    names of the installed plugins (entry points of the ``fusion_engine`` group, the built-ins
    included).
    """
    if not isinstance(name, str) or len(name) > 40 or not _NAME.fullmatch(name):
        raise ConfigError(f"invalid plugin name {name!r}: use {NAME_RULE}")
    if name.startswith(("fusion-engine", "fusion_engine")):
        raise ConfigError(
            f"invalid plugin name {name!r}: leave out the 'fusion-engine-' prefix (it is added: "
            f"'{name.replace('_', '-').removeprefix('fusion-engine').lstrip('-') or 'NAME'}' gives "
            f"fusion-engine-...); the rule: {NAME_RULE}"
        )
    if kind is not None and check_installed:
        component = names(name)["component"]
        engine = Engine.from_plugins()
        if component in engine.registry.names(kind):
            owner = engine.registry.get(kind, component).plugin
            raise ConfigError(f"a {kind} named '{component}' exists already (plugin '{owner}'); choose another name")
        if component in {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)}:
            raise ConfigError(
                f"an installed plugin is already called '{component}' (entry point of the "
                f"'{ENTRY_POINT_GROUP}' group); choose another name"
            )
    return name


def new_plugin(name: str, kind: str = "fusion", directory=".", *, check_installed: bool = True) -> Path:
    """Write the package ``directory/fusion-engine-NAME/`` for a component of ``kind``; return its path.

    ``kind`` is one of :data:`KINDS` (``"backbone"``, ``"extractor"``, ``"fusion"``). Refuses an
    invalid NAME (``ConfigError`` stating the rule), a name an installed component or plugin
    already uses (unless ``check_installed=False``), and an existing folder (``ScaffoldError``).
    """
    if kind not in KINDS:
        raise ConfigError(f"unknown component kind {kind!r}; valid kinds: {', '.join(KINDS)}")
    validate_name(name, kind, check_installed=check_installed)
    n = names(name)
    directory = Path(directory)
    target = directory / n["distribution"]
    if target.exists() or target.is_symlink():
        raise ScaffoldError(
            f"{target} exists already; new-plugin never overwrites: remove it or choose another name or directory"
        )
    values = {**n, "kind": kind, "kinds": kind + "s", "fe_version": __version__}
    values.update({key: Template(text).substitute(values) for key, text in KIND_VALUES[kind].items()})
    layout = {  # file written -> its template
        "pyproject.toml": "pyproject.toml",
        "README.md": "README.md",
        f"{n['module']}/__init__.py": "__init__.py",
        f"{n['module']}/{kind}.py": f"{kind}.py",
        f"{n['module']}/plugin.py": "plugin.py",
        f"tests/test_{n['module']}.py": "test.py",
    }
    texts = {relative: template(source).substitute(values) for relative, source in layout.items()}
    directory.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{n['distribution']}.", dir=directory))
    try:
        for relative, text in texts.items():
            path = staging / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        if target.exists():
            raise ScaffoldError(f"{target} appeared while it was being written; nothing was overwritten")
        os.rename(staging, target)  # complete or absent: never a half-written package
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target
