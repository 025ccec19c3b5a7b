"""The package's shape: no import cycles (imports inside functions count), layers imported in one
direction only, built-ins and in-repo plugins importing only the declared plugin API.

The graph is read from the source (AST), nothing is imported; imports under ``if TYPE_CHECKING:``
never run and are left out.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "fusion_engine"

# Lowest first. A module may import modules of its own layer or of layers listed before it.
LAYERS = [
    ("base", ["errors", "hookspecs", "version"]),
    ("core", ["core"]),
    ("artifacts", ["artifacts"]),
    ("plugin_api", ["plugin_api"]),
    ("builtins", ["builtins"]),
    ("runtime", ["runtime"]),
    ("training", ["training"]),
    ("api", ["api"]),
    ("estimator", ["sklearn"]),
    ("search", ["search"]),
    ("tools", ["testing", "scaffold"]),
    ("cli", ["cli"]),
    ("face", ["", "__main__"]),  # the package __init__ (what users import) and ``python -m fusion_engine``
]


def module_files(package_dir: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under ``package_dir`` (a package's __init__ by its name)."""
    modules = {}
    for f in sorted(package_dir.rglob("*.py")):
        parts = f.relative_to(package_dir.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return modules


def _targets(module: str, is_package: bool, node, modules) -> set[str]:
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        if node.level:
            base = module.split(".") if is_package else module.split(".")[:-1]
            base = base[: len(base) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
        else:
            target = node.module or ""
        names = [target] + [f"{target}.{a.name}" for a in node.names]
    found = set()
    for name in names:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        if name and name != module:
            found.add(name)
    return found


def import_graph(package_dir: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports, at module level or inside functions."""
    modules = module_files(package_dir)
    graph = {}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        skipped = {
            id(n)
            for node in ast.walk(tree)
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for stmt in node.body
            for n in ast.walk(stmt)
        }
        graph[module] = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in skipped:
                graph[module] |= _targets(module, path.name == "__init__.py", node, modules)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def layer_of(module: str, package: str = "fusion_engine") -> int:
    rest = module[len(package) :].lstrip(".")
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if rest == prefix or (prefix and rest.startswith(prefix + ".")):
                return i
    raise AssertionError(
        f"{module} belongs to no layer: add it to LAYERS in tests/test_architecture.py "
        "and to the module table of docs/architecture.md"
    )


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return [
        f"{src} ({LAYERS[layer_of(src)][0]}) imports {dst} ({LAYERS[layer_of(dst)][0]})"
        for src, targets in sorted(graph.items())
        for dst in sorted(targets)
        if layer_of(dst) > layer_of(src)
    ]


def test_no_import_cycles():
    cycles = find_cycles(import_graph(PACKAGE))
    assert not cycles, "import cycles (imports inside functions count): " + "; ".join(" -> ".join(c) for c in cycles)


def test_layers_import_downward_only():
    assert upward_imports(import_graph(PACKAGE)) == []


def test_nothing_imports_a_builtin_plugin():
    """Built-ins are loaded through fusion-engine's own entry points, like any plugin; no module names them."""
    importers = [
        f"{src} imports {dst}"
        for src, targets in import_graph(PACKAGE).items()
        for dst in targets
        if dst.startswith("fusion_engine.builtins") and not src.startswith("fusion_engine.builtins")
    ]
    assert importers == []


def _fusion_engine_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").startswith("fusion_engine"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("fusion_engine")}
    return found


PLUGIN_CODE = sorted(
    [*(PACKAGE / "builtins").glob("*.py"), *(f for f in (ROOT / "plugins").glob("*/fusion_engine_*/**/*.py"))]
)


@pytest.mark.parametrize("path", PLUGIN_CODE, ids=lambda p: str(p.relative_to(ROOT)))
def test_plugins_import_only_the_plugin_api(path):
    """Built-ins and the in-repo plugin packages import from fusion-engine only ``fusion_engine.plugin_api``."""
    used = {m for m in _fusion_engine_imports(path) if m == "fusion_engine" or m.startswith("fusion_engine.")}
    assert used <= {"fusion_engine.plugin_api"}, f"{path.name} imports {sorted(used)}; use fusion_engine.plugin_api"


def test_plugin_api_lists_what_it_exports():
    import fusion_engine.plugin_api as api

    assert sorted(api.__all__) == sorted(n for n in vars(api) if not n.startswith("_") and n != "annotations")
    assert "hookimpl" in api.__all__ and "load_weights_file" in api.__all__


def _fake_package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "fakepkg"
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_cycle_check_names_a_back_edge_inside_a_function(tmp_path):
    """The checker itself: a lower module importing an upper one inside a function is a named cycle."""
    root = _fake_package(
        tmp_path,
        {
            "__init__.py": "",
            "core/__init__.py": "",
            "core/model.py": "def fit(x):\n    from fakepkg.training.loop import run\n    return run(x)\n",
            "training/__init__.py": "",
            "training/loop.py": "from fakepkg.core.model import fit\n\ndef run(x):\n    return x\n",
            "cli.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from fakepkg.training import loop\n",
        },
    )
    assert find_cycles(import_graph(root)) == [["fakepkg.core.model", "fakepkg.training.loop"]]
    (root / "core/model.py").write_text("def fit(x):\n    return x\n")
    assert find_cycles(import_graph(root)) == []


def test_cycle_check_counts_package_init_reexports(tmp_path):
    """``from . import x`` inside a subpackage goes through its __init__: re-exporting there closes a loop."""
    root = _fake_package(
        tmp_path,
        {
            "__init__.py": "",
            "cli/__init__.py": "from fakepkg.cli.main import main\n",
            "cli/main.py": "from fakepkg.cli import train\n\ndef main():\n    return train\n",
            "cli/train.py": "",
        },
    )
    assert find_cycles(import_graph(root)) == [["fakepkg.cli", "fakepkg.cli.main"]]


def test_layer_check_names_an_upward_import():
    graph = {"fusion_engine.core.network": {"fusion_engine.training.fit"}, "fusion_engine.training.fit": set()}
    assert upward_imports(graph) == ["fusion_engine.core.network (core) imports fusion_engine.training.fit (training)"]


def test_architecture_doc_names_every_module():
    """docs/architecture.md's module table matches the tree: every module file is named there."""
    doc = (ROOT / "docs" / "architecture.md").read_text()
    modules = [
        f.relative_to(PACKAGE).as_posix()
        for f in PACKAGE.rglob("*.py")
        if f.name != "__init__.py" or f.parent == PACKAGE
    ]
    assert [m for m in sorted(modules) if f"`{m}`" not in doc] == []
    table = doc.split("## Modules", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"`([a-z_]+(?:/[a-z_]+)*\.py)`", table))
    assert sorted(n for n in named if not (PACKAGE / n).is_file()) == []
