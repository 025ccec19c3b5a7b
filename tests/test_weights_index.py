"""Weights shipped by installed packages (the ``fusion_engine.weights`` entry point): found without importing the
package, after the user's --weights-dir folders, verified by sha256 when loaded, listed, and used by the default
config. Each test ships its own tiny weights through a fake distribution; the real fusion-engine-weights package
(when installed) is hidden with the deny-list, so these tests do not depend on it."""

from __future__ import annotations

import hashlib
import importlib
import json
import sys
import warnings

import pytest
import timm
import torch
from safetensors.torch import save_file

from fusion_engine import Engine, WeightsError
from fusion_engine.core import weights_index
from fusion_engine.core.defaults import HUB_BACKBONES, build_default, default_config
from fusion_engine.errors import RandomInitWarning

DIST = "fake-weights-shipper"
MODULE = "fake_weights_shipper"
NAME = "test_resnet.tiny_v1"


@pytest.fixture
def engine():
    return Engine.from_plugins(entry_points=False)


def tiny_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return timm.create_model("test_resnet", num_classes=0).state_dict()


def write_weights(folder, name=NAME, *, sha256=True, state=None) -> dict:
    """A weights folder: ``name``'s safetensors file and an index.json entry for it (with its sha256)."""
    folder.mkdir(parents=True, exist_ok=True)
    file = folder / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in (state or tiny_state()).items()}, str(file))
    entry = {
        "architecture": "timm:test_resnet",
        "input_size": [3, 32, 32],
        "mean": [0.5] * 3,
        "std": [0.5] * 3,
        "file": file.name,
        "source": "a test",
        "license": "CC0-1.0",
    }
    if sha256:
        entry["sha256"] = hashlib.sha256(file.read_bytes()).hexdigest()
    index = folder / "index.json"
    entries = json.loads(index.read_text()) if index.is_file() else {}
    index.write_text(json.dumps({**entries, name: entry}))
    return entry


