"""``fusion-engine list``: plugins, their components and options, the pretrained weights the index can find
(``--weights-dir`` folders and weights shipped by installed packages), and plugins that failed to load."""

from __future__ import annotations

import json
from pathlib import Path

from fusion_engine.cli.common import apply_weights_dir
from fusion_engine.cli.common import engine as make_engine
from fusion_engine.core.registry import KINDS
from fusion_engine.core.weights_index import all_entries, timm_model
from fusion_engine.errors import WeightsError


def add_parser(sub) -> None:
    p = sub.add_parser("list", help="installed plugins, their components and the pretrained weights found")
    p.add_argument("kind", nargs="?", choices=KINDS, help="only this kind")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("-v", "--verbose", action="store_true", help="show each component's options")
    p.add_argument(
        "--weights-dir",
        action="append",
        metavar="DIR",
        help="folder with an index.json of local weights, listed too (repeatable)",
    )
    p.set_defaults(func=run)


def weights_rows() -> tuple[list[dict], str | None]:
    """(rows, error): each indexed weights name with its architecture (``model``: the timm model built for it)
    and where it comes from (``distribution``: the package that shipped it, None for a --weights-dir folder);
    error: why the index could not be read."""
    try:
        entries = all_entries()
    except WeightsError as exc:
        return [], str(exc)
    rows = []
    for name, entry in entries.items():
        model = timm_model(name, entry)
        rows.append(
            {
                "name": name,
                "model": f"timm:{model}" if model else None,  # what the timm backbone builds for it
                "architecture": str(entry.get("architecture", "")),
                "distribution": entry.get("distribution"),
                "path": entry["path"],
                "sha256": entry.get("sha256"),
                "license": entry.get("license"),
            }
        )
    return rows, None


def run(args) -> int:
    """Plugins, their components, and plugins that failed to load (a failure is listed, not an
    error: exit 0, unless FUSION_ENGINE_STRICT_PLUGINS=1 made it a PluginError)."""
    apply_weights_dir(args)
    engine = make_engine()
    components = engine.components(args.kind)
    weights, weights_error = weights_rows()
    if args.json:
        print(
            json.dumps(
                {
                    "plugins": [
                        {
                            "name": p.name,
                            "version": p.version,
                            "source": p.source,
                            "distribution": p.distribution,
                            "components": [f"{c.kind}:{c.name}" for c in engine.components() if c.plugin == p.name],
                        }
                        for p in engine.plugins
                    ],
                    "components": [
                        {
                            "kind": c.kind,
                            "name": c.name,
                            "plugin": c.plugin,
                            "version": c.version,
                            "distribution": c.distribution,
                            "description": c.description,
                            "options": c.describe_options(),
                        }
                        for c in components
                    ],
                    "weights": weights,
                    "weights_error": weights_error,
                    "failures": [
                        {"name": f.name, "version": f.version, "distribution": f.distribution, "error": f.error}
                        for f in engine.failures
                    ],
                },
                indent=2,
            )
        )
        return 0
    print("Plugins:")
    for p in engine.plugins:
        offered = ", ".join(f"{c.kind}:{c.name}" for c in engine.components() if c.plugin == p.name)
        print(f"  {p.name} {p.version or '?'} ({p.source}{', ' + p.distribution if p.distribution else ''}): {offered}")
    for kind in [args.kind] if args.kind else KINDS:
        print(f"\n{kind.capitalize()}s:")
        for c in engine.components(kind):
            options = ", ".join(f"{k}: {v}" for k, v in c.describe_options().items())
            print(f"  {c.name:<14} {c.description}  [{c.plugin} {c.version or ''}]".rstrip())
            if args.verbose and options:
                print(f"  {'':<14} options: {options}")
    if not args.kind:
        print("\nWeights:")
        for w in weights:
            origin = w["distribution"] or str(Path(w["path"]).parent)
            architecture = w["model"] or w["architecture"].split("(")[0].split(":")[0].strip()[:40] or "?"
            print(f"  {w['name']:<38} {architecture:<24} [{origin}]")
        if weights_error:
            print(f"  (the weights index cannot be read: {weights_error})")
        elif not weights:
            print("  none (pip install ./plugins/fusion-engine-weights, or --weights-dir DIR with an index.json)")
    if engine.failures:
        print("\nPlugins that failed to load (set FUSION_ENGINE_STRICT_PLUGINS=1 to make this an error):")
        for f in engine.failures:
            print(f"  {f.name} {f.version or ''} ({f.distribution or 'unknown distribution'}): {f.error}")
    return 0
