"""``fusion-engine list``: plugins, their components and options, and plugins that failed to load."""

from __future__ import annotations

import json

from fusion_engine.cli.common import engine as make_engine
from fusion_engine.core.registry import KINDS


def add_parser(sub) -> None:
    p = sub.add_parser("list", help="installed plugins and their components")
    p.add_argument("kind", nargs="?", choices=KINDS, help="only this kind")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("-v", "--verbose", action="store_true", help="show each component's options")
    p.set_defaults(func=run)


def run(args) -> int:
    """Plugins, their components, and plugins that failed to load (a failure is listed, not an
    error: exit 0, unless FUSION_ENGINE_STRICT_PLUGINS=1 made it a PluginError)."""
    engine = make_engine()
    components = engine.components(args.kind)
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
    if engine.failures:
        print("\nPlugins that failed to load (set FUSION_ENGINE_STRICT_PLUGINS=1 to make this an error):")
        for f in engine.failures:
            print(f"  {f.name} {f.version or ''} ({f.distribution or 'unknown distribution'}): {f.error}")
    return 0
