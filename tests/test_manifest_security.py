"""Attacks on a saved model's manifest (issue #17): a manifest swapped between the signature check and its
use, components now served by another distribution, options that would fetch weights or code at load,
unknown component kinds, a key given for a plaintext model, and a fuzz of manifest mutations that may
only ever raise the project's own errors."""

from __future__ import annotations

import builtins
import dataclasses
import io
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from fusion_engine import Engine, load
from fusion_engine.artifacts.manifest import read_manifest
from fusion_engine.artifacts.signing import generate_keypair, sign_manifest
from fusion_engine.artifacts.store import save, sign, verify
from fusion_engine.cli.main import main
from fusion_engine.errors import ArtifactError, FusionEngineError
from fusion_engine.plugin_api import hookimpl

CONFIG = {"backbones": [{"name": "timm", "model": "test_resnet", "input_size": 32}], "fusion": "concat"}
CLASSES = ["zero", "one", "two"]
EVIL = ["EVIL", "EVIL", "EVIL"]


@pytest.fixture(scope="module")
def engine():
    return Engine.from_plugins()


@pytest.fixture(scope="module")
def base_artifact(tmp_path_factory, engine):
    """A saved untrained model with a tiny timm backbone."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("base") / "run"
    save(engine.build(CONFIG, class_names=CLASSES), folder)
    return folder


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    return generate_keypair(tmp_path_factory.mktemp("keys") / "key")


@pytest.fixture
def run(tmp_path, base_artifact):
    folder = tmp_path / "run"
    shutil.copytree(base_artifact, folder)
    return folder


@pytest.fixture
def signed(run, keys):
    sign_manifest(run, keys[0])
    return run


def edit_manifest(folder, change) -> None:
    path = folder / "manifest.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data, indent=2))


def cli(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


# --- the signature check cannot be raced ------------------------------------------------------------------


class _SwapAfterRead:
    """A file object that, once closed (its content read), lets the attacker replace the file on disk."""

    def __init__(self, f, swap):
        self._f, self._swap = f, swap

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.__exit__(*exc)
        self._swap()

    def close(self):
        self._f.close()
        self._swap()


@pytest.fixture
def swap_after_first_read(monkeypatch):
    """``arm(folder)``: right after the first read of ``folder/manifest.json`` the file is atomically replaced
    by an edited one (class names EVIL), as a process racing the load would; returns the list of swaps made.

    Every reader of manifest.json goes through ``io.open`` (``Path.read_bytes``, ``open``) or ``os.open``
    (with ``os.fdopen``); both are hooked, so the test does not depend on how the store reads the file."""
    swaps = []

    def arm(folder):
        target = os.path.realpath(folder / "manifest.json")
        edited = json.loads((folder / "manifest.json").read_text())
        edited["class_names"] = EVIL
        evil = folder.parent / "evil-manifest.json"
        evil.write_text(json.dumps(edited, indent=2))

        def swap():
            if not swaps:
                swaps.append(target)
                os.replace(evil, target)

        def is_target(file) -> bool:
            return isinstance(file, (str, os.PathLike)) and os.path.realpath(file) == target and not swaps

        real_io_open, real_builtin_open, real_os_open = io.open, builtins.open, os.open

        def hooked_io_open(file, *args, **kwargs):
            f = real_io_open(file, *args, **kwargs)
            return _SwapAfterRead(f, swap) if is_target(file) else f

        def hooked_builtin_open(file, *args, **kwargs):
            f = real_builtin_open(file, *args, **kwargs)
            return _SwapAfterRead(f, swap) if is_target(file) else f

        def hooked_os_open(path, *args, **kwargs):
            fd = real_os_open(path, *args, **kwargs)
            if is_target(path):  # the descriptor keeps the original file: replacing the name now = after the read
                swap()
            return fd

        monkeypatch.setattr(io, "open", hooked_io_open)
        monkeypatch.setattr(builtins, "open", hooked_builtin_open)
        monkeypatch.setattr(os, "open", hooked_os_open)
        return swaps

    return arm


def test_manifest_swapped_during_a_signed_load_is_never_used(signed, engine, keys, swap_after_first_read):
    """The race of issue #17: the signature was checked over one read and the model rebuilt from a second."""
    swaps = swap_after_first_read(signed)
    try:
        model = load(signed, engine=engine, public_key=keys[1])
    except ArtifactError:
        pass  # refusing is as good as using the original
    else:
        assert model.class_names == CLASSES and model.manifest.class_names == CLASSES
    assert swaps, "the manifest was never read: the race was not exercised"
    assert json.loads((signed / "manifest.json").read_text())["class_names"] == EVIL  # the swap did happen


