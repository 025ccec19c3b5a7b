"""fusion_engine.scaffold.new_plugin: a package skeleton that installs and passes its own tests."""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from fusion_engine import ConfigError, FusionEngineError
from fusion_engine.cli.new_plugin import run as cmd_new_plugin
from fusion_engine.scaffold import KINDS, NAME_RULE, ScaffoldError, names, new_plugin

GENERATED = {"fusion": "tinyfuse", "backbone": "tiny-net", "extractor": "mean_std"}


def pip_install(packages, target: Path, env: dict) -> None:
    """``pip install --no-deps --target``: offline, with this environment's setuptools when it has one."""
    # without setuptools here (Python >= 3.12 venvs), pip fetches it into an isolated build environment
    isolation = ["--no-build-isolation", "--no-index"] if importlib.util.find_spec("setuptools") else []
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            *isolation,
            "--target",
            str(target),
            *map(str, packages),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow  # pip builds three packages, then their tests run in a subprocess: 15-45 s
def test_every_kind_installs_and_passes_its_own_tests(tmp_path, subprocess_env):
    packages = [new_plugin(name, kind, tmp_path) for kind, name in GENERATED.items()]
    assert [p.name for p in packages] == ["fusion-engine-tinyfuse", "fusion-engine-tiny-net", "fusion-engine-mean_std"]
    site = tmp_path / "site"
    pip_install(packages, site, subprocess_env)
    assert {p.name for p in site.glob("fusion_engine_*.dist-info")} == {
        "fusion_engine_tinyfuse-0.1.0.dist-info",
        "fusion_engine_tiny_net-0.1.0.dist-info",
        "fusion_engine_mean_std-0.1.0.dist-info",
    }
    env = {**subprocess_env, "PYTHONPATH": str(site)}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *map(str, packages)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "15 passed" in result.stdout and "skipped" not in result.stdout, result.stdout[-2000:]  # entry points too
    listing = subprocess.run(
        [sys.executable, "-m", "fusion_engine", "list"], env=env, capture_output=True, text=True, timeout=120
    )
    assert listing.returncode == 0, listing.stderr
    for kind, name in GENERATED.items():
        component = names(name)["component"]
        assert f"{component} 0.1.0 (entry point, fusion-engine-{name}): {kind}:{component}" in listing.stdout


def test_layout_and_entry_point(tmp_path):
    path = new_plugin("gatedsum", "fusion", tmp_path)
    files = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())
    assert files == [
        "README.md",
        "fusion_engine_gatedsum/__init__.py",
        "fusion_engine_gatedsum/fusion.py",
        "fusion_engine_gatedsum/plugin.py",
        "pyproject.toml",
        "tests/test_fusion_engine_gatedsum.py",
    ]
    pyproject = (path / "pyproject.toml").read_text()
    assert 'name = "fusion-engine-gatedsum"' in pyproject
    assert '[project.entry-points.fusion_engine]\ngatedsum = "fusion_engine_gatedsum.plugin"' in pyproject
    assert "def register_fusions(register):" in (path / "fusion_engine_gatedsum/plugin.py").read_text()
    assert "check_fusion(gatedsum" in (path / "tests/test_fusion_engine_gatedsum.py").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fusion-engine-gatedsum"]  # no staging folder left
    for source in path.rglob("*.py"):
        compile(source.read_text(), str(source), "exec")


def test_refuses_to_overwrite(tmp_path):
    existing = tmp_path / "fusion-engine-taken"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    with pytest.raises(ScaffoldError, match=r"fusion-engine-taken exists already; new-plugin never overwrites") as info:
        new_plugin("taken", "backbone", tmp_path)
    assert isinstance(info.value, FusionEngineError) and isinstance(info.value, FileExistsError)
    assert sorted(p.name for p in existing.iterdir()) == ["keep.txt"] and (existing / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fusion-engine-taken"]


@pytest.mark.parametrize(
    "name", ["", "Maxout", "2fast", "my fusion", "my--fusion", "trailing-", "dots.no", "x" * 41, "über", "a:b"]
)
def test_invalid_names_state_the_rule(tmp_path, name):
    with pytest.raises(ConfigError, match="invalid plugin name") as info:
        new_plugin(name, "fusion", tmp_path)
    assert NAME_RULE in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_prefix_and_kind_and_clashes(tmp_path):
    with pytest.raises(ConfigError, match=r"leave out the 'fusion-engine-' prefix .*'maxout' gives"):
        new_plugin("fusion-engine-maxout", "fusion", tmp_path)
    with pytest.raises(ConfigError, match=r"unknown component kind 'head'; valid kinds: backbone, extractor, fusion"):
        new_plugin("maxout", "head", tmp_path)
    with pytest.raises(ConfigError, match=r"a fusion named 'concat' exists already \(plugin 'fusions'\)"):
        new_plugin("concat", "fusion", tmp_path)
    with pytest.raises(ConfigError, match=r"an installed plugin is already called 'fusions'"):
        new_plugin("fusions", "backbone", tmp_path)
    assert list(tmp_path.iterdir()) == []
    assert new_plugin("concat", "fusion", tmp_path, check_installed=False).name == "fusion-engine-concat"


def test_names():
    assert names("my-fusion") == {
        "name": "my-fusion",
        "distribution": "fusion-engine-my-fusion",
        "module": "fusion_engine_my_fusion",
        "component": "my_fusion",
        "factory": "my_fusion",
        "Class": "MyFusion",
    }
    assert names("class")["factory"] == "class_"  # a keyword cannot name a function
    assert set(KINDS) == set(GENERATED)


def test_cmd_new_plugin(tmp_path, capsys):
    args = argparse.Namespace(name="gem2", kind="extractor", directory=str(tmp_path))
    assert cmd_new_plugin(args) == 0
    out = capsys.readouterr().out
    path = tmp_path / "fusion-engine-gem2"
    assert f"wrote {path}/" in out and f"pip install -e {path}" in out and "fusion-engine list extractor" in out
    assert (path / "fusion_engine_gem2" / "extractor.py").is_file()
    with pytest.raises(ScaffoldError):
        cmd_new_plugin(args)
