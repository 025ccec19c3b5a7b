"""Every hook is documented in docs/plugins.md and tested (as datasette checks its plugin hooks)."""

from __future__ import annotations

import inspect
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
    assert named - {"register"} <= set(HOOKS), f"documented hooks that do not exist: {named - {'register'} - set(HOOKS)}"


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_has_a_test(hook):
    pattern = re.compile(rf"\b{hook}\b")
    using = [p.name for p in TESTS.glob("test_*.py") if p.name != Path(__file__).name and pattern.search(p.read_text())]
    assert using, f"no test under tests/ uses the hook {hook}"


def test_every_environment_variable_is_documented(docs):
    sources = [ROOT / "fusion_engine" / "plugins.py", ROOT / "fusion_engine" / "weights_index.py"]
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
    model = engine.build({"backbones": [{"name": "timm", "model": "test_resnet", "input_size": 32}],
                          "fusion": {"name": "maxout", "dropout": 0.1}, "num_classes": 3})
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 3)
