"""docs/plugins.md: every hook is documented and tested (as datasette checks its plugin hooks), and the tutorial runs."""

from __future__ import annotations

import importlib.util
import inspect
import json
import re
import types
from pathlib import Path

import pytest
import torch

from fusion_engine import Engine, hookspecs

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "plugins.md"
TESTS = Path(__file__).resolve().parent

HOOKS = sorted(name for name, obj in vars(hookspecs).items() if hasattr(obj, f"{hookspecs.PROJECT}_spec"))


@pytest.fixture(scope="module")
def docs() -> str:
    return DOCS.read_text()


def headings(text: str) -> list[str]:
    return [line for line in text.splitlines() if re.match(r"#{1,6} ", line)]


def hook_reference(text: str) -> str:
    """The '## Hook reference' section, up to the next level-2 heading."""
    match = re.search(r"^## Hook reference\n(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    assert match, "docs/plugins.md has no '## Hook reference' section"
    return match.group(1)


def test_hookspecs_are_found():
    assert {"register_backbones", "register_extractors", "register_fusions"} <= set(HOOKS)


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_has_a_heading_with_its_signature(docs, hook):
    signature = f"{hook}({', '.join(inspect.signature(getattr(hookspecs, hook)).parameters)})"
    section = headings(hook_reference(docs))
    assert any(signature in line for line in section), f"no heading '{signature}' in the hook reference"


def test_every_hook_heading_is_a_real_hook(docs):
    named = {m.group(1) for line in headings(hook_reference(docs)) for m in [re.search(r"`(\w+)\(", line)] if m}
    assert named - {"register"} <= set(HOOKS), (
        f"documented hooks that do not exist: {named - {'register'} - set(HOOKS)}"
    )


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_has_a_test(hook):
    pattern = re.compile(rf"\b{hook}\b")
    using = [p.name for p in TESTS.glob("test_*.py") if p.name != Path(__file__).name and pattern.search(p.read_text())]
    assert using, f"no test under tests/ uses the hook {hook}"


def test_every_environment_variable_is_documented(docs):
    sources = [ROOT / "fusion_engine" / "core" / "plugins.py", ROOT / "fusion_engine" / "core" / "weights_index.py"]
    variables = {v for path in sources for v in re.findall(r"FUSION_ENGINE_[A-Z_]+", path.read_text())}
    assert variables
    missing = sorted(v for v in variables if v not in hook_reference(docs))
    assert not missing, f"environment variables missing from docs/plugins.md: {missing}"


def test_the_example_plugin_works(docs):
    section = re.search(r"^### Example plugin\n(.*?)(?=^##|\Z)", docs, flags=re.M | re.S).group(1)
    code = re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)
    module = types.ModuleType("fusion_engine_maxout")
    exec(compile(code, str(DOCS), "exec"), module.__dict__)
    engine = Engine.from_plugins([module], entry_points=False)
    component = engine.registry.get("fusion", "maxout")
    assert (component.plugin, component.version) == ("fusion_engine_maxout", "0.1.0")
    assert component.describe_options() == {"dropout": "float = 0.0"}
    model = engine.build(
        {
            "backbones": [{"name": "timm", "model": "test_resnet", "input_size": 32, "pretrained": False}],
            "fusion": {"name": "maxout", "dropout": 0.1},
            "num_classes": 3,
        }
    )
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 3)


# --- the tutorial: its code blocks run, in order, in an empty folder, as a user runs them -------------
#
# Fenced blocks whose info string has the word "tutorial" (```python tutorial) belong to it:
#   ```python tutorial                 run (one namespace for all blocks, like a notebook, named __main__)
#   ```LANG tutorial file=PATH         written to PATH (relative to the folder)
#   ```toml tutorial excerpt=PATH      must appear in PATH as it is at that point
#   ```text tutorial output            each line must be a line the previous block printed; "..." in a line
#                                      stands for any text (what varies from run to run)
#   ```text tutorial list              step 4: the package is pip-installed here, as a user installs it, and
#                                      each line (but "...") must appear in `fusion-engine list fusion`;
#                                      every block after it runs with the package installed
# Blocks may be indented (inside list items); the indentation is removed.

TUTORIAL_BLOCK = re.compile(
    r"^(?P<indent>[ \t]*)```(?P<lang>\w+)[ \t]+tutorial\b(?P<attrs>[^\n]*)\n(?P<body>.*?)"
    r"^(?P=indent)```[ \t]*$",
    flags=re.M | re.S,
)


def tutorial_blocks(text: str) -> list[dict]:
    blocks = []
    for m in TUTORIAL_BLOCK.finditer(text):
        indent = m.group("indent")
        body = "".join(
            line[len(indent) :] if line.startswith(indent) else line
            for line in m.group("body").splitlines(keepends=True)
        )
        attrs = dict(a.split("=", 1) for a in m.group("attrs").split() if "=" in a)
        flags = {a for a in m.group("attrs").split() if "=" not in a}
        blocks.append(
            {
                "lang": m.group("lang"),
                "attrs": attrs,
                "flags": flags,
                "code": body,
                "line": text.count("\n", 0, m.start()) + 1,
            }
        )
    return blocks


def printed_as_documented(documented: str, printed: str) -> bool:
    """Whether ``printed`` has a line equal to ``documented``, where "..." in it stands for any text."""
    pattern = ".*".join(re.escape(part) for part in documented.strip().split("..."))
    return any(re.fullmatch(pattern, line.strip()) for line in printed.splitlines())


def test_output_lines_match_whole_lines_with_ellipses():
    assert printed_as_documented("accuracy: ...", "x\naccuracy: 0.93\n")
    assert not printed_as_documented("accuracy:", "accuracy: 0.93")  # a whole line, not a part of one
    assert printed_as_documented("<__main__.Typo object at 0x...>", "<__main__.Typo object at 0x7f00>")


