"""fusion-engine-weights, installed: its files are the recorded ones, the engine finds them offline with no
--weights-dir and builds pretrained branches from them, a corrupted copy is refused, `fusion-engine list` and
the default config show them, and a wheel carries them."""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fusion_engine import Engine, WeightsError
from fusion_engine.core.defaults import default_config  # internal: what `fusion-engine train` trains with no config
from fusion_engine.errors import RandomInitWarning
from fusion_engine.plugin_api import find_weights_entry, weights_entries

ROOT = Path(__file__).resolve().parents[1]  # plugins/fusion-engine-weights
SOURCE = ROOT / "fusion_engine_weights"
DIST = "fusion-engine-weights"
NAMES = ["mobilenetv2_100.tf1_quant_in1k", "mobilenetv1_050.tf1_quant_in1k", "mobilenetv1_075.tf1_quant_in1k"]
SHARED = Path(os.environ.get("FUSION_ENGINE_SHARED") or ROOT.parents[2] / "shared")


@pytest.fixture(autouse=True)
def offline_and_no_weights_dir(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in ("FUSION_ENGINE_WEIGHTS_DIR", "FUSION_ENGINE_DISABLE_PLUGINS", "FUSION_ENGINE_LOAD_PLUGINS"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def installed() -> Path:
    """The installed package's folder, found as the engine finds it (the entry point, without importing)."""
    shipped = {Path(e["path"]).parent for e in weights_entries().values() if e["distribution"] == DIST}
    assert len(shipped) == 1, f"{DIST} is not installed: pip install ./plugins/fusion-engine-weights"
    return shipped.pop()


@pytest.fixture(scope="module")
def engine():
    return Engine.from_plugins(entry_points=False)


def index(folder: Path) -> dict:
    return json.loads((folder / "index.json").read_text())


def test_the_files_match_their_recorded_sha256_and_size(installed):
    entries = index(SOURCE)
    assert list(entries) == NAMES and index(installed) == entries
    for folder in (SOURCE, installed):
        for entry in entries.values():
            data = (folder / entry["file"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == entry["sha256"], f"{folder / entry['file']}"
            assert len(data) == entry["bytes"]
            assert entry["license"] == "Apache-2.0" and entry["source"].startswith("google-coral/test_data")


def test_the_index_entries_and_files_are_copies_of_the_shared_ones():
    if not (SHARED / "weights" / "index.json").is_file():
        pytest.skip(f"shared weights not found at {SHARED / 'weights'}")
    shared = index(SHARED / "weights")
    for name, entry in index(SOURCE).items():
        assert entry == shared[name]
        assert (SOURCE / entry["file"]).read_bytes() == (SHARED / "weights" / entry["file"]).read_bytes()


def test_the_readme_table_lists_every_file_with_its_size_sha256_source_and_licence():
    readme = (ROOT / "README.md").read_text()
    for name, entry in index(SOURCE).items():
        [row] = [line for line in readme.splitlines() if line.startswith(f"| `{name}` |")]
        cells = [c.strip().strip("`") for c in row.strip("|").split("|")]
        assert cells[2] == entry["file"] and cells[3] == f"{entry['bytes']:,}" and cells[4] == entry["sha256"]
        assert cells[5].startswith("google-coral/test_data")
        assert re.search(r"mobilenet_v[\w.]+\.tflite", cells[5]).group(0) in entry["source"]  # the original model
        assert cells[6] == entry["license"]


@pytest.mark.parametrize("name", NAMES)
def test_the_engine_finds_them_offline_and_loads_exactly_the_file(engine, installed, name):
    entry = find_weights_entry(name)
    assert entry["distribution"] == DIST and Path(entry["path"]).parent == installed
    with warnings.catch_warnings():
        warnings.simplefilter("error", RandomInitWarning)
        model = engine.build({"backbones": [{"name": "timm", "weights": name}], "num_classes": 2})
    backbone = model.branches[0].backbone
    assert backbone.pretrained_source == f"index:{name}"
    assert backbone.data_config["input_size"] == tuple(entry["input_size"])
    loaded = backbone.model.state_dict()
    expected = {k: v for k, v in load_file(entry["path"]).items() if not k.startswith("classifier.")}
    assert set(expected) == set(loaded)
    for key, tensor in expected.items():
        torch.testing.assert_close(loaded[key], tensor.to(loaded[key].dtype), atol=0, rtol=0)


def test_a_plain_timm_model_name_is_pretrained_from_the_shipped_weights(engine, installed):
    with warnings.catch_warnings():
        warnings.simplefilter("error", RandomInitWarning)
        model = engine.build({"backbones": ["timm:mobilenetv2_100", "timm:mobilenetv1_050"], "num_classes": 2})
    assert [b.backbone.pretrained_source for b in model.branches] == [f"index:{NAMES[0]}", f"index:{NAMES[1]}"]


def test_the_shipped_mobilenet_recognises_imagenet_photos(engine, installed):
    """A known value: the branch's features times the file's own classifier give the photos' labels."""
    sample = SHARED / "data" / "imagenet_sample1000_112px.npz"
    if not sample.is_file():
        pytest.skip(f"{sample} not found")
    data = np.load(sample, allow_pickle=False)
    take = np.arange(0, 1000, 25)  # 40 photos of 40 classes
    images = torch.from_numpy(data["x"][take]).permute(0, 3, 1, 2).float() / 255
    model = engine.build({"backbones": [{"name": "timm", "weights": NAMES[0]}], "num_classes": 2}).eval()
    state = load_file(find_weights_entry(NAMES[0])["path"])
    with torch.no_grad():
        features = model.branch_features(images)[0]  # the model's own preprocessing: 112 px -> 224 px, (x-.5)/.5
        predicted = (features @ state["classifier.weight"].float().T + state["classifier.bias"].float()).argmax(1)
    accuracy = float((predicted.numpy() == data["y"][take]).mean())
    assert accuracy >= 0.4, accuracy  # about 0.6 on this 112 px copy; random weights: about 0.001


def test_a_corrupted_copy_is_refused_with_a_message_naming_the_file(engine, installed, tmp_path, monkeypatch):
    site, module = tmp_path / "site", "corrupted_weights_copy"
    shutil.copytree(installed, site / module, ignore=shutil.ignore_patterns("__pycache__"))
    file = site / module / f"{NAMES[1]}.safetensors"
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0x10  # one flipped bit inside the tensors
    file.write_bytes(bytes(data))
    info = site / f"{module}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: corrupted-weights-copy\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[fusion_engine.weights]\ncopy = {module}\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("FUSION_ENGINE_DISABLE_PLUGINS", DIST)  # only the corrupted copy ships these names now
    importlib.invalidate_caches()
    try:
        assert find_weights_entry(NAMES[1])["distribution"] == "corrupted-weights-copy"
        with pytest.raises(WeightsError) as caught:
            engine.build({"backbones": [{"name": "timm", "weights": NAMES[1]}], "num_classes": 2})
    finally:
        sys.modules.pop(module, None)
        importlib.invalidate_caches()
    message = str(caught.value)
    assert f"weights file {file} is corrupted or was replaced" in message
    assert "package 'corrupted-weights-copy'" in message and "--force-reinstall" in message


def test_fusion_engine_list_shows_them(installed, capsys):
    from fusion_engine import cli

    assert cli.main(["list"]) == 0
    lines = capsys.readouterr().out.split("\nWeights:\n")[1].splitlines()
    shown = {line.split()[0]: line.split()[1:] for line in lines if line.startswith("  ") and "[" in line}
    for name in NAMES:
        assert shown[name] == [f"timm:{name.split('.')[0]}", f"[{DIST}]"]
    assert cli.main(["list", "--json"]) == 0
    rows = {w["name"]: w for w in json.loads(capsys.readouterr().out)["weights"]}
    assert all(rows[n]["distribution"] == DIST and rows[n]["sha256"] == index(SOURCE)[n]["sha256"] for n in NAMES)


def test_the_default_config_picks_them_and_says_so(installed):
    config, note = default_config()
    assert config["backbones"][:3] == [{"name": "timm", "weights": name} for name in NAMES]
    assert f"weights index: {', '.join(NAMES)} (shipped by {DIST})" in note


def test_the_default_config_falls_back_without_the_package(monkeypatch):
    monkeypatch.setenv("FUSION_ENGINE_DISABLE_PLUGINS", DIST)
    config, note = default_config()
    assert all("weights" not in b for b in config["backbones"])
    assert "pip install ./plugins/fusion-engine-weights" in note


def test_a_wheel_carries_the_weights_and_the_index(tmp_path):
    pytest.importorskip("setuptools")
    source = tmp_path / "source"  # a copy, so that the build leaves nothing in the repository
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__", "tests"))
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(source)],
        capture_output=True,
        text=True,
        env={**os.environ, "PIP_NO_INDEX": "1"},
    )
    assert result.returncode == 0, result.stderr
    [wheel] = tmp_path.glob("fusion_engine_weights-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        assert "[fusion_engine.weights]" in archive.read(entry_points).decode()
        for entry in index(SOURCE).values():
            assert hashlib.sha256(archive.read(f"fusion_engine_weights/{entry['file']}")).hexdigest() == entry["sha256"]
    assert "fusion_engine_weights/index.json" in names
    assert importlib.metadata.version(DIST) in wheel.name
