"""``fusion-engine list``, run as a user would: ``python -m fusion_engine`` in a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys

import fusion_engine

BROKEN = "raise ImportError('fake_cli_broken needs a package that is not installed')\n"


def run_list(env, *args):
    return subprocess.run(
        [sys.executable, "-m", "fusion_engine", "list", *args], env=env, capture_output=True, text=True, timeout=120
    )


def test_list_json_shows_builtin_components_with_plugin_version_description(subprocess_env):
    result = run_list(subprocess_env, "--json")
    assert result.returncode == 0, result.stderr
    listing = json.loads(result.stdout)
    components = {(c["kind"], c["name"]): c for c in listing["components"]}
    expected = {
        ("backbone", "timm"): "timm_backbones",
        **{("extractor", n): "extractors" for n in ("avg", "max", "avgmax", "gem", "multiscale", "token")},
        **{("fusion", n): "fusions" for n in ("concat", "attention", "gated", "vote", "stacking")},
    }
    for key, plugin in expected.items():
        component = components[key]
        assert component["plugin"] == plugin
        assert component["version"] == fusion_engine.__version__
        assert component["description"]
    assert components[("fusion", "attention")]["options"]["dim"] == "int = 256"
    plugins = {p["name"]: p for p in listing["plugins"]}
    assert plugins["fusions"]["source"] == "built-in"
    assert "fusion:stacking" in plugins["fusions"]["components"]
    assert listing["failures"] == []


def test_list_one_kind_as_text(capsys):
    from fusion_engine import cli

    assert cli.main(["list", "extractor", "-v"]) == 0
    out = capsys.readouterr().out
    assert "Extractors:" in out and "Fusions:" not in out
    assert "gem" in out and "options: p: float = 3.0, learnable: bool = False" in out


def write_broken_distribution(folder):
    info = folder / "fake_cli_broken-0.4.2.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-cli-broken\nVersion: 0.4.2\n")
    (info / "entry_points.txt").write_text("[fusion_engine]\nfake_cli_broken = fake_cli_broken_module\n")
    (folder / "fake_cli_broken_module.py").write_text(BROKEN)


def test_list_with_a_broken_plugin_still_exits_0_and_shows_the_failure(subprocess_env, tmp_path):
    write_broken_distribution(tmp_path)
    env = {**subprocess_env, "PYTHONPATH": str(tmp_path)}
    result = run_list(env, "--json")
    assert result.returncode == 0, result.stderr
    [failure] = json.loads(result.stdout)["failures"]
    assert failure == {
        "name": "fake_cli_broken",
        "version": "0.4.2",
        "distribution": "fake-cli-broken",
        "error": "ImportError: fake_cli_broken needs a package that is not installed",
    }


def test_list_as_text_shows_failures(fake_distribution, capsys):
    from fusion_engine import cli

    fake_distribution("fake-cli-broken", "0.4.2", BROKEN, entry_point="fake_cli_broken")
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    assert "Plugins that failed to load" in out
    assert "fake_cli_broken 0.4.2 (fake-cli-broken): ImportError: fake_cli_broken needs a package" in out


def test_list_with_a_broken_plugin_in_strict_mode_fails_naming_it(subprocess_env, tmp_path):
    write_broken_distribution(tmp_path)
    env = {**subprocess_env, "PYTHONPATH": str(tmp_path), "FUSION_ENGINE_STRICT_PLUGINS": "1"}
    result = run_list(env, "--json")
    assert result.returncode != 0
    assert result.stdout == ""
    assert "fake_cli_broken" in result.stderr and "needs a package that is not installed" in result.stderr
    assert "Traceback" not in result.stderr  # a clear message, not a crash
