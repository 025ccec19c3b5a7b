"""Plugin package scaffolding (``fusion-engine new-plugin NAME``): see :mod:`fusion_engine.scaffold.generator`.

The code is in :mod:`~fusion_engine.scaffold.generator`; the files it writes are the templates
in ``templates/`` (package data).
"""

from fusion_engine.scaffold.generator import (
    KIND_VALUES,
    KINDS,
    NAME_RULE,
    ScaffoldError,
    names,
    new_plugin,
    template,
    validate_name,
)

__all__ = ["KINDS", "NAME_RULE", "KIND_VALUES", "ScaffoldError", "names", "validate_name", "new_plugin", "template"]