def test_manifest_swapped_during_a_signed_verify_is_never_returned(signed, keys, swap_after_first_read):
    swaps = swap_after_first_read(signed)
    try:
        manifest = verify(signed, public_key=keys[1])
    except ArtifactError:
        pass
    else:
        assert manifest.class_names == CLASSES
    assert swaps
    # the edited manifest now on disk is refused by the next check, as it always was
    with pytest.raises(ArtifactError, match="manifest.json changed after signing"):
        verify(signed, public_key=keys[1])


def test_manifest_swapped_while_signing_signs_what_was_checked(run, keys, swap_after_first_read):
    """``store.sign`` checks the files against one read of the manifest and signs those bytes."""
    original = (run / "manifest.json").read_bytes()
    swaps = swap_after_first_read(run)
    sign(run, keys[0])
    assert swaps
    (run / "manifest.json").write_bytes(original)  # the signature is over the bytes read, not the swapped file
    assert verify(run, public_key=keys[1]).class_names == CLASSES


def test_signing_at_save_signs_the_bytes_written(tmp_path, engine, keys):
    folder = tmp_path / "run"
    save(engine.build(CONFIG, class_names=CLASSES), folder, signing_key=keys[0])
    assert verify(folder, public_key=keys[1]).class_names == CLASSES


# --- components must come from the distribution recorded at save ------------------------------------------


def test_manifest_records_each_components_distribution_and_version(base_artifact, engine):
    manifest, _ = read_manifest(base_artifact)
    for record in manifest.components:
        component = engine.registry.get(record.kind, record.name)
        assert record.version == component.version
        assert record.distribution == getattr(component, "distribution", None)


def _impostor_engine(kind: str, name: str, distribution: str) -> Engine:
    """A fresh engine where ``kind`` ``name`` is served by another distribution (a shadowing plugin)."""
    impostor = Engine.from_plugins()
    components = impostor.registry._components[kind]
    components[name] = dataclasses.replace(components[name], plugin="shadow", distribution=distribution)
    return impostor


def test_signed_model_refuses_a_component_served_by_another_distribution(signed, keys):
    recorded = {(c.kind, c.name): c.distribution for c in read_manifest(signed)[0].components}
    impostor = _impostor_engine("fusion", "concat", "evil-fusions")
    with pytest.raises(ArtifactError) as info:
        load(signed, engine=impostor, public_key=keys[1])
    message = str(info.value)
    assert "fusion 'concat'" in message and "'evil-fusions'" in message
    assert f"'{recorded['fusion', 'concat']}'" in message
    load(signed, engine=impostor)  # unsigned use trusts whatever is installed, as documented


def test_signed_model_without_recorded_distributions_still_loads(run, engine, keys):
    """A manifest written before the field existed: nothing recorded, nothing to compare."""
    edit_manifest(run, lambda m: [c.pop("distribution", None) for c in m["components"]])
    sign_manifest(run, keys[0])
    model = load(run, engine=_impostor_engine("fusion", "concat", "evil-fusions"), public_key=keys[1])
    assert model.class_names == CLASSES
    assert load(run, engine=engine, public_key=keys[1]).class_names == CLASSES


# --- a manifest cannot make load fetch weights or code ------------------------------------------------------


def _set_option(path, value):
    def change(manifest):
        options = manifest["config"]["backbones"][0]["options"]
        *parents, last = path.split(".")
        for key in parents:
            options = options.setdefault(key, {})
        options[last] = value

    return change


