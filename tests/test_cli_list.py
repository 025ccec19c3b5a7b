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


# --- one bad plugin never stops `fusion-engine list` (issue #17) ------------------------------------

BAD_PLUGINS = {
    # entry point: (distribution, module source)
    "fake_exit_import": ("fake-exit-import", "import sys\nsys.exit(3)\n"),
    "fake_exit_hook": (
        "fake-exit-hook",
        "import sys\nfrom fusion_engine import hookimpl\n\n@hookimpl\ndef register_fusions(register):\n    sys.exit(4)\n",
    ),
    "fake_clash": (
        "fake-clash",
        "from fusion_engine import hookimpl\nfrom fusion_engine.builtins.fusions import concat\n\n"
        "@hookimpl\ndef register_fusions(register):\n    register('concat', concat)\n",
    ),
    "fusions": ("fake-shadow", "raise RuntimeError('an impostor of the built-in fusions')\n"),
}
GOOD = (
    "from fusion_engine import hookimpl\nfrom fusion_engine.builtins.fusions import concat\n\n"
    "@hookimpl\ndef register_fusions(register):\n    register('still_here', concat, description='a good plugin')\n"
)


def write_distribution(folder, entry_point, dist, source):
    module = f"{dist.replace('-', '_')}_module"
    info = folder / f"{dist.replace('-', '_')}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[fusion_engine]\n{entry_point} = {module}\n")
    (folder / f"{module}.py").write_text(source)


def test_list_with_plugins_that_exit_clash_or_shadow_exits_0_and_lists_each(subprocess_env, tmp_path):
    for entry_point, (dist, source) in BAD_PLUGINS.items():
        write_distribution(tmp_path, entry_point, dist, source)
    write_distribution(tmp_path, "fake_good", "fake-good", GOOD)
    env = {**subprocess_env, "PYTHONPATH": str(tmp_path)}
    result = run_list(env, "--json")
    assert result.returncode == 0, result.stderr
    listing = json.loads(result.stdout)
    failures = {f["name"]: f for f in listing["failures"]}
    assert set(failures) == set(BAD_PLUGINS)
    assert failures["fake_exit_import"]["error"] == "SystemExit: the plugin called sys.exit(3)"
    assert failures["fake_exit_hook"]["error"] == "SystemExit: the plugin called sys.exit(4)"
    assert "fusion 'concat' is a built-in of plugin 'fusions'" in failures["fake_clash"]["error"]
    assert failures["fusions"]["distribution"] == "fake-shadow" and "built-in plugin" in failures["fusions"]["error"]
    components = {(c["kind"], c["name"]): c for c in listing["components"]}
    assert components[("fusion", "still_here")]["distribution"] == "fake-good"
    for name in ("concat", "attention", "gated", "vote", "stacking"):
        assert (components[("fusion", name)]["plugin"], components[("fusion", name)]["distribution"]) == (
            "fusions",
            "fusion-engine",
        )

    # as text: the good plugin and every failure are printed
    result = run_list(env)
    assert result.returncode == 0, result.stderr
    assert "still_here" in result.stdout and "Plugins that failed to load" in result.stdout
    for entry_point, (dist, _) in BAD_PLUGINS.items():
        assert f"  {entry_point} 0.1 ({dist}): " in result.stdout


def test_list_in_strict_mode_names_a_plugin_that_calls_sys_exit(subprocess_env, tmp_path):
    write_distribution(tmp_path, "fake_exit_hook", *BAD_PLUGINS["fake_exit_hook"])
    env = {**subprocess_env, "PYTHONPATH": str(tmp_path), "FUSION_ENGINE_STRICT_PLUGINS": "1"}
    result = run_list(env, "--json")
    assert result.returncode == 2 and result.stdout == ""
    assert "fake_exit_hook" in result.stderr and "sys.exit(4)" in result.stderr
    assert "Traceback" not in result.stderr


def test_list_in_process_survives_sys_exit_in_a_plugin(fake_distribution, capsys, monkeypatch):
    from fusion_engine import cli

    for entry_point in ("fake_exit_import", "fake_exit_hook"):
        dist, source = BAD_PLUGINS[entry_point]
        fake_distribution(dist, "0.1", source, entry_point=entry_point)
    fake_distribution("fake-good", "0.1", GOOD, entry_point="fake_good")
    assert cli.main(["list", "fusion"]) == 0
    out = capsys.readouterr().out
    assert "still_here" in out and "concat" in out
    assert "fake_exit_import 0.1 (fake-exit-import): SystemExit: the plugin called sys.exit(3)" in out
    assert "fake_exit_hook 0.1 (fake-exit-hook): SystemExit: the plugin called sys.exit(4)" in out
    for entry_point in ("fake_exit_import", "fake_exit_hook"):
        monkeypatch.setenv("FUSION_ENGINE_DISABLE_PLUGINS", "fake_exit_import,fake_exit_hook".replace(entry_point, ""))
        monkeypatch.setenv("FUSION_ENGINE_STRICT_PLUGINS", "1")
        assert cli.main(["list"]) == 2
        assert f"'{entry_point}'" in capsys.readouterr().err
