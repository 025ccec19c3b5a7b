"""``fusion-engine new-plugin``: write a ready-to-install plugin package skeleton."""

from __future__ import annotations

from fusion_engine.scaffold.generator import names, new_plugin


def add_parser(sub) -> None:
    p = sub.add_parser("new-plugin", help="write a ready-to-install plugin package skeleton")
    p.add_argument("name", metavar="NAME", help="plugin name; the package is fusion-engine-NAME")
    p.add_argument(
        "--kind", choices=["backbone", "extractor", "fusion"], default="fusion", help="component kind (default: fusion)"
    )
    p.add_argument("--directory", "-d", default=".", help="where to create fusion-engine-NAME/ (default: .)")
    p.set_defaults(func=run)


def run(args) -> int:
    """``fusion-engine new-plugin NAME [--kind KIND] [--directory DIR]``."""
    path = new_plugin(args.name, args.kind or "fusion", args.directory or ".")
    n = names(args.name)
    print(
        f"wrote {path}/ ({n['distribution']}: a {args.kind or 'fusion'} named '{n['component']}')\n"
        f"next:\n"
        f"  pip install -e {path}\n"
        f"  fusion-engine list {args.kind or 'fusion'}\n"
        f"  pytest {path}\n"
        f"then edit {path / n['module'] / ((args.kind or 'fusion') + '.py')}"
    )
    return 0