@pytest.fixture
def ship(tmp_path, monkeypatch):
    """``ship(record=True, **write_weights options)`` -> the package folder: an installed distribution DIST whose
    ``fusion_engine.weights`` entry point names MODULE, a package holding index.json and weights. Importing MODULE
    raises, so a test fails if the engine ever imports it. The real fusion-engine-weights package is hidden."""
    monkeypatch.setenv("FUSION_ENGINE_DISABLE_PLUGINS", "fusion-engine-weights")
    site = tmp_path / "site"

    def make(*, record: bool = True, **options):
        package = site / MODULE
        package.mkdir(parents=True, exist_ok=True)
        (package / "__init__.py").write_text("raise RuntimeError('the weights package was imported')\n")
        write_weights(package, **options)
        info = site / f"{MODULE}-0.3.0.dist-info"
        info.mkdir(exist_ok=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {DIST}\nVersion: 0.3.0\n")
        (info / "entry_points.txt").write_text(f"[fusion_engine.weights]\ntiny = {MODULE}\n")
        if record:  # a regular install lists its files; an editable one does not (found by find_spec instead)
            files = [p.relative_to(site).as_posix() for p in package.iterdir()]
            (info / "RECORD").write_text("".join(f"{f},,\n" for f in files))
        importlib.invalidate_caches()
        return package

    monkeypatch.syspath_prepend(str(site))
    yield make
    sys.modules.pop(MODULE, None)
    importlib.invalidate_caches()


@pytest.mark.parametrize("record", [True, False], ids=["regular install", "editable install"])
def test_a_package_ships_weights_found_without_importing_it(engine, ship, record):
    package = ship(record=record)
    assert weights_index.shipped_folders() == [(package, DIST)]
    entry = weights_index.find_entry(NAME)
    assert entry["distribution"] == DIST and entry["path"] == str(package / f"{NAME}.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RandomInitWarning)
        model = engine.build({"backbones": [{"name": "timm", "weights": NAME}, "timm:test_resnet"], "num_classes": 2})
    assert [b.backbone.pretrained_source for b in model.branches] == [f"index:{NAME}"] * 2  # by name, by architecture
    for name, tensor in tiny_state().items():
        torch.testing.assert_close(model.branches[0].backbone.model.state_dict()[name], tensor, atol=0, rtol=0)
    assert MODULE not in sys.modules  # data, not code: the package was never imported


def test_a_folder_given_by_the_user_wins_over_a_shipped_one(ship, tmp_path, monkeypatch):
    ship()
    mine = tmp_path / "mine"
    write_weights(mine)
    monkeypatch.setenv("FUSION_ENGINE_WEIGHTS_DIR", str(mine))
    entry = weights_index.find_entry(NAME)
    assert entry["distribution"] is None and entry["path"] == str((mine / f"{NAME}.safetensors").resolve())
    assert weights_index.shipped_entries()[NAME]["distribution"] == DIST  # still there, just second


def test_a_corrupted_shipped_file_is_refused_naming_the_file_and_the_package(engine, ship):
    package = ship()
    file = package / f"{NAME}.safetensors"
    data = bytearray(file.read_bytes())
    data[-1] ^= 0x01  # one flipped bit in the last tensor: still a valid safetensors file, the wrong weights
    file.write_bytes(bytes(data))
    with pytest.raises(WeightsError) as info:
        engine.build({"backbones": [{"name": "timm", "weights": NAME}], "num_classes": 2})
    message = str(info.value)
    assert f"weights file {file} is corrupted or was replaced" in message
    assert f"package '{DIST}'" in message and f"pip install --force-reinstall --no-deps {DIST}" in message


def test_a_user_folder_entry_is_verified_too_when_it_records_a_sha256(engine, tmp_path, monkeypatch):
    folder = tmp_path / "weights"
    write_weights(folder)
    index = json.loads((folder / "index.json").read_text())
    index[NAME]["sha256"] = "0" * 64
    (folder / "index.json").write_text(json.dumps(index))
    monkeypatch.setenv("FUSION_ENGINE_WEIGHTS_DIR", str(folder))
    with pytest.raises(WeightsError, match=rf"{NAME}\.safetensors is corrupted.*{folder / 'index.json'}"):
        engine.build({"backbones": [{"name": "timm", "weights": NAME}], "num_classes": 2})


def test_shipped_weights_without_a_sha256_are_not_offered(ship):
    ship(sha256=False)
    assert weights_index.shipped_folders() != [] and weights_index.all_entries() == {}


def test_the_deny_list_hides_a_package_s_weights(ship, monkeypatch):
    ship()
    monkeypatch.setenv("FUSION_ENGINE_DISABLE_PLUGINS", f"fusion-engine-weights,{DIST}")
    assert weights_index.all_entries() == {}


def test_default_config_picks_shipped_weights_and_names_the_package(ship, engine):
    ship()
    config, note = default_config(engine=engine)
    assert config["backbones"] == [{"name": "timm", "weights": NAME}]
    assert f"weights index: {NAME} (shipped by {DIST})" in note


def test_default_config_falls_back_to_hub_backbones_without_weights(monkeypatch, engine):
    monkeypatch.setattr(weights_index.importlib.metadata, "entry_points", lambda **kw: [])  # no weights package
    assert weights_index.all_entries() == {}
    config, note = default_config(engine=engine)
    assert config["backbones"][:3] == [{"name": "timm", "model": m} for m in HUB_BACKBONES]
    assert "pip install ./plugins/fusion-engine-weights" in note
    with pytest.warns(RandomInitWarning, match="RANDOMLY INITIALISED"):  # offline: the warning path
        engine.build({"backbones": config["backbones"][2:3], "num_classes": 2})  # resnet18, not in the cache


def test_the_default_leaves_out_branches_that_could_only_be_random(ship, engine):
    ship()
    random_branch = {"name": "timm", "model": "test_efficientnet"}  # offline, in no index: random weights
    config = {"backbones": [random_branch, {"name": "timm", "weights": NAME}], "fusion": "concat"}
    lines = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", RandomInitWarning)  # dropped, so not warned about
        model = build_default(engine, config, ["a", "b"], lines.append)
    assert [b.backbone.pretrained_source for b in model.branches] == [f"index:{NAME}"]
    assert len(lines) == 1 and "timm:test_efficientnet" in lines[0] and "left out" in lines[0]
    assert "pip install ./plugins/fusion-engine-weights" in lines[0]


def test_the_default_keeps_random_branches_when_no_other_is_left(engine):
    lines = []
    config = {"backbones": [{"name": "timm", "model": "test_efficientnet"}], "fusion": "concat"}
    with pytest.warns(RandomInitWarning, match="RANDOMLY INITIALISED"):
        model = build_default(engine, config, ["a", "b"], lines.append)
    assert len(model.branches) == 1 and lines == []


def test_list_shows_shipped_weights_with_their_package(ship, capsys):
    from fusion_engine import cli

    ship()
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    weights = out.split("\nWeights:\n")[1].splitlines()
    assert weights[0].split() == [NAME, "timm:test_resnet", f"[{DIST}]"]
    assert cli.main(["list", "--json"]) == 0
    [row] = json.loads(capsys.readouterr().out)["weights"]
    assert (row["name"], row["model"], row["distribution"], row["license"]) == (
        NAME,
        "timm:test_resnet",
        DIST,
        "CC0-1.0",
    )