FETCHING = {
    "weights file": ("weights", "{weights}"),
    "pretrained": ("pretrained", True),
    "hf-hub model": ("model", "hf-hub:timm/resnet18.a1_in1k"),
    "hf_hub model": ("model", "hf_hub:timm/resnet18.a1_in1k"),
    "HF-HUB model": ("model", "HF-HUB:timm/resnet18.a1_in1k"),
    "local-dir model": ("model", "local-dir:{folder}"),
    "url model": ("model", "https://example.com/resnet"),
    "checkpoint_path": ("model_kwargs.checkpoint_path", "{weights}"),
    "model_kwargs pretrained": ("model_kwargs.pretrained", True),
    "pretrained_cfg_overlay file": ("model_kwargs.pretrained_cfg_overlay", {"file": "{weights}"}),
    "pretrained_cfg_overlay url": ("model_kwargs.pretrained_cfg_overlay", {"url": "https://example.com/w.pth"}),
    "pretrained_cfg hub id": ("model_kwargs.pretrained_cfg", {"hf_hub_id": "timm/resnet18.a1_in1k"}),
}


@pytest.fixture
def spy(monkeypatch, engine):
    """Records every path opened and fails if the engine builds anything."""
    opened = []
    real_io_open, real_builtin_open = io.open, builtins.open

    def record(real):
        def hooked(file, *args, **kwargs):
            if isinstance(file, (str, os.PathLike)):
                opened.append(os.path.realpath(file))
            return real(file, *args, **kwargs)

        return hooked

    def no_build(*args, **kwargs):
        raise AssertionError("the engine built a model from a manifest that should have been refused")

    monkeypatch.setattr(io, "open", record(real_io_open))
    monkeypatch.setattr(builtins, "open", record(real_builtin_open))
    monkeypatch.setattr(engine, "build", no_build)
    return opened


@pytest.mark.parametrize("case", FETCHING)
def test_options_that_fetch_are_refused_before_anything_is_built_or_read(run, engine, spy, case):
    option, value = FETCHING[case]
    weights = run.parent / "weights.safetensors"
    weights.write_bytes(b"not read")

    def fill(v):
        if isinstance(v, str):
            return v.format(weights=weights, folder=run.parent)
        return {k: fill(x) for k, x in v.items()} if isinstance(v, dict) else v

    edit_manifest(run, _set_option(option, fill(value)))
    spy.clear()
    with pytest.raises(ArtifactError) as info:
        load(run, engine=engine)
    message = str(info.value)
    assert f"option '{option}'" in message and "branch 'timm:test_resnet' (backbones[0])" in message
    assert "fetches weights or code" in message
    assert os.path.realpath(weights) not in spy
    assert os.path.realpath(run / "model.safetensors") not in spy  # refused before any file was read


@pytest.mark.parametrize("option, value", [("pretrained", False), ("weights", None)])
def test_options_that_fetch_nothing_are_allowed(run, engine, option, value):
    edit_manifest(run, _set_option(option, value))
    edit_manifest(run, _set_option("model_kwargs.pretrained_cfg_overlay", {"mean": [0.5] * 3}))
    assert load(run, engine=engine).class_names == CLASSES


def test_save_drops_options_that_fetch(tmp_path, engine, base_artifact):
    """A model built with ``weights`` and ``model_kwargs.checkpoint_path`` saves without them and loads back."""
    model = engine.build(CONFIG, class_names=CLASSES)
    state = {k: v for k, v in model.branches[0].backbone.model.state_dict().items()}
    from safetensors.torch import save_file

    save_file(state, tmp_path / "w.safetensors")
    config = {"backbones": [{**CONFIG["backbones"][0], "weights": str(tmp_path / "w.safetensors")}]}
    model = engine.build({**CONFIG, **config}, class_names=CLASSES)
    save(model, tmp_path / "run")
    options = read_manifest(tmp_path / "run")[0].config["backbones"][0]["options"]
    assert "weights" not in options and "pretrained" not in options
    assert load(tmp_path / "run", engine=engine).class_names == CLASSES


