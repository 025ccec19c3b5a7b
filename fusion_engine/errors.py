"""The project's own error types: every failure a user can cause raises one of these.

Also the helpers every message uses: ``suggest`` (a close match for a mistyped name),
``validation_message`` (a pydantic ValidationError as one readable line) and ``printable`` (names
from folders, manifests or files escaped before they reach a terminal).
"""

from __future__ import annotations

import difflib

import pydantic


class FusionEngineError(Exception):
    """Base class of every error fusion-engine raises on purpose."""


class ConfigError(FusionEngineError, ValueError):
    """A fused-model config names an unknown component or option, or a bad value."""


class PluginError(FusionEngineError):
    """A plugin failed to import or register, or two plugins clash."""


class DataError(FusionEngineError, ValueError):
    """Input data is missing, unreadable or inconsistent."""


class ArtifactError(FusionEngineError):
    """A saved model is missing, altered, unsigned or cannot be loaded safely."""


class WeightsError(FusionEngineError):
    """Pretrained weights cannot be found, downloaded or read safely."""


class ExportError(FusionEngineError):
    """A model cannot be exported, or the exported model does not reproduce the original."""


class NotFittedError(FusionEngineError, ValueError, AttributeError):
    """A model was asked to predict before it was trained (``fit``) or loaded from a RUN_DIR.

    A ValueError and an AttributeError, as scikit-learn's ``sklearn.exceptions.NotFittedError`` is
    (not a subclass of it: importing scikit-learn here would slow every import of fusion-engine).
    """


class RandomInitWarning(UserWarning):
    """Branches of a built model are randomly initialised because no pretrained weights could be had
    (``Engine.build`` names them all in one warning; ``"pretrained": false`` asks for random weights
    on purpose and is not warned about)."""


def suggest(name: str, valid) -> str:
    """' (did you mean X?)' when a close match exists, else ''."""
    match = difflib.get_close_matches(str(name), list(valid), n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""


def validation_message(exc: pydantic.ValidationError, *, valid=None, noun: str = "option") -> str:
    """One line naming each problem of ``exc``: unknown names (with a close match from ``valid``, the
    top-level field names), missing ones, bad values with the value given; then the valid names."""
    problems, unknown = [], False
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or noun
        if err["type"] == "extra_forbidden":
            top = len(err["loc"]) == 1  # ``valid`` names the top-level fields only
            unknown = unknown or top
            problems.append(f"unknown {noun} '{loc}'" + (suggest(loc, valid or []) if top else ""))
        elif err["type"] == "missing":
            problems.append(f"{noun} '{loc}' is required")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            given = err.get("input")
            shown = f" (got {given!r})" if given is not None and not isinstance(given, (dict, list)) else ""
            problems.append(f"{noun} '{loc}': {msg}{shown}")
    if unknown and valid is not None:
        problems[-1] += f". Valid {noun}s: {', '.join(valid) or '(none)'}"
    return "; ".join(problems)


def printable(text) -> str:
    """``text`` safe to print on a terminal: control and other non-printable characters (ANSI escapes,
    newlines, bidi overrides) written as ``repr``-style escapes (``\\x1b``, ``\\n``, ``\\u202e``);
    printable text, non-ASCII letters included, unchanged. For text output only: JSON stays exact."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