def test_the_tutorial_is_marked_for_testing(docs):
    blocks = tutorial_blocks(docs)
    run = [b for b in blocks if b["lang"] == "python" and not b["attrs"]]
    written = [b["attrs"]["file"] for b in blocks if "file" in b["attrs"]]
    assert len(run) >= 6, "the tutorial's python blocks must be marked ```python tutorial so that they are tested"
    assert "fusion-engine-geomean/fusion_engine_geomean/fusion.py" in written
    assert "fused.json" in written, "fused.json is used by the tutorial's CLI example: show it"
    assert any("list" in b["flags"] for b in blocks) and any("output" in b["flags"] for b in blocks)
    unmarked = re.findall(
        r"^[ \t]*```python[ \t]*\n(?:(?!```).)*?Engine\.from_plugins\(\[fusion_engine_geomean", docs, flags=re.M | re.S
    )
    assert not unmarked, "a tutorial python block is not marked 'tutorial'"
    for heading in (
        "## Tutorial: a fusion plugin from nothing to `fusion-engine list`",
        "## Hook reference",
        "## Testing a plugin",
        "## When a plugin breaks",
    ):
        assert heading in headings(docs)
    for variable in ("FUSION_ENGINE_LOAD_PLUGINS", "FUSION_ENGINE_DISABLE_PLUGINS", "FUSION_ENGINE_STRICT_PLUGINS"):
        assert variable in docs.split("## When a plugin breaks", 1)[1]


def install(package: Path, site: Path, env: dict) -> None:
    """``pip install PACKAGE`` (into a folder, not this environment)."""
    import subprocess
    import sys

    isolation = ["--no-build-isolation", "--no-index"] if importlib.util.find_spec("setuptools") else []
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", *isolation, "--target", str(site), str(package)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_the_tutorial_runs_installs_lists_and_passes_its_tests(docs, tmp_path, monkeypatch, subprocess_env):
    import contextlib
    import io
    import subprocess
    import sys
    import warnings

    from fusion_engine.errors import RandomInitWarning

    monkeypatch.chdir(tmp_path)
    saved_path, saved_modules = list(sys.path), set(sys.modules)
    namespace: dict = {"__name__": "__main__"}
    printed, listed = "", False
    package, site = tmp_path / "fusion-engine-geomean", tmp_path / "site"
    env = {**subprocess_env, "PYTHONPATH": str(site)}
    try:
        for block in tutorial_blocks(docs):
            where = f"docs/plugins.md:{block['line']} ({block['lang']} tutorial {' '.join(block['flags'])})"
            if "file" in block["attrs"]:
                path = tmp_path / block["attrs"]["file"]
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(block["code"])
            elif "excerpt" in block["attrs"]:
                text = (tmp_path / block["attrs"]["excerpt"]).read_text()
                assert block["code"].strip() in text, f"{where}: not found in {block['attrs']['excerpt']}:\n{text}"
            elif block["lang"] == "python":
                out = io.StringIO()
                with contextlib.redirect_stdout(out), warnings.catch_warnings():
                    warnings.simplefilter("error", RandomInitWarning)  # the tutorial asks for what it builds
                    exec(compile(block["code"], where, "exec"), namespace)
                printed = out.getvalue()
            elif "output" in block["flags"]:
                for line in block["code"].strip().splitlines():
                    assert printed_as_documented(line, printed), (
                        f"{where}: {line.strip()!r} not printed; got:\n{printed}"
                    )
            elif "list" in block["flags"]:
                # step 4 for real: install, list; the rest of the tutorial runs with the package installed
                install(package, site, subprocess_env)
                sys.path.insert(0, str(site))
                importlib.invalidate_caches()
                result = subprocess.run(
                    [sys.executable, "-m", "fusion_engine", "list", "fusion"],
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=120,
                )
                assert result.returncode == 0, result.stderr
                lines = result.stdout.splitlines()
                expected = [line.rstrip() for line in block["code"].splitlines() if line.strip() not in ("", "...")]
                for line in expected:
                    assert line in lines, (
                        f"{where}: `fusion-engine list fusion` does not show {line!r}:\n{result.stdout}"
                    )
                listed = True
    finally:
        sys.path[:] = saved_path
        for name in set(sys.modules) - saved_modules:
            if str(getattr(sys.modules[name], "__file__", None) or "").startswith(str(tmp_path)):
                del sys.modules[name]
    assert listed and package.is_dir()
    # fused.json, as shown: the installed engine accepts it, and `train --config fused.json` gets past the config
    # (validated before any data is read) to the data
    config = json.loads((tmp_path / "fused.json").read_text())
    assert config["fusion"]["name"] == "geomean"
    result = subprocess.run(
        [sys.executable, "-m", "fusion_engine", "train", "--config", "fused.json", "--data", "photos/"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "photos" in result.stderr and "geomean" not in result.stderr, result.stderr
    # step 5: the package's tests (the generated ones and the tutorial's test_listing.py) pass unchanged
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(package)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0 and "6 passed" in result.stdout, result.stdout[-3000:] + result.stderr[-2000:]


def test_every_test_named_in_the_security_doc_exists():
    """docs/security.md cites a test for each case; each must exist, so the table cannot drift from the suite."""
    text = (ROOT / "docs" / "security.md").read_text()
    cited = set(re.findall(r"`(test_\w+\.py)::(test_\w+)`", text))
    assert len(cited) > 20
    missing = [
        f"{f}::{name}"
        for f, name in sorted(cited)
        if not re.search(rf"^def {name}\(", (TESTS / f).read_text(), flags=re.M)
    ]
    assert missing == []