def test_save_drops_model_kwargs_that_fetch(tmp_path, engine):
    """timm passes ``model_kwargs`` on to ``create_model``: its fetching keys are left out of the manifest too."""
    model = engine.build(CONFIG, class_names=CLASSES)
    backbone = model.branches[0].backbone
    fetching = {"checkpoint_path": "/x.pth", "pretrained_cfg_overlay": {"file": "/x.pth"}, "drop_rate": 0.0}
    backbone.rebuild_options = {**backbone.rebuild_options, "model_kwargs": fetching}
    save(model, tmp_path / "run")
    assert read_manifest(tmp_path / "run")[0].config["backbones"][0]["options"]["model_kwargs"] == {"drop_rate": 0.0}
    assert load(tmp_path / "run", engine=engine).class_names == CLASSES


class Tiny(nn.Module):
    """A backbone plugin's class factory that marks its ``checkpoint`` option as fetching."""

    fetch_options = ("checkpoint",)

    def __init__(self, width: int = 4, checkpoint: str | None = None):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3)
        self.data_config = {
            "input_size": (3, 16, 16),
            "mean": (0.5,) * 3,
            "std": (0.5,) * 3,
            "interpolation": "bilinear",
        }

    def forward(self, x):
        return self.conv(x)


def tiny_function(width: int = 4, source: str | None = None):
    return Tiny(width)


tiny_function.fetch_options = ("source",)


class TinyPlugin:
    @hookimpl
    def register_backbones(self, register):
        register("tiny", Tiny, description="a tiny test backbone")
        register("tiny-fn", tiny_function, description="the same, built by a function")


@pytest.mark.parametrize("name, option", [("tiny", "checkpoint"), ("tiny-fn", "source")])
def test_options_a_factory_marks_as_fetching_are_refused(tmp_path, name, option):
    plugin_engine = Engine.from_plugins([TinyPlugin()], entry_points=False)
    model = plugin_engine.build({"backbones": [{"name": name, "width": 4}], "fusion": "concat"}, class_names=CLASSES)
    save(model, tmp_path / "run")
    assert load(tmp_path / "run", engine=plugin_engine).class_names == CLASSES
    edit_manifest(tmp_path / "run", lambda m: m["config"]["backbones"][0]["options"].update({option: "/etc/passwd"}))
    with pytest.raises(
        ArtifactError, match=f"branch '{name}' \\(backbones\\[0\\]\\), backbone '{name}', the option '{option}'"
    ):
        load(tmp_path / "run", engine=plugin_engine)


def test_save_drops_the_options_a_class_factory_marks(tmp_path):
    plugin_engine = Engine.from_plugins([TinyPlugin()], entry_points=False)
    model = plugin_engine.build(
        {"backbones": [{"name": "tiny", "checkpoint": "x"}], "fusion": "concat"}, class_names=CLASSES
    )
    save(model, tmp_path / "run")
    assert "checkpoint" not in read_manifest(tmp_path / "run")[0].config["backbones"][0]["options"]
    assert load(tmp_path / "run", engine=plugin_engine).class_names == CLASSES


# --- smaller holes ----------------------------------------------------------------------------------------------


def test_unknown_component_kind_is_the_projects_error(run, engine, capsys):
    edit_manifest(run, lambda m: m["components"][0].update(kind="sampler"))
    with pytest.raises(ArtifactError, match=r"field 'components\.0\.kind': Input should be 'backbone', 'extractor'"):
        load(run, engine=engine)
    code, out = cli(capsys, "verify", run)
    assert code == 2 and "components.0.kind" in out


def test_plaintext_model_with_a_key_is_refused(run, engine, tmp_path, capsys):
    with pytest.raises(ArtifactError, match="is not encrypted, but an encryption key was given; drop the key"):
        load(run, engine=engine, encryption_key=os.urandom(32))
    key = tmp_path / "key"
    key.write_text(os.urandom(32).hex())
    code, out = cli(capsys, "evaluate", run, "--data", "./no-data-needed", "--key-file", key)
    assert code == 2 and "is not encrypted" in out and "drop the key" in out


# --- fuzz: only the project's own errors come out of load and verify --------------------------------------------

JSON_WORDS = st.sampled_from(
    [
        "backbone",
        "extractor",
        "fusion",
        "sampler",
        "timm",
        "test_resnet",
        "concat",
        "avg",
        "gem",
        "vote",
        "model.safetensors",
        "../x",
        "/etc/passwd",
        "fp16",
        "int8",
        "prune",
        "hf-hub:timm/x",
    ]
)
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=16)
    | JSON_WORDS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=10,
)


def _paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, (*prefix, i))


def _other_type(value, data):
    """``value`` converted to another JSON type (the same content where that makes sense)."""
    candidates = [None, str(value), [value], {"value": value}, 0, 1.5, True, -1]
    return data.draw(st.sampled_from([c for c in candidates if type(c) is not type(value)]))


def _same_type(value, data):
    """Another value of ``value``'s type: these get past the schema and reach the code behind it."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return data.draw(st.sampled_from([0, -1, 1, 2, value + 1, 2**31, 10**12]))
    if isinstance(value, float):
        return data.draw(st.sampled_from([0.0, -1.0, float("nan"), float("inf"), value * 2, 1e300]))
    if isinstance(value, str):
        return data.draw(JSON_WORDS | st.text(max_size=16))
    if isinstance(value, list):
        return (
            data.draw(st.lists(st.sampled_from(value), max_size=len(value) + 2)) if value else [data.draw(JSON_VALUES)]
        )
    return value


def _mutate_json(manifest, data):
    """Drop keys, change types, put random JSON values at random paths, add keys, or change a leaf's value."""
    for _ in range(data.draw(st.integers(1, 2))):
        op = data.draw(st.sampled_from(["drop", "type", "value", "add", "same type", "same type"]))
        paths = [p for p in _paths(manifest) if p]
        if op == "same type":  # leaves only, so the schema's names and kinds get changed often
            paths = [p for p in paths if not isinstance(_at(manifest, p), (dict, list))] or paths
        if not paths:
            break
        path = data.draw(st.sampled_from(paths))
        parent = _at(manifest, path[:-1])
        if op == "drop":
            if isinstance(parent, dict):
                del parent[path[-1]]
            else:
                parent.pop(path[-1])
        elif op == "type":
            parent[path[-1]] = _other_type(parent[path[-1]], data)
        elif op == "value":
            parent[path[-1]] = data.draw(JSON_VALUES)
        elif op == "same type":
            parent[path[-1]] = _same_type(parent[path[-1]], data)
        elif isinstance(parent, dict):
            parent[data.draw(st.text(max_size=10))] = data.draw(JSON_VALUES)
        else:
            parent.append(data.draw(JSON_VALUES))
    return json.dumps(manifest, allow_nan=True).encode()


def _at(value, path):
    for key in path:
        value = value[key]
    return value


def _mutate_bytes(raw: bytes, data) -> bytes:
    raw = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 4))):
        if not raw:
            break
        at = data.draw(st.integers(0, len(raw) - 1))
        op = data.draw(st.sampled_from(["set", "delete", "insert", "truncate"]))
        if op == "set":
            raw[at] = data.draw(st.integers(0, 255))
        elif op == "delete":
            del raw[at : at + data.draw(st.integers(1, 16))]
        elif op == "insert":
            raw[at:at] = data.draw(st.binary(min_size=1, max_size=8))
        else:
            del raw[at:]
    return bytes(raw)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_manifests_raise_only_the_projects_errors(base_artifact, engine, data):
    raw = (base_artifact / "manifest.json").read_bytes()
    if data.draw(st.sampled_from(["json", "json", "json", "bytes"])) == "json":  # most random bytes are not JSON
        mutated = _mutate_json(json.loads(raw), data)
    else:
        mutated = _mutate_bytes(raw, data)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "run"
        shutil.copytree(base_artifact, folder)
        (folder / "manifest.json").write_bytes(mutated)
        for check in (lambda: verify(folder), lambda: load(folder, engine=engine)):
            try:
                check()
            except FusionEngineError:
                pass
